"""The one interface over the trained families: datasets in, checkpoints out."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backends import classic
from models.registry import TRAINED_FAMILIES
from service import checkpoints
from service.db import training
from service.db.session import make_engine, make_sessionmaker

TEXT = "the tide comes in and the tide goes out. " * 20
TINY_RNN = {
    "hidden_size": 8,
    "embedding_size": 4,
    "num_layers": 1,
    "seq_len": 16,
    "batch_size": 4,
    "epochs": 1,
    "steps_per_epoch": 2,
}


def _npz(array: np.ndarray, name: str = "images") -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: array})
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("arch", sorted(TRAINED_FAMILIES))
def test_each_family_module_matches_the_registry(arch: str) -> None:
    family = classic.family(arch)
    assert family.name == arch
    assert (family.data_kind, family.tasks) == TRAINED_FAMILIES[arch]


def test_images_from_npz_in_every_layout_are_scaled_to_unit_range() -> None:
    pixels = np.arange(4 * 8 * 8).reshape(4, 8, 8).astype(np.uint8)
    for array in (pixels, pixels[..., None], pixels[:, None]):
        images = classic.parse_dataset("images", "d.npz", _npz(array))
        assert images.shape == (4, 1, 8, 8) and images.dtype == torch.float32
        assert images.min() == 0 and images.max() == pytest.approx(255 / 255)
    floats = classic.parse_dataset("images", "d.npz", _npz(pixels / 255.0))
    assert torch.allclose(floats, classic.parse_dataset("images", "d.npz", _npz(pixels)))
    rgb = classic.parse_dataset("images", "c.npz", _npz(np.zeros((3, 4, 4, 3), np.uint8)))
    assert rgb.shape == (3, 3, 4, 4)


def test_images_from_a_zip_of_pngs() -> None:
    gray = np.full((6, 6), 255, np.uint8)
    images = classic.parse_dataset(
        "images", "d.zip", _zip({"a.png": _png(gray), "b.png": _png(gray * 0)})
    )
    assert images.shape == (2, 1, 6, 6)
    assert images[0].min() == 1 and images[1].max() == 0


@pytest.mark.parametrize(
    ("filename", "data", "message"),
    [
        ("d.npy", b"x", "a .npz array or a .zip"),
        ("d.npz", b"not a zip", "not a readable .npz"),
        ("d.npz", _npz(np.zeros((3, 2), np.uint8)), "(N, H, W)"),
        ("d.npz", _npz(np.zeros((1, 4, 4), np.uint8)), "at least 2 images"),
        ("d.npz", _npz(np.full((2, 4, 4), np.nan, np.float32)), "NaN"),
        ("d.npz", _npz(np.full((2, 4, 4), 16, np.int64)), "uint8 (0-255) or floats in [0, 1]"),
        ("d.zip", _zip({"readme.txt": b"hi"}), "no .png files"),
        ("d.zip", _zip({"a.png": b"nope"}), "not a readable PNG"),
        (
            "d.zip",
            _zip(
                {
                    "a.png": _png(np.zeros((4, 4), np.uint8)),
                    "b.png": _png(np.zeros((5, 5), np.uint8)),
                }
            ),
            "one size",
        ),
    ],
)
def test_bad_image_datasets_say_what_is_wrong(filename: str, data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        classic.parse_dataset("images", filename, data)


def test_zip_bombs_are_refused_before_they_unpack() -> None:
    # 8 MB of zeros in a 8 kB archive, against a 4 MB bound; then the same as an .npz.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", bytes(8 << 20))
    assert len(bomb.getvalue()) < 64 << 10
    with pytest.raises(ValueError, match="unpacks to 8388608 bytes; the limit is 4194304"):
        classic._images_from_zip(bomb.getvalue(), max_unpacked_bytes=4 << 20)
    with pytest.raises(ValueError, match="unpacks to"):
        classic._images_from_npz(bomb.getvalue(), max_unpacked_bytes=4 << 20)
    # A PNG whose header declares more pixels than the bound is refused before decoding.
    huge = _png(np.zeros((5000, 5000), np.uint8))
    with pytest.raises(ValueError, match="5000x5000 pixels"):
        classic.parse_dataset("images", "d.zip", _zip({"a.png": huge, "b.png": huge}))


def test_tables_and_text() -> None:
    csv = "a,b\n" + "".join(f"{i},x{i % 2}\n" for i in range(12))
    table = classic.parse_dataset("table", "t.csv", csv.encode())
    assert table.columns == ("a", "b") and len(table.rows) == 12
    with pytest.raises(ValueError, match="line 3 has 1 fields"):
        classic.parse_dataset("table", "t.csv", b"a,b\n1,2\n3\n")
    with pytest.raises(ValueError, match="every column once"):
        classic.parse_dataset("table", "t.csv", b"a,a\n" + b"1,2\n" * 12)
    with pytest.raises(ValueError, match="at least 10 rows"):
        classic.parse_dataset("table", "t.csv", b"a,b\n1,2\n")
    with pytest.raises(ValueError, match="UTF-8"):
        classic.parse_dataset("text", "t.txt", b"\xff\xfe\xfa")


def test_split_is_seeded_and_disjoint() -> None:
    images = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1)
    train, val = classic.split(images, val_fraction=0.25, seed=3)
    again, _ = classic.split(images, val_fraction=0.25, seed=3)
    assert torch.equal(train, again) and len(val) == 5
    assert not set(train.flatten().tolist()) & set(val.flatten().tolist())
    head, tail = classic.split(TEXT, val_fraction=0.1, seed=0)
    assert head + tail == TEXT


def test_checkpoint_round_trip_and_header_read_without_torch(tmp_path: Path) -> None:
    trained = classic.train("char_rnn", TINY_RNN, TEXT, seed=0)
    path = tmp_path / "tides.safetensors"
    digest = classic.save(trained, path, extra={"dataset_sha256": "ab" * 32})
    assert digest == checkpoints.sha256_of(path)
    header = checkpoints.read_header(path)
    assert header.arch == "char_rnn" and header.config["hidden_size"] == 8
    assert header.extra["dataset_sha256"] == "ab" * 32
    assert header.metrics == trained.metrics
    loaded = classic.load(path)
    request = {
        "task": "text",
        "prefix": "the ",
        "max_length": 20,
        "temperature": 1.0,
        "top_k": None,
    }
    assert (
        classic.sample(loaded, request, seed=4).text
        == classic.sample(trained, request, seed=4).text
    )
    (tmp_path / "plain.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="not a genserve checkpoint"):
        checkpoints.read_header(tmp_path / "plain.safetensors")


def test_artifact_paths_stay_in_their_folder(tmp_path: Path) -> None:
    assert checkpoints.resolve("1/m/x.safetensors", tmp_path) == tmp_path / "1/m/x.safetensors"
    assert checkpoints.resolve("builtin:a.safetensors", tmp_path).parent == checkpoints.BUILTIN_DIR
    with pytest.raises(ValueError, match="leaves the artifacts folder"):
        checkpoints.resolve("../../etc/passwd", tmp_path)


def test_builtin_checkpoints_register_once(sqlite_url: str, tmp_path: Path) -> None:
    classic.save(classic.train("char_rnn", TINY_RNN, TEXT), tmp_path / "shipped-rnn.safetensors")
    factory = make_sessionmaker(make_engine(sqlite_url))
    with factory() as session:
        first = checkpoints.register_builtins(session, tmp_path)
        again = checkpoints.register_builtins(session, tmp_path)
        session.commit()
        assert [row.ref for row in first] == ["shipped-rnn:1"] and again == []
        row = training.get_version(session, tenant_id=123, name="shipped-rnn")
        assert row is not None and row.tenant_id is None and row.family == "char_rnn"
        assert row.artifact_path == "builtin:shipped-rnn.safetensors"


def test_training_and_loading_leave_the_global_generator_alone(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    first = classic.train("char_rnn", TINY_RNN, TEXT, seed=3)
    classic.save(first, tmp_path / "a.safetensors")
    classic.load(tmp_path / "a.safetensors")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)  # another global state must not change a seeded run
    second = classic.train("char_rnn", TINY_RNN, TEXT, seed=3)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
