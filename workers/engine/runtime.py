"""The models of one worker process, each loaded once and kept (DESIGN rule 4), and the
engine that computes with them."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.backends import load_model, select_device
from models.backends.causal_lm import CausalLM
from models.backends.sentence import SentenceEmbedder
from models.registry import get_spec
from workers.engine.engine import Engine, EngineLimits

logger = logging.getLogger("genserve.worker")


class ModelRuntime:
    """Loads models on first use and runs their work on one engine thread.

    Args:
        cache_dir: Where loaders keep converted weights.
        device: "auto", "cpu", "cuda" or "cuda:N" (models.backends.select_device).
        limits: Batch limits of the engine.
    """

    def __init__(
        self, *, cache_dir: Path, device: str = "auto", limits: EngineLimits | None = None
    ) -> None:
        self.cache_dir = cache_dir
        self.device, self.dtype = select_device(device)
        self.engine = Engine(limits)
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _get(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                started = time.perf_counter()
                self._models[name] = load_model(
                    get_spec(name), cache_dir=self.cache_dir, device=self.device, dtype=self.dtype
                )
                logger.info(
                    "loaded %s on %s in %.1fs", name, self.device, time.perf_counter() - started
                )
            return self._models[name]

    def chat_model(self, name: str) -> CausalLM:
        model = self._get(name)
        assert isinstance(model, CausalLM), f"{name} is not a chat model"
        return model

    def embedder(self, name: str) -> SentenceEmbedder:
        model = self._get(name)
        assert isinstance(model, SentenceEmbedder), f"{name} is not an embedding model"
        return model

    def embed(self, name: str, texts: list[str]) -> np.ndarray:
        """Embed texts with model `name` on the engine thread, between decoding steps."""
        embedder = self.embedder(name)
        return self.engine.call(lambda: embedder.encode(texts))
