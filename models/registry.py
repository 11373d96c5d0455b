"""Catalogue of the models genserve can serve.

This module must stay importable without torch or transformers: the API process imports it
to validate model names, and only workers load weights (through `models.backends`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FAMILIES = ("transformer", "sentence-embedding")

# The families trained here (models/<arch>.py, behind models.backends.classic): the data
# each trains on, and the sampling tasks each serves. Kept here, free of torch, so the API
# can check requests; tests hold each module's FAMILY to it.
DataKind = Literal["text", "images", "table"]
TRAINED_FAMILIES: dict[str, tuple[DataKind, frozenset[str]]] = {
    "char_rnn": ("text", frozenset({"text"})),
    "vae": ("images", frozenset({"images", "anomaly"})),
    "gan": ("images", frozenset({"images"})),
    "diffusion": ("images", frozenset({"images"})),
    "tabular": ("table", frozenset({"rows"})),
    "autoencoder": ("images", frozenset({"anomaly"})),
}
TASKS = ("chat", "embedding")


@dataclass(frozen=True)
class ModelSpec:
    """Static description of one servable model.

    Attributes:
        name: Public model name used in requests, e.g. "smollm2-135m-instruct".
        family: Architecture family, one of `FAMILIES`.
        task: What the model does, one of `TASKS`.
        loader: "module:function" that builds the runtime object from this spec.
        version: Weights/conversion version, stored with each generation.
        context_length: Tokens (prompt + output) the model accepts.
        max_output_tokens: Upper bound for a request's max_tokens (0 for embedders).
        default_max_tokens: max_tokens used when a request gives none.
        dimension: Embedding width; embedding models only.
        description: Human-readable summary.
    """

    name: str
    family: str
    task: str
    loader: str
    version: str
    context_length: int
    max_output_tokens: int
    default_max_tokens: int = 256
    dimension: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        module, _, function = self.loader.partition(":")
        if not module or not function:
            raise ValueError(f"loader must look like 'module:function', got {self.loader!r}")
        if self.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {self.context_length}")
        if not 0 <= self.max_output_tokens <= self.context_length:
            raise ValueError(
                f"max_output_tokens must be in [0, {self.context_length}], "
                f"got {self.max_output_tokens}"
            )
        if self.task == "embedding":
            if self.dimension is None or self.dimension < 1:
                raise ValueError(f"embedding models need dimension >= 1, got {self.dimension}")
        elif not 1 <= self.default_max_tokens <= self.max_output_tokens:
            raise ValueError(
                f"default_max_tokens must be in [1, {self.max_output_tokens}], "
                f"got {self.default_max_tokens}"
            )


_SPECS = (
    ModelSpec(
        name="smollm2-135m-instruct",
        family="transformer",
        task="chat",
        loader="models.backends.smollm2:load",
        version="q4_1-dequant-1",
        context_length=8192,
        max_output_tokens=2048,
        default_max_tokens=256,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF weights dequantized to a transformers model.",
    ),
    ModelSpec(
        name="all-minilm-l6-v2",
        family="sentence-embedding",
        task="embedding",
        loader="models.backends.sentence:load",
        version="st-1",
        context_length=256,
        max_output_tokens=0,
        dimension=384,
        description="sentence-transformers all-MiniLM-L6-v2, 384-dim normalised embeddings.",
    ),
    ModelSpec(
        name="tiny-random-llama",
        family="transformer",
        task="chat",
        loader="models.backends.tiny:load",
        version="random-seed0-1",
        context_length=512,
        max_output_tokens=256,
        default_max_tokens=16,
        description="Tiny randomly initialised Llama with a byte-level tokenizer, for tests.",
    ),
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name: str) -> ModelSpec:
    """Look up a model by its public name.

    Args:
        name: Public model name.

    Returns:
        The registered `ModelSpec`.

    Raises:
        KeyError: If no model has that name; the message lists the known names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown model {name!r}; known: {known}") from None
