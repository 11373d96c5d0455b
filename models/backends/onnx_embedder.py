"""all-MiniLM-L6-v2 on ONNX Runtime: exported once from the packaged model, then run on CPU.

The first load writes `<cache_dir>/onnx/<name>-<digest>/model.onnx` (fp32) and, for the int8
runtime, `model.int8.onnx` beside it; later loads reuse them. The digest covers the model
folder's files, the export recipe and the onnxruntime version, so a new model or a new
runtime gets its own folder. Each file is written to a temporary name and moved into place
with `os.replace`, so a process that loads while another exports sees a whole file or none.

Export path: torch's TorchScript exporter (`dynamo=False`) needs no package beyond torch,
exports in a second or two, and gives the graph that onnxruntime's BERT optimizer fuses
(EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu). The default dynamo
exporter needs onnxscript, and the optimizer fuses no attention in its graph (torch 2.13,
onnxruntime 1.32). Tracing can bake shapes in, so every export is checked against torch on
a padded probe batch before it is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModel

from models.backends.sentence import check_encode_args

logger = logging.getLogger(__name__)

# Bump when the export, optimisation or quantisation steps change: it is part of the digest.
EXPORT_RECIPE = "1"
ONNX_RUNTIMES = ("onnx", "onnx-int8")
FILENAMES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
_EXPECTED_MODULES = [
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
]
_PROBE_TEXTS = [
    "x",
    "Hello there, how are you?",
    "Mean pooling averages the token vectors under the attention mask. " * 40,
]
_MIN_PROBE_COSINE = 0.9999


class MeanPooledEncoder(torch.nn.Module):
    """The transformer, mean pooling over the attention mask and L2 normalisation in one graph.

    Args:
        transformer: A Hugging Face BERT-style encoder.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_type_ids are all zero for single texts; made here so the graph takes two inputs.
        hidden = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state  # (B, T, C)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        # As sentence_transformers.models.Pooling (mean) and Normalize compute them.
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def read_sentence_config(source: Path) -> int:
    """Check the folder is Transformer -> mean Pooling -> Normalize; return its max_seq_length.

    Raises:
        ValueError: If the modules or pooling differ from what the ONNX graph computes.
    """
    modules = [module["type"] for module in json.loads((source / "modules.json").read_text())]
    if modules != _EXPECTED_MODULES:
        raise ValueError(f"ONNX export supports modules {_EXPECTED_MODULES}, got {modules}")
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    modes = sorted(
        key for key, value in pooling.items() if key.startswith("pooling_mode") and value
    )
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"ONNX export supports mean pooling only, got {modes}")
    return int(json.loads((source / "sentence_bert_config.json").read_text())["max_seq_length"])


def load_tokenizer(source: Path, *, max_tokens: int | None) -> Tokenizer:
    """The fast tokenizer from tokenizer.json, without padding, truncating at max_tokens.

    tokenizer.json ships with padding and truncation fixed at 128, which sentence-transformers
    overrides per call; here both are set once, so the object is never reconfigured after.
    """
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.no_padding()
    if max_tokens is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_tokens)
    return tokenizer


def export_folder(cache_dir: Path, source: Path, *, name: str) -> Path:
    """The cache folder for this model folder, recipe and onnxruntime version."""
    digest = hashlib.sha256(f"{EXPORT_RECIPE}\0{ort.__version__}\0".encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return Path(cache_dir) / "onnx" / f"{name}-{digest.hexdigest()[:12]}"


def ensure_exported(folder: Path, source: Path, *, runtime: str) -> Path:
    """Return the ONNX file of runtime in folder, exporting (and quantising) it if missing.

    Args:
        folder: From `export_folder`.
        source: The sentence-transformers model folder.
        runtime: "onnx" or "onnx-int8".

    Returns:
        Path of the ready model file.
    """
    if runtime not in ONNX_RUNTIMES:
        raise ValueError(f"runtime must be one of {ONNX_RUNTIMES}, got {runtime!r}")
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / FILENAMES["onnx"]
    if not fp32.is_file():
        logger.info("exporting %s to %s", source, fp32)
        _write_atomically(fp32, lambda temp: _export_fp32(source, temp))
    target = folder / FILENAMES[runtime]
    if not target.is_file():
        logger.info("quantising %s to %s", fp32, target)
        _write_atomically(target, lambda temp: _quantize(fp32, temp))
    return target


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(name)
    try:
        write(temp)
        temp.chmod(0o644)  # mkstemp makes it 0600; the cache is shared by the service's users
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _export_fp32(source: Path, target: Path) -> None:
    """Trace the pooled encoder to ONNX, fuse it for CPU, and check it against torch."""
    max_tokens = read_sentence_config(source)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    # Eager attention: its graph is the one onnxruntime's Attention fusion recognises.
    transformer = AutoModel.from_pretrained(
        source, local_files_only=True, attn_implementation="eager", dtype=torch.float32
    )
    encoder = MeanPooledEncoder(transformer).eval()
    tokenizer = load_tokenizer(source, max_tokens=max_tokens)
    probe = [encoding.ids for encoding in tokenizer.encode_batch(_PROBE_TEXTS)]
    input_ids, attention_mask = _pad(probe, pad_id=tokenizer.token_to_id("[PAD]") or 0)
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        traced = Path(scratch) / "traced.onnx"
        # Traced on two padded rows of 16 tokens; batch and sequence stay dynamic.
        _trace(encoder, input_ids[:2, :16], attention_mask[:2, :16], traced)
        optimized = optimize_model(
            str(traced),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        )
        fused = optimized.get_fused_operator_statistics()
        if fused.get("Attention", 0) != config.num_hidden_layers:
            logger.warning("attention not fused in the ONNX export (%s): it will run slower", fused)
        optimized.save_model_to_file(str(target))
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (produced,) = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
    cosine = float(np.min(np.sum(produced * expected, axis=1)))
    if cosine < _MIN_PROBE_COSINE:
        raise RuntimeError(f"ONNX export differs from torch: probe cosine {cosine:.6f}")


def _trace(
    encoder: MeanPooledEncoder, input_ids: np.ndarray, attention_mask: np.ndarray, path: Path
) -> None:
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice and tracer notices about baked Python
        # values; the probe check in `_export_fp32` is what tells a wrong trace.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (torch.from_numpy(input_ids), torch.from_numpy(attention_mask)),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            external_data=False,
        )


def _quantize(fp32: Path, target: Path) -> None:
    # Per-channel weights: per-tensor scales brought cosine to torch down to 0.84 on SciFact
    # passages. Only MatMul and Attention: quantising EmbedLayerNormalization's tables costs
    # as much. Activations stay dynamic uint8 (U8S8, the VNNI/AMX kernels on x86).
    quantize_dynamic(
        fp32,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Attention"],
        # The fused contrib ops have no ONNX shape inference; their outputs are float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _pad(token_ids: list[list[int]], *, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row: (input_ids, attention_mask), both int64 of shape (B, T)."""
    width = max(len(ids) for ids in token_ids)
    input_ids = np.full((len(token_ids), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), width), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class OnnxEmbedder:
    """Encodes texts into L2-normalised float32 vectors with an ONNX Runtime session.

    Thread-safe: `InferenceSession.run` may be called concurrently, and the two tokenizers
    are configured once here and only read afterwards (the torch runtime needs a lock because
    transformers reconfigures its tokenizer on every call).

    Args:
        model_file: The exported model (`ensure_exported`).
        source: The sentence-transformers folder, for tokenizer.json and max_seq_length.
        name: Public model name.
        dimension: Embedding width the model produces.
        runtime: "onnx" or "onnx-int8", recorded as `.runtime`.
        threads: Intra-op threads; defaults to the cores this process may use.
    """

    def __init__(
        self,
        model_file: Path,
        source: Path,
        *,
        name: str,
        dimension: int,
        runtime: str,
        threads: int | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle workers sleep instead of spinning: the cores are shared with other processes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(model_file), options, providers=["CPUExecutionProvider"]
        )
        produced = self._session.get_outputs()[0].shape[-1]
        if produced != dimension:
            raise ValueError(f"model {name!r} produces dimension {produced}, spec says {dimension}")
        self.name = name
        self.dimension = dimension
        self.runtime = runtime
        # int8 quantises activations with one scale per batch: a text's vector moves a
        # little (up to ~1% cosine) with its neighbours. Embedded alone it is always the same.
        self.batch_invariant = runtime != "onnx-int8"
        self.model_file = model_file
        self._max_tokens = read_sentence_config(source)
        self._truncating = load_tokenizer(source, max_tokens=self._max_tokens)
        self._whole = load_tokenizer(source, max_tokens=None)
        self._pad_id = self._whole.token_to_id("[PAD]") or 0

    @property
    def max_tokens(self) -> int:
        """The longest input, in tokens with the special ones, that is embedded whole."""
        return self._max_tokens

    def encode(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        """Embed texts, longest first in batches of similar length; truncates at max_tokens.

        Args:
            texts: Texts to embed, possibly empty.
            batch_size: Texts per forward pass, >= 1.

        Returns:
            float32 array of shape (len(texts), dimension) with unit-norm rows, in input order.
        """
        check_encode_args(texts, batch_size)
        embeddings = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if len(texts) == 0:
            return embeddings
        token_ids = [encoding.ids for encoding in self._truncating.encode_batch(list(texts))]
        # Sorting keeps each batch's padding small; rows are written back to input positions.
        order = sorted(range(len(texts)), key=lambda index: -len(token_ids[index]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = _pad([token_ids[row] for row in rows], pad_id=self._pad_id)
            (vectors,) = self._session.run(
                None, {"input_ids": input_ids, "attention_mask": attention_mask}
            )
            embeddings[rows] = vectors
        return embeddings

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens included, before any truncation.

        Args:
            texts: Texts to count.

        Returns:
            One count per text.
        """
        return [len(encoding.ids) for encoding in self._whole.encode_batch(list(texts))]

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of each token of text, without special tokens or truncation.

        Args:
            text: The text to tokenize.

        Returns:
            One span per token, in order; `text[start:end]` is the token's piece of text.
        """
        encoding = self._whole.encode(text, add_special_tokens=False)
        return [(start, end) for start, end in encoding.offsets]
