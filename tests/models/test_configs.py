"""The classic families' configs: checked without torch, the same way in API and worker."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from models import configs
from models.backends import classic
from models.registry import TRAINED_FAMILIES


def test_every_trained_family_has_a_spec_whose_fields_exist() -> None:
    assert set(configs.SPECS) == set(TRAINED_FAMILIES) == set(classic.FAMILY_MODULES)
    for arch, spec in configs.SPECS.items():
        names = {f.name for f in fields(spec.config)}
        for key in [*spec.derived, *spec.ranges, *spec.choices]:
            assert key in names, f"{arch}: {key}"


def test_importing_the_configs_does_not_import_torch() -> None:
    code = "import sys, models.configs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_json_numbers_become_the_field_types() -> None:
    checked = configs.check("vae", {"epochs": 3.0, "beta": 1, "widths": [8, 16.0]})
    assert checked == {"epochs": 3, "beta": 1.0, "widths": (8, 16)}
    assert type(checked["epochs"]) is int and type(checked["beta"]) is float
    assert configs.check("gan", {"lr_decay": False}) == {"lr_decay": False}
    assert configs.check("char_rnn", {"cell": "gru"}) == {"cell": "gru"}


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        ("vae", {"epochs": 2.5}, "vae config 'epochs' must be an integer, got 2.5"),
        ("vae", {"epochs": True}, "'epochs' must be an integer"),
        ("vae", {"latent_dim": 0}, r"'latent_dim'=0 is out of range \[1, 256\]"),
        ("gan", {"learning_rate": "fast"}, "'learning_rate' must be a number"),
        ("gan", {"widths": 8}, "'widths' must be a list"),
        ("gan", {"widths": [8, 2]}, r"'widths'=2 is out of range"),
        ("gan", {"lr_decay": 1}, "'lr_decay' must be true or false"),
        ("char_rnn", {"cell": "transformer"}, r"'cell'='transformer' must be one of \['rnn'"),
        ("char_rnn", {"vocab": "abc"}, "'vocab' is set from the data"),
        ("diffusion", {"height": 8}, "'height' is set from the data"),
        ("tabular", {"bogus": 1}, r"unknown config key 'bogus' for tabular; known: \["),
        ("rnn", {}, "unknown architecture 'rnn'"),
    ],
)
def test_a_bad_override_names_the_key_and_what_it_must_be(
    arch: str, overrides: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        configs.check(arch, overrides)
