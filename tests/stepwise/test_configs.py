"""Every shipped `--config` file (stepwise/configs) fits its command's signature: known keys only, values the
argument groups accept. A renamed or removed option fails here, not in a user's GPU run."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from stepwise import cli

CONFIGS = sorted((Path(cli.__file__).parent / "configs").glob("*.toml"))


def test_there_are_configs_for_the_papers_setting_and_the_grids():
    names = {path.stem for path in CONFIGS}
    assert {"train-paper-t5-base", "experiment-paper-grid", "experiment-cpu-grid"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_fits_its_command(path):
    command = path.stem.split("-")[0]
    assert command in cli.STAGES, f"{path.name}: the file name must start with a command ({', '.join(cli.STAGES)})"
    module, function, _ = cli.STAGES[command]
    stage = getattr(importlib.import_module(module), function)
    arguments = cli.arguments(stage, ["--config", str(path)])
    written = cli.read_config(path, stage)
    # What the file says is what the stage gets (flat keys, or a group's fields).
    for key, value in written.items():
        groups = [v for v in arguments.values() if hasattr(v, "__dataclass_fields__") and key in v.__dataclass_fields__]
        got = getattr(groups[0], key) if groups else arguments[key]
        assert got == value or str(got) == str(value), f"{path.name}: {key} = {got!r}, file says {value!r}"


def test_a_config_key_the_command_does_not_have_is_refused(tmp_path):
    from stepwise.export.run import main as export

    bad = tmp_path / "export-bad.toml"
    bad.write_text('model = "m"\nout = "o"\n[parity]\nparity_limt = 3\n')
    with pytest.raises(ValueError, match="unknown keys in config file .*export-bad.toml: parity_limt"):
        cli.arguments(export, ["--config", str(bad)])
