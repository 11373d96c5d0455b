"""The API's one model: the embedder for search queries, loaded lazily on first use."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from models.backends.sentence import Embedder


class LazyEmbedder:
    """Loads the embedding model the first time a query is embedded (never at import)."""

    def __init__(
        self, *, model: str, cache_dir: Path, device: str = "cpu", runtime: str = "torch"
    ) -> None:
        self.model = model
        self.runtime = runtime
        self._cache_dir = cache_dir
        self._device = device
        self._loaded: Embedder | None = None
        self._lock = threading.Lock()

    def _load(self) -> Embedder:
        with self._lock:
            if self._loaded is None:
                from models.backends import load_model, select_device
                from models.registry import get_spec

                device, dtype = select_device(self._device)
                loaded = load_model(
                    get_spec(self.model),
                    cache_dir=self._cache_dir,
                    device=device,
                    dtype=dtype,
                    runtime=self.runtime,
                )
                self._loaded = loaded  # type: ignore[assignment]
            assert self._loaded is not None
            return self._loaded

    def encode_one(self, text: str) -> np.ndarray:
        return self._load().encode([text])[0]
