"""Tests with the real packaged weights (SmolLM2 GGUF, all-MiniLM-L6-v2); CPU, slow."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backends import load_model
from models.backends.causal_lm import CausalLM
from models.backends.decoding import SamplingParams
from models.backends.sentence import SentenceEmbedder
from models.backends.smollm2 import MARKER_FILENAME, gguf_path
from models.registry import get_spec

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def real_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("GENSERVE_TEST_MODEL_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def smollm2(real_model_cache: Path) -> CausalLM:
    model = load_model(
        get_spec("smollm2-135m-instruct"),
        cache_dir=real_model_cache,
        device="cpu",
        dtype=torch.float32,
    )
    assert isinstance(model, CausalLM)
    return model


@pytest.fixture(scope="module")
def minilm(real_model_cache: Path) -> SentenceEmbedder:
    model = load_model(
        get_spec("all-minilm-l6-v2"), cache_dir=real_model_cache, device="cpu", dtype=torch.float32
    )
    assert isinstance(model, SentenceEmbedder)
    return model


def test_smollm2_cache_is_a_plain_transformers_folder(
    smollm2: CausalLM, real_model_cache: Path
) -> None:
    folder = real_model_cache / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILENAME):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not [p for p in real_model_cache.iterdir() if ".tmp-" in p.name]


def test_smollm2_cached_weights_match_gguf(smollm2: CausalLM, real_model_cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    ).eval()
    cached = AutoModelForCausalLM.from_pretrained(
        real_model_cache / "smollm2-135m-instruct", dtype=torch.float32
    ).eval()
    ids = torch.tensor([smollm2.encode_chat([{"role": "user", "content": "Hello!"}])])
    with torch.inference_mode():
        expected = reference(ids).logits
        torch.testing.assert_close(cached(ids).logits, expected, atol=1e-4, rtol=1e-4)
        # The worker's copy runs other matrix kernels (oneDNN's, packed): float32 rounding
        # differs, by about 1e-4 on these logits after 30 layers.
        torch.testing.assert_close(smollm2.model(ids).logits, expected, atol=1e-3, rtol=1e-3)


def test_smollm2_answers_in_english(smollm2: CausalLM) -> None:
    prompt = smollm2.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    streamed: list[str] = []
    out = smollm2.generate(prompt, max_new_tokens=48, temperature=0.0, on_token=streamed.append)
    assert out.finish_reason == "stop"
    assert "Paris" in out.text
    assert "".join(streamed) == out.text


def test_smollm2_seeded_sampling_is_reproducible(smollm2: CausalLM) -> None:
    prompt = smollm2.encode_chat([{"role": "user", "content": "Tell me about the sea."}])

    def sample() -> list[int]:
        return smollm2.generate(
            prompt, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=11
        ).token_ids

    first = sample()
    assert first == sample()
    text = smollm2.tokenizer.decode(first, skip_special_tokens=True)
    assert sum(c.isalpha() for c in text) > len(text) / 2


TOPICS = [
    "the sea",
    "copper",
    "compilers",
    "sleep",
    "a sunrise in the mountains",
    "photosynthesis",
    "grey cats",
    "why the sky is blue",
]


def test_smollm2_batched_greedy_equals_alone(smollm2: CausalLM) -> None:
    """32 prompts of mixed lengths and budgets, arriving while others decode."""
    prompts = [
        smollm2.encode_chat(
            [{"role": "user", "content": f"{'Please, ' * (i % 5)}tell me about {topic}."}]
        )
        for i, topic in enumerate(TOPICS * 4)
    ]
    params = [SamplingParams(max_new_tokens=2 + (i * 5) % 16, temperature=0) for i in range(32)]
    decoder = smollm2.decoder(max_batch=32)
    requests = [smollm2.request(p, q) for p, q in zip(prompts, params, strict=True)]
    outputs = {}
    for start in range(0, 32, 4):
        for request in requests[start : start + 4]:
            decoder.add(request)
        outputs.update({id(r): o for r, o in decoder.step()})
    while decoder.has_work:
        outputs.update({id(r): o for r, o in decoder.step()})
    for prompt, param, request in zip(prompts, params, requests, strict=True):
        want = smollm2.generate(prompt, max_new_tokens=param.max_new_tokens, temperature=0)
        assert outputs[id(request)].token_ids == want.token_ids
    assert max(o.peak_batch for o in outputs.values()) > 16


def test_concurrent_first_loads_convert_once(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from models.backends.smollm2 import ensure_converted; "
        "from models.registry import get_spec; "
        "print(ensure_converted(get_spec('smollm2-135m-instruct'), cache_dir=Path(sys.argv[1])))"
    )
    root = Path(__file__).resolve().parents[2]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs[0] == outputs[1] == str(tmp_path / "smollm2-135m-instruct")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".smollm2-135m-instruct.lock",
        "smollm2-135m-instruct",
    ]
    lm = load_model(
        get_spec("smollm2-135m-instruct"), cache_dir=tmp_path, device="cpu", dtype=torch.float32
    )
    assert lm.count_tokens("Hello world") == 2


def test_minilm_encodes_normalised_vectors(minilm: SentenceEmbedder) -> None:
    vectors = minilm.encode(
        ["A man is playing a guitar.", "Someone plays the guitar.", "Stocks fell sharply today."],
        batch_size=2,
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        minilm.encode(["x"], batch_size=0)
