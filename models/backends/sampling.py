"""Pure next-token selection helpers used by the decoding loop."""

from __future__ import annotations

import torch


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").

    Keeps the smallest set of most likely tokens whose total probability reaches `top_p`
    (always at least the most likely one) and renormalises it.

    Args:
        probs: Probabilities over the vocabulary, shape (..., V), rows summing to 1.
        top_p: Nucleus mass in (0, 1]; 1 keeps every token.

    Returns:
        Tensor of the same shape with the tail set to 0 and rows summing to 1.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return probs
    sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
    # Mass strictly before each token: a token is kept while the tokens above it have not
    # yet reached top_p, so the first token is always kept.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, sorted_indices, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Choose the next token from the last position's logits.

    Args:
        logits: Unnormalised scores, shape (B, V).
        temperature: 0 for greedy argmax; otherwise logits are divided by it, in (0, 2].
        top_p: Nucleus mass in (0, 1], applied after temperature scaling.
        generator: Random source for sampling; unused when greedy.

    Returns:
        Token ids, shape (B,), int64.
    """
    if not 0.0 <= temperature <= 2.0:
        raise ValueError(f"temperature must be in [0, 2], got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
