"""The models of one worker process, each loaded once and kept (DESIGN rule 4), and the
engine that computes with them."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.backends import classic, load_model, select_device
from models.backends.causal_lm import CausalLM
from models.backends.sentence import Embedder
from models.registry import get_spec
from workers.engine.engine import Engine, EngineLimits

logger = logging.getLogger("genserve.worker")

MAX_TRAINED_MODELS = 32


class ModelRuntime:
    """Loads models on first use and runs their work on one engine thread.

    Args:
        cache_dir: Where loaders keep converted weights.
        device: "auto", "cpu", "cuda" or "cuda:N" (models.backends.select_device).
        limits: Batch limits of the engine.
        embedding_runtime: How embedding models run on a CPU (models.backends.sentence).
    """

    def __init__(
        self,
        *,
        cache_dir: Path,
        device: str = "auto",
        limits: EngineLimits | None = None,
        embedding_runtime: str = "torch",
    ) -> None:
        self.cache_dir = cache_dir
        self.embedding_runtime = embedding_runtime
        self.device, self.dtype = select_device(device)
        self.engine = Engine(limits)
        self._models: dict[str, Any] = {}
        # Trained checkpoints by sha256, the oldest loaded dropped first past the bound.
        self._trained: dict[str, classic.Trained] = {}
        self._lock = threading.Lock()

    def _get(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                started = time.perf_counter()
                spec = get_spec(name)
                options = {"runtime": self.embedding_runtime} if spec.task == "embedding" else {}
                # On the engine thread, like everything else the models compute (Engine).
                self._models[name] = self.engine.call(
                    lambda: load_model(
                        spec,
                        cache_dir=self.cache_dir,
                        device=self.device,
                        dtype=self.dtype,
                        **options,
                    )
                )
                logger.info(
                    "loaded %s on %s in %.1fs", name, self.device, time.perf_counter() - started
                )
            return self._models[name]

    def chat_model(self, name: str) -> CausalLM:
        model = self._get(name)
        assert isinstance(model, CausalLM), f"{name} is not a chat model"
        return model

    def embedder(self, name: str) -> Embedder:
        assert get_spec(name).task == "embedding", f"{name} is not an embedding model"
        model: Embedder = self._get(name)
        return model

    def trained_model(self, path: Path, sha256: str) -> classic.Trained:
        """A trained checkpoint, loaded once and checked against its registered sha256."""
        with self._lock:
            trained = self._trained.get(sha256)
            if trained is None:
                actual = classic.file_sha256(path)
                if actual != sha256:
                    raise RuntimeError(
                        f"checkpoint {path} has sha256 {actual}, registered as {sha256}"
                    )
                trained = self.engine.call(lambda: classic.load(path, device=self.device))
                if len(self._trained) >= MAX_TRAINED_MODELS:
                    self._trained.pop(next(iter(self._trained)))
                self._trained[sha256] = trained
                logger.info("loaded %s (%s) on %s", path.name, trained.arch, self.device)
            return trained

    def embed(self, name: str, texts: list[str], *, alone: bool = False) -> np.ndarray:
        """Embed texts with model `name` on the engine thread, between decoding steps.

        alone: each text's vector is the one it gets when sent by itself (what an
        embeddings request promises), at some cost for a runtime whose vectors depend on
        their batch (int8).
        """
        embedder = self.embedder(name)
        batch_size = 1 if alone and not embedder.batch_invariant else 64
        return self.engine.call(lambda: embedder.encode(texts, batch_size=batch_size))
