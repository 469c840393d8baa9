"""Every shipped `--config` file (stepwise/configs) fits its command's signature: known keys only, values the
argument groups accept. A renamed or removed option fails here, not in a user's GPU run."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from stepwise import artifacts, cli, tasks

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


def test_a_finished_runs_train_config_json_is_a_config_for_the_same_run(tmp_path):
    """`stepwise train --config RUN/train_config.json --out FOLDER` asks for that run again: every key it records is
    an option of `stepwise train`, and the options read from it record the same file."""
    from stepwise.training import train

    def recorded(arguments: dict) -> dict:
        plan = train.Plan(
            out=arguments["out"],
            task=tasks.get_task(arguments["task"], arguments["labels"]),
            student=arguments["student"],
            mode=arguments["mode"],
            data_fraction=arguments["data_fraction"],
            seed=arguments["seed"],
            teacher_labels=False,
            data=arguments["data"],
            optim=arguments["optim"],
            evaluation=arguments["evaluation"],
            compute=arguments["compute"],
            examples=[],
            counts={},
            valid=[],
            test=[],
        )
        return train.train_config(arguments["task"], plan, arguments["rationales"], arguments["vocab_size"])

    flags = ["--task", "esnli", "--rationales", str(tmp_path / "rationales"), "--seed", "3", "--alpha", "0.2",
             "--max-steps", "7", "--eval-limit", "16", "--device", "cpu", "--bf16"]  # fmt: skip
    first = recorded(cli.arguments(train.main, [*flags, "--out", str(tmp_path / "run")]))
    config = tmp_path / "run" / "train_config.json"
    artifacts.write_json(config, first)
    again = recorded(cli.arguments(train.main, ["--config", str(config), "--out", str(tmp_path / "again")]))
    assert again == first and first["alpha"] == 0.2 and first["max_steps"] == 7 and first["bf16"] is True
