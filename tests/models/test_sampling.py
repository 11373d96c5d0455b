import pytest
import torch

from models.backends.sampling import sample_next_token, top_p_filter


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.35]])
    filtered = top_p_filter(probs, 0.75)
    # 0.5 alone is below 0.75, 0.5 + 0.35 reaches it: two tokens survive, renormalised.
    torch.testing.assert_close(filtered, torch.tensor([[0.0, 0.5 / 0.85, 0.0, 0.35 / 0.85]]))


def test_top_p_always_keeps_the_most_likely_token() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([1.0, 0.0, 0.0]))


def test_top_p_one_is_identity() -> None:
    probs = torch.softmax(torch.randn(2, 7), dim=-1)
    assert torch.equal(top_p_filter(probs, 1.0), probs)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5])
def test_top_p_rejects_out_of_range(top_p: float) -> None:
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        top_p_filter(torch.tensor([1.0]), top_p)


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    tokens = sample_next_token(logits, temperature=0.0, top_p=0.5, generator=None)
    assert tokens.tolist() == [1, 0]


def test_sampling_is_reproducible_and_respects_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def draw(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [
            int(sample_next_token(logits, temperature=1.0, top_p=0.7, generator=generator))
            for _ in range(200)
        ]

    assert draw(1) == draw(1)
    assert set(draw(1)) == {0, 1}


def test_sampling_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\], got 2.5"):
        sample_next_token(torch.zeros(1, 3), temperature=2.5, top_p=1.0, generator=None)
