"""The classic generative families behind one interface: train, save, load, sample.

Each family lives in its own module (`models/char_rnn.py`, `models/vae.py`, ...) and
exposes `FAMILY`, an object that follows `Family` below. This module is the only code that
reads and writes their weights (safetensors, with the resolved config in the header), and
it turns uploaded dataset bytes into the tensors a family trains on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import io
import json
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from models.registry import DataKind

# name -> module holding FAMILY; imported on first use.
FAMILY_MODULES = {
    "char_rnn": "models.char_rnn",
    "vae": "models.vae",
    "gan": "models.gan",
    "diffusion": "models.diffusion",
    "tabular": "models.tabular",
    "autoencoder": "models.autoencoder",
}
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Table:
    """A table as read from a CSV: column names and rows of raw strings."""

    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass
class Progress:
    """One report of a training run, made at least once per epoch (numbered from 1)."""

    epoch: int
    step: int
    losses: dict[str, float]
    val_loss: float | None = None


@dataclass
class Sampled:
    """What one sampling call made; exactly the fields of the family's output are set.

    Attributes:
        text: Generated text (char_rnn).
        images: uint8 array (N, H, W) for one channel or (N, H, W, C), values 0-255.
        table: Generated rows, the training table's columns in its order.
        scores: One anomaly score per input sample (higher is more anomalous).
        meta: Per-call facts worth storing (seeds used, steps, threshold...).
    """

    text: str | None = None
    images: np.ndarray | None = None
    table: Table | None = None
    scores: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Data = str | torch.Tensor | Table


class Family(Protocol):
    """What a family module's `FAMILY` object provides.

    `data` is what `parse_dataset` returns for the family's `data_kind`: a str for text,
    a float32 tensor (N, C, H, W) in [0, 1] for images, a `Table` for tables.
    """

    name: str
    data_kind: DataKind
    # Request kinds `sample` accepts: "text", "images", "rows", "anomaly".
    tasks: frozenset[str]

    def make_config(self, overrides: Mapping[str, Any], data: Data) -> Any:
        """The config dataclass: defaults, then overrides, then what the data decides
        (vocabulary, image shape, column schema). ValueError names a bad key or value."""
        ...

    def config_from_dict(self, values: Mapping[str, Any]) -> Any:
        """The config saved in a checkpoint, back as the dataclass."""
        ...

    def build(self, config: Any) -> nn.Module: ...

    def fit(
        self,
        model: nn.Module,
        config: Any,
        train: Data,
        val: Data,
        *,
        device: str,
        generator: torch.Generator,
        report: Callable[[Progress], None],
        should_stop: Callable[[], bool],
    ) -> dict[str, float]:
        """Train in place; return the final metrics (at least "val_loss" when defined).

        Calls `report` at least once per epoch and checks `should_stop` every step;
        when it returns True, fit raises `Stopped`.
        """
        ...

    def sample(
        self,
        model: nn.Module,
        config: Any,
        request: Mapping[str, Any],
        *,
        device: str,
        generator: torch.Generator,
    ) -> Sampled:
        """Sample under torch.inference_mode(); ValueError names a bad request field.

        `request["task"]` is one of `tasks`; the other keys, by task:
        - "text": prefix (str, may be empty), max_length (new characters), temperature
          (0 is greedy), top_k (int or None).
        - "images": n; or interpolate = {from_seed, to_seed, steps, method: "slerp" |
          "linear"} (VAE only);
          steps (diffusion only: DDIM sampling steps).
        - "rows": n, conditions ({column: value}, may be empty).
        - "anomaly": samples, a float32 tensor (N, C, H, W) in [0, 1] like the training
          images.
        Random draws come from `generator` (a CPU generator seeded by the request).
        """
        ...


class Stopped(Exception):
    """Training was cancelled through `should_stop`."""


def family(name: str) -> Family:
    """The family called `name`; ValueError lists the known ones."""
    module_name = FAMILY_MODULES.get(name)
    if module_name is None:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(FAMILY_MODULES)}")
    result: Family = importlib.import_module(module_name).FAMILY
    return result


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready values."""
    return {f.name: getattr(config, f.name) for f in fields(config)} if config else {}


# ----------------------------------------------------------------------------- datasets


def parse_dataset(kind: DataKind, filename: str, data: bytes) -> Data:
    """Turn an uploaded file into training data; ValueError says what is wrong with it.

    Args:
        kind: The family's data kind.
        filename: The upload's name; its extension picks the format for images.
        data: The file's bytes.

    Returns:
        str (text: UTF-8), float32 tensor (N, C, H, W) in [0, 1] (images: .npz holding one
        array of shape (N, H, W) or (N, H, W, C) or (N, C, H, W), or a .zip of PNG files of
        one size), or a `Table` (CSV with a header row).
    """
    if kind == "text":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"a text dataset must be UTF-8: {exc}") from exc
        if len(text) < 2:
            raise ValueError("the text dataset is empty")
        return text
    if kind == "images":
        lower = filename.lower()
        if lower.endswith(".npz"):
            return _images_from_npz(data)
        if lower.endswith(".zip"):
            return _images_from_zip(data)
        raise ValueError(
            f"an image dataset must be a .npz array or a .zip of PNGs, got {filename!r}"
        )
    if kind == "table":
        return _table_from_csv(data)
    raise ValueError(f"unknown data kind {kind!r}")


# Archives are read in memory, never extracted to disk, so their member names cannot
# point anywhere; what they unpack to is bounded before anything is decompressed (a zip
# bomb of a few kilobytes can declare gigabytes), as are the pixels of each image.
MAX_UNPACKED_BYTES = 1 << 30
MAX_ARCHIVE_MEMBERS = 100_000
MAX_IMAGE_PIXELS = 4096 * 4096


def _check_archive(data: bytes, max_unpacked_bytes: int, *, kind: str) -> None:
    """ValueError unless the zip (or .npz) unpacks to at most max_unpacked_bytes.

    The sizes checked are the ones the archive declares; zipfile stops every member at
    its declared size, so a member that lies about it cannot unpack to more.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a readable {kind} file: {exc}") from exc
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise ValueError(
            f"the archive holds {len(members)} files; the limit is {MAX_ARCHIVE_MEMBERS}"
        )
    unpacked = sum(member.file_size for member in members)
    if unpacked > max_unpacked_bytes:
        raise ValueError(
            f"the archive unpacks to {unpacked} bytes; the limit is {max_unpacked_bytes}"
        )


def _images_from_npz(data: bytes, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> torch.Tensor:
    _check_archive(data, max_unpacked_bytes, kind=".npz")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            names = list(archive.files)
            if not names:
                raise ValueError("the .npz file holds no array")
            # "images" or "x" when there are several arrays; else the only one.
            name = next((n for n in ("images", "x", "X") if n in names), names[0])
            array = np.asarray(archive[name])
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(f"not a readable .npz file: {exc}") from exc
    return _to_image_tensor(array)


def _images_from_zip(data: bytes, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    _check_archive(data, max_unpacked_bytes, kind=".zip")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a readable .zip file: {exc}") from exc
    names = sorted(n for n in archive.namelist() if n.lower().endswith(".png"))
    if not names:
        raise ValueError("the .zip file holds no .png files")
    arrays = []
    for name in names:
        try:
            with Image.open(io.BytesIO(archive.read(name))) as image:
                # The header is read, the pixels not yet: refuse a decompression bomb here.
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"{name!r} is {image.width}x{image.height} pixels; the limit is "
                        f"{MAX_IMAGE_PIXELS} pixels an image"
                    )
                arrays.append(
                    np.asarray(
                        image.convert("L" if image.mode in ("L", "1", "P", "I;16") else "RGB")
                    )
                )
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{name!r} is not a readable PNG: {exc}") from exc
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"the PNGs must all have one size, got {sorted(shapes)}")
    return _to_image_tensor(np.stack(arrays))


def _to_image_tensor(array: np.ndarray) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) pixels -> float32 (N, C, H, W) in [0, 1].

    Pixels are uint8 (0-255, as in PNG files) or floats in [0, 1]. One fixed convention,
    not a per-file rescaling, so samples scored later see the scale the model trained on.
    """
    if array.dtype.kind not in "uif" or array.ndim not in (3, 4):
        raise ValueError(
            f"images must be a numeric array (N, H, W) or (N, H, W, C), got {array.dtype} "
            f"of shape {array.shape}"
        )
    if array.ndim == 3:
        array = array[:, None]
    elif array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError("an image dataset needs at least 2 images")
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    else:
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError("the images hold NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"pixels must be uint8 (0-255) or floats in [0, 1]; these are {array.dtype} "
                f"in [{low:g}, {high:g}] (divide by their maximum before uploading)"
            )
    return torch.from_numpy(np.ascontiguousarray(values))


def _table_from_csv(data: bytes) -> Table:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"a CSV dataset must be UTF-8: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError("the CSV file is empty") from None
    columns = tuple(name.strip() for name in header)
    if len(set(columns)) != len(columns) or not all(columns):
        raise ValueError("the CSV header must name every column once")
    rows = []
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(columns):
            raise ValueError(f"CSV line {number} has {len(row)} fields, the header {len(columns)}")
        rows.append(tuple(value.strip() for value in row))
    if len(rows) < 10:
        raise ValueError(f"a table needs at least 10 rows, got {len(rows)}")
    return Table(columns=columns, rows=rows)


def split(data: Data, *, val_fraction: float, seed: int) -> tuple[Data, Data]:
    """A seeded train/validation split: text by its tail, images and rows at random."""
    if isinstance(data, str):
        cut = int(len(data) * (1 - val_fraction))
        return data[:cut], data[cut:]
    count = data.shape[0] if isinstance(data, torch.Tensor) else len(data.rows)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(count * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if isinstance(data, torch.Tensor):
        return data[train_idx], data[val_idx]
    return (
        Table(data.columns, [data.rows[i] for i in train_idx.tolist()]),
        Table(data.columns, [data.rows[i] for i in val_idx.tolist()]),
    )


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Trained:
    """A trained model with everything needed to save and sample it."""

    arch: str
    config: Any
    model: nn.Module
    metrics: dict[str, float]


def train(
    arch: str,
    overrides: Mapping[str, Any],
    data: Data,
    *,
    device: str = "cpu",
    seed: int = 0,
    val_fraction: float = 0.1,
    report: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Trained:
    """Train one family on parsed data: config, seeded split, build, fit.

    Raises:
        ValueError: A bad config key or value, or data the family cannot use.
        Stopped: `should_stop` returned True.
    """
    fam = family(arch)
    config = fam.make_config(overrides, data)
    train_data, val_data = split(data, val_fraction=val_fraction, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    # The initial weights and dropout draw from the global generators: seed them for a
    # repeatable run, and give the process its own state back afterwards.
    with _private_rng(device):
        torch.manual_seed(seed)
        model = fam.build(config).to(device)
        metrics = fam.fit(
            model,
            config,
            train_data,
            val_data,
            device=device,
            generator=generator,
            report=report,
            should_stop=should_stop,
        )
    return Trained(arch=arch, config=config, model=model.eval(), metrics=metrics)


def _private_rng(device: str) -> contextlib.AbstractContextManager[None]:
    """Fork the CPU generator, and the device's own when it is a GPU."""
    target = torch.device(device)
    if target.type != "cuda":
        return torch.random.fork_rng(devices=[])
    index = target.index if target.index is not None else torch.cuda.current_device()
    return torch.random.fork_rng(devices=[index], device_type="cuda")


def save(trained: Trained, path: Path, *, extra: Mapping[str, str] | None = None) -> str:
    """Write the weights and config as one safetensors file; returns its sha256.

    Args:
        trained: What `train` returned.
        path: The file to write (atomically: a temporary file, then a rename).
        extra: More header entries, such as the dataset's sha256.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trained.model.state_dict().items()}
    metadata = {
        "format": FORMAT_VERSION,
        "arch": trained.arch,
        "config": json.dumps(config_dict(trained.config)),
        "metrics": json.dumps(trained.metrics),
        **(extra or {}),
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.chmod(0o644)  # read by every worker and API process, whatever their user
    temporary.replace(path)
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    """The file's sha256 (service.checkpoints.sha256_of is the same, without torch)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def load(path: Path, *, device: str = "cpu") -> Trained:
    """Read a checkpoint written by `save`, ready to sample on `device`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT_VERSION or "arch" not in metadata:
        raise ValueError(f"{path} is not a genserve checkpoint (format {FORMAT_VERSION})")
    fam = family(metadata["arch"])
    config = fam.config_from_dict(json.loads(metadata["config"]))
    with _private_rng("cpu"):  # the initial weights, overwritten below, draw from it
        model = fam.build(config)
    model.load_state_dict(load_file(str(path)))
    return Trained(
        arch=metadata["arch"],
        config=config,
        model=model.to(device).eval(),
        metrics=json.loads(metadata.get("metrics", "{}")),
    )


def sample(
    trained: Trained, request: Mapping[str, Any], *, device: str = "cpu", seed: int = 0
) -> Sampled:
    """Sample a trained model; `seed` makes the call repeatable."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return family(trained.arch).sample(
        trained.model, trained.config, request, device=device, generator=generator
    )


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 image (H, W) or (H, W, C) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
