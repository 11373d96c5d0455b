from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models import tabular
from models.backends import classic

TINY = {"hidden_size": 16, "latent_size": 2, "epochs": 10, "batch_size": 32}
CONDITIONED = {**TINY, "condition_columns": ["group", "height"]}


def _table(rows: int = 120) -> classic.Table:
    """age (integers), height (one decimal, follows age), color and group (categories)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(rows):
        group = str(rng.choice(["a", "b"]))
        age = int(rng.integers(20, 60)) + (10 if group == "b" else 0)
        height = 150 + 0.5 * age + rng.normal(0, 3)
        color = str(rng.choice(["red", "green", "blue"]))
        out.append((str(age), f"{height:.1f}", color, group))
    return classic.Table(("age", "height", "color", "group"), out)


TABLE = _table()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One CPU thread: tiny models run faster so, and the results do not vary with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> classic.Trained:
    return classic.train("tabular", CONDITIONED, TABLE, seed=0)


def _rows(trained: classic.Trained, seed: int = 0, **request: object) -> classic.Table:
    sampled = classic.sample(trained, {"task": "rows", "n": 40, **request}, seed=seed)
    assert sampled.table is not None
    return sampled.table


def test_schema_comes_from_the_data(trained: classic.Trained) -> None:
    config = trained.config
    assert config.column_types == {
        "age": "numeric",
        "height": "numeric",
        "color": "categorical",
        "group": "categorical",
    }
    assert config.categories["color"] == ["blue", "green", "red"]
    assert (config.decimals["age"], config.decimals["height"]) == (-1, 1)
    assert config.minimums["age"] == min(int(row[0]) for row in TABLE.rows)


def test_column_types_override() -> None:
    config = tabular.FAMILY.make_config({"column_types": {"age": "categorical"}}, TABLE)
    assert config.column_types["age"] == "categorical" and "age" not in config.means
    with pytest.raises(ValueError, match="color"):
        tabular.FAMILY.make_config({"column_types": {"color": "numeric"}}, TABLE)


def test_rows_keep_column_order_types_and_range(trained: classic.Trained) -> None:
    table = _rows(trained, n=200)
    assert table.columns == TABLE.columns and len(table.rows) == 200
    ages = [row[0] for row in table.rows]
    assert all(age.lstrip("-").isdigit() for age in ages)
    assert all(19 <= int(age) <= 70 for age in ages)
    assert all(len(row[1].partition(".")[2]) == 1 for row in table.rows)
    assert {row[2] for row in table.rows} <= {"red", "green", "blue"}


def test_rows_honour_conditions(trained: classic.Trained) -> None:
    table = _rows(trained, conditions={"group": "b", "height": 175})
    assert all(row[3] == "b" and row[1] == "175.0" for row in table.rows)
    assert {row[3] for row in _rows(trained, n=200).rows} == {"a", "b"}


def test_same_seed_same_rows(trained: classic.Trained) -> None:
    assert _rows(trained, seed=1).rows == _rows(trained, seed=1).rows
    assert _rows(trained, seed=1).rows != _rows(trained, seed=2).rows


def test_training_lowers_the_loss() -> None:
    progress: list[classic.Progress] = []
    overrides = {**TINY, "epochs": 30, "learning_rate": 1e-2}
    classic.train("tabular", overrides, TABLE, seed=0, report=progress.append)
    assert len(progress) == 30
    first, last = progress[0].val_loss, progress[-1].val_loss
    assert first is not None and last is not None and last < first - 0.5


def test_numeric_only_and_categorical_only_tables() -> None:
    numbers = classic.Table(("age", "height"), [row[:2] for row in TABLE.rows])
    words = classic.Table(("color", "group"), [row[2:] for row in TABLE.rows])
    for table in (numbers, words):
        result = classic.train("tabular", {**TINY, "epochs": 2}, table, seed=0)
        assert len(_rows(result).rows) == 40


def test_save_load_round_trip_gives_identical_rows(
    trained: classic.Trained, tmp_path: Path
) -> None:
    path = tmp_path / "tabular.safetensors"
    classic.save(trained, path)
    loaded = classic.load(path)
    assert loaded.config == trained.config
    conditions = {"group": "a"}
    assert _rows(loaded, 5, conditions=conditions) == _rows(trained, 5, conditions=conditions)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"n": 0}, "'n'"),
        ({"n": 10_001}, "'n'"),
        ({"conditions": {"color": "red"}}, "color"),
        ({"conditions": {"group": "c"}}, "group"),
        ({"conditions": {"height": "tall"}}, "height"),
        ({"conditions": ["group"]}, "conditions"),
        ({"task": "text"}, "task"),
    ],
)
def test_bad_request_fields_raise_naming_them(
    trained: classic.Trained, request_fields: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        classic.sample(trained, {"task": "rows", **request_fields})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"latent": 4}, "latent"),
        ({"means": {}}, "means"),
        ({"condition_columns": ["weight"]}, "weight"),
        ({"column_types": {"age": "date"}}, "age"),
        ({"condition_dropout": 2.0}, "condition_dropout"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        classic.train("tabular", overrides, TABLE)


def test_should_stop_raises_stopped() -> None:
    with pytest.raises(classic.Stopped):
        classic.train("tabular", TINY, TABLE, should_stop=lambda: True)
