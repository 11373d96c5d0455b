"""The ONNX Runtime embedders against the torch one, with the real all-MiniLM-L6-v2 on CPU."""

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backends.onnx_embedder import FILENAMES, OnnxEmbedder
from models.backends.sentence import RUNTIMES, SentenceEmbedder, load
from models.registry import get_spec

pytestmark = pytest.mark.real_models

SPEC = get_spec("all-minilm-l6-v2")
LONG = " ".join(f"Protein {i} binds receptor {i % 7} in the sampled tissue." for i in range(60))
TEXTS = [
    "Cells divide.",
    "Vitamin D supplements lower the risk of fractures in older adults.",
    "The trial enrolled 412 patients with type 2 diabetes, randomised to metformin or placebo "
    "for two years; the primary outcome was the change in HbA1c, and secondary outcomes "
    "included weight, blood pressure and adverse events reported by the investigators.",
    LONG,
]


def _load(runtime: str, cache_dir: Path) -> SentenceEmbedder | OnnxEmbedder:
    return load(SPEC, cache_dir=cache_dir, device="cpu", dtype=torch.float32, runtime=runtime)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedder-cache")


@pytest.fixture(scope="module")
def embedders(cache_dir: Path) -> dict[str, SentenceEmbedder | OnnxEmbedder]:
    return {runtime: _load(runtime, cache_dir) for runtime in RUNTIMES}


@pytest.fixture(scope="module")
def reference(embedders: dict[str, SentenceEmbedder | OnnxEmbedder]) -> np.ndarray:
    return embedders["torch"].encode(TEXTS)


@pytest.mark.parametrize(("runtime", "least"), [("onnx", 0.999), ("onnx-int8", 0.98)])
def test_onnx_vectors_match_torch(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder],
    reference: np.ndarray,
    runtime: str,
    least: float,
) -> None:
    embedder = embedders[runtime]
    assert embedder.runtime == runtime
    vectors = embedder.encode(TEXTS, batch_size=3)
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * reference, axis=1)
    assert cosines.min() >= least, cosines


def test_long_text_truncated_like_torch(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder],
) -> None:
    onnx = embedders["onnx"]
    assert onnx.max_tokens == embedders["torch"].max_tokens == 256
    assert onnx.count_tokens([LONG]) == embedders["torch"].count_tokens([LONG])
    assert onnx.count_tokens([LONG])[0] > onnx.max_tokens
    # The first max_tokens - 2 tokens ([CLS] and [SEP] take the other two) embed the same.
    kept = onnx.token_spans(LONG)[onnx.max_tokens - 3][1]
    whole, prefix = onnx.encode([LONG, LONG[:kept]])
    assert float(whole @ prefix) >= 0.99999


# int8 activations are quantised with one scale per batch, so a text's int8 vector moves a
# little with the texts batched beside it.
@pytest.mark.parametrize(("runtime", "least"), [("onnx", 0.9999), ("onnx-int8", 0.98)])
def test_order_is_kept_across_length_sorted_batches(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder], runtime: str, least: float
) -> None:
    embedder = embedders[runtime]
    texts = [TEXTS[i] for i in (0, 3, 1, 2, 0, 3, 2)]
    together = embedder.encode(texts, batch_size=2)
    alone = np.concatenate([embedder.encode([text]) for text in texts])
    assert np.sum(together * alone, axis=1).min() >= least


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_empty_list_and_bad_arguments(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder], runtime: str
) -> None:
    embedder = embedders[runtime]
    empty = embedder.encode([])
    assert empty.shape == (0, 384)
    assert empty.dtype == np.float32
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="list of strings"):
        embedder.encode("not a list")  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_token_spans_cut_the_text_at_its_tokens(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder], runtime: str
) -> None:
    text = "Unbelievably, tokenizers split words-with-hyphens and 3.14 into WordPieces. " * 40
    reference = embedders["torch"]
    assert isinstance(reference, SentenceEmbedder)
    pieces = reference.model.tokenizer.tokenize(text)
    spans = embedders[runtime].token_spans(text)
    assert len(spans) == len(pieces) == embedders[runtime].count_tokens([text])[0] - 2 > 256
    assert all(0 <= start < end <= len(text) for start, end in spans)
    assert all(previous[1] <= current[0] for previous, current in itertools.pairwise(spans))
    assert [text[start:end].lower() for start, end in spans] == [
        piece.removeprefix("##") for piece in pieces
    ]


def test_second_load_reuses_the_exported_files(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder], cache_dir: Path
) -> None:
    first = embedders["onnx-int8"]
    assert isinstance(first, OnnxEmbedder)
    folder = first.model_file.parent
    assert folder.parent == cache_dir / "onnx"
    assert sorted(path.name for path in folder.iterdir()) == sorted(FILENAMES.values())
    stamps = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    again = [_load(runtime, cache_dir) for runtime in ("onnx", "onnx-int8")]
    assert {getattr(embedder, "model_file", None) for embedder in again} == {
        folder / name for name in FILENAMES.values()
    }
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == stamps


def test_concurrent_encodes_give_the_sequential_vectors(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder],
) -> None:
    embedder = embedders["onnx"]
    expected = embedder.encode(TEXTS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: embedder.encode(TEXTS, batch_size=2), range(8)))
    for vectors in results:
        assert np.sum(vectors * expected, axis=1).min() >= 0.9999


def test_unknown_runtime_is_refused(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="'torch', 'onnx', 'onnx-int8'"):
        _load("tensorrt", cache_dir)


def test_int8_vectors_embedded_one_at_a_time_do_not_depend_on_their_neighbours(
    embedders: dict[str, SentenceEmbedder | OnnxEmbedder],
) -> None:
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Stock prices fell sharply after the announcement of the quarterly results.",
        "x",
    ]
    int8 = embedders["onnx-int8"]
    assert not int8.batch_invariant
    assert embedders["torch"].batch_invariant and embedders["onnx"].batch_invariant
    alone = int8.encode(texts[:1])[0]
    among = int8.encode(texts, batch_size=1)[0]
    np.testing.assert_allclose(among, alone, atol=1e-6)
