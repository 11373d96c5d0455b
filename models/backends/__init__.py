"""Loaders that turn a `ModelSpec` into a runtime object on a device.

torch is imported inside the functions so that importing this package stays cheap; each
backend module (`smollm2`, `sentence`, `tiny`) is imported only when its model is loaded.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.registry import ModelSpec

if TYPE_CHECKING:
    import torch

    from models.backends.causal_lm import CausalLM
    from models.backends.sentence import Embedder

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def select_device(preference: str = "auto") -> tuple[str, torch.dtype]:
    """Pick the device and dtype to run models on.

    Args:
        preference: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".

    Returns:
        (device, dtype): bfloat16 on CUDA (float16 on GPUs without bfloat16), float32 on CPU.

    Raises:
        ValueError: For an unknown preference, or CUDA requested but not available.
    """
    if not isinstance(preference, str) or not _DEVICE_PATTERN.fullmatch(preference):
        raise ValueError(
            f"device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', got {preference!r}"
        )
    import torch

    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return "cpu", torch.float32
    if not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available")
    device = "cuda" if preference == "auto" else preference
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {preference!r} out of range: CUDA index must be in [0, {count})")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, dtype


def load_model(
    spec: ModelSpec, *, cache_dir: Path, device: str, dtype: torch.dtype, **options: Any
) -> CausalLM | Embedder:
    """Import the spec's loader and build the model with it.

    Args:
        spec: Registry entry; `spec.loader` names the "module:function" to call.
        cache_dir: Folder where loaders may keep converted weights.
        device: Torch device string, e.g. from `select_device`.
        dtype: Torch dtype for the weights.
        options: Passed on to the loader (an embedding model's `runtime`).

    Returns:
        A `CausalLM` for chat models, an embedder for embedding models.
    """
    module_name, _, function_name = spec.loader.partition(":")
    module = importlib.import_module(module_name)
    loader = getattr(module, function_name, None)
    if not callable(loader):
        raise ValueError(f"loader {spec.loader!r} of model {spec.name!r} is not a function")
    model: CausalLM | Embedder = loader(
        spec, cache_dir=Path(cache_dir), device=device, dtype=dtype, **options
    )
    return model
