"""The one `stepwise` command: options from typed signatures, config overrides, routing to an environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytest

from stepwise import cli, envs


def stage(
    task: str,
    steps: int = 10,
    rate: float = 0.5,
    mode: Literal["a", "b"] = "a",
    out: Path | None = None,
    fast: bool = True,
    names: list[str] | None = None,
) -> dict:
    """A stage for testing.

    Args:
        task: which task.
        steps: how many steps,
            continued on a second line.
    """
    return dict(task=task, steps=steps, rate=rate, mode=mode, out=out, fast=fast, names=names)


def test_options_come_from_the_signature():
    got = cli.call_with_argv(
        stage, ["--task", "cqa", "--steps", "3", "--mode", "b", "--out", "x", "--no-fast", "--names", "p", "q"], "t"
    )
    assert got == dict(task="cqa", steps=3, rate=0.5, mode="b", out=Path("x"), fast=False, names=["p", "q"])
    assert cli.call_with_argv(stage, ["--task", "t", "--names", "p", "--names", "q", "r"], "t")["names"] == [
        "p",
        "q",
        "r",
    ]
    assert cli.call_with_argv(stage, ["--task", "t"], "t")["names"] is None
    help_text = cli.parser_for(stage, "t").format_help()
    assert "how many steps, continued on a second line." in " ".join(help_text.split())


def test_a_sequence_option_keeps_its_tuple_default_and_collects_like_a_list():
    def grid(seeds: Sequence[int] = (0, 1)) -> Sequence[int]:
        return seeds

    assert cli.call_with_argv(grid, [], "t") == (0, 1)
    assert cli.call_with_argv(grid, ["--seeds", "3", "--seeds", "4"], "t") == [3, 4]


def test_bad_options_are_rejected_with_the_reason(capsys):
    for argv, message in [
        ([], "the following arguments are required: --task"),
        (["--task", "x", "--mode", "c"], "invalid choice: 'c'"),
        (["--task", "x", "--steps", "many"], "invalid int value: 'many'"),
    ]:
        with pytest.raises(SystemExit):
            cli.call_with_argv(stage, argv, "t")
        assert message in capsys.readouterr().err


def test_config_file_overrides_defaults_and_flags_win(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('task = "esnli"\nsteps = 7\nrate = 0.1\nnames = ["a", "b"]\n')
    got = cli.call_with_argv(stage, ["--config", str(config), "--rate", "0.9"], "t")
    assert (got["task"], got["steps"], got["rate"], got["names"]) == ("esnli", 7, 0.9, ["a", "b"])
    assert cli.call_with_argv(stage, ["--config", str(config), "--names", "c"], "t")["names"] == ["c"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 1}))
    with pytest.raises(ValueError, match="unknown keys in config file .*bad.json: stepz"):
        cli.call_with_argv(stage, ["--task", "x", "--config", str(bad)], "t")


def test_every_spelling_of_config_is_read_or_refused(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('task = "esnli"\nsteps = 7\n')
    assert cli.call_with_argv(stage, [f"--config={config}"], "t")["steps"] == 7
    assert cli.call_with_argv(stage, ["--steps", "3", "--config", str(config)], "t")["steps"] == 3
    for argv, message in [
        (["--task", "x", "--conf", str(config)], "unrecognized arguments: --conf"),  # no abbreviations
        (["--task", "x", "--config"], "argument --config: expected one argument"),
    ]:
        with pytest.raises(SystemExit):
            cli.call_with_argv(stage, argv, "t")
        assert message in capsys.readouterr().err
    for text, message in [
        ("steps = ", "is not valid TOML"),
        ("[data]\nlearning_rate = 1\n", "unknown keys in config file .*: data"),
    ]:
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            cli.call_with_argv(stage, ["--task", "x", "--config", str(config)], "t")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        cli.call_with_argv(stage, ["--task", "x", "--config", str(tmp_path / "none.toml")], "t")


def test_a_key_under_another_groups_table_is_an_error_naming_both(tmp_path):
    from training.train import main as train_main

    config = tmp_path / "train.toml"
    config.write_text("[data]\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"learning_rate is not an option of \[data\]; it belongs at \[optim"):
        cli.arguments(train_main, ["--task", "esnli", "--config", str(config)])


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        cli.main(["trian"])
    cli.main([])
    assert "data" in capsys.readouterr().out


def test_install_recipe_keeps_the_cpu_torch_and_drops_cuda_extras_from_the_teacher():
    student, teacher = envs.install_steps("student", gpu=False), envs.install_steps("teacher", gpu=False)
    assert (
        student[0][-1] == teacher[0][-1] == "torch==2.13.0"
    )  # the CPU wheel on disk, before anything can pull a CUDA torch
    assert teacher[-1][:2] == ["uninstall", "-y"] and "torchvision" in teacher[-1]
    assert envs.recipe_stamp("student", False) != envs.recipe_stamp("student", True)


def test_data_command_routes_into_its_environment_and_prints_the_table(tmp_path):
    """As a user runs it: the system python re-executes in the student venv (already set up by `stepwise test`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STEPWISE_INPROCESS")}
    system_python = getattr(sys, "_base_executable", sys.executable)  # outside any venv, as a user starts it
    result = subprocess.run(
        [system_python, "-m", "stepwise", "data", "--task", "esnli", "--json-out", str(tmp_path / "d.json")],
        cwd=envs.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    test_row = next(line.split() for line in result.stdout.splitlines() if line.startswith("test "))
    assert test_row[:5] == ["test", "9824", "9824", "100.00%", "72.99%"]
    report = json.loads((tmp_path / "d.json").read_text())
    assert [s["split"] for s in report["splits"]] == ["train", "valid", "test"]


def test_bad_input_from_a_stage_is_one_line_not_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STEPWISE_INPROCESS", "STEPWISE_DEBUG")}
    result = subprocess.run(
        [sys.executable, "-m", "stepwise", "data", "--task", str(tmp_path / "missing.jsonl")],
        cwd=envs.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "stepwise data: error: unknown task" in result.stderr and "Traceback" not in result.stderr


def failing_stage(kind: str) -> None:
    """A stage whose work fails the way the operating system or a missing package does."""
    if kind == "permission":
        raise PermissionError(13, "Permission denied", "/srv/out/model.safetensors")
    if kind == "disk-full":
        raise OSError(28, "No space left on device", "/srv/out/shard-00001.jsonl")
    raise ImportError("mlflow is not installed: pip install mlflow, or leave --report-to off")


@pytest.mark.parametrize(
    "kind,message",
    [
        ("permission", "Permission denied: '/srv/out/model.safetensors'"),
        ("disk-full", "No space left on device: '/srv/out/shard-00001.jsonl'"),
        ("import", "mlflow is not installed: pip install mlflow"),
    ],
)
def test_os_and_import_errors_are_one_line_naming_the_file_or_package(kind, message, monkeypatch):
    monkeypatch.delenv("STEPWISE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as raised:
        cli.run_command(failing_stage, ["--kind", kind], prog="stepwise train")
    assert str(raised.value).startswith("stepwise train: error: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_renamed_flag_still_works_for_a_release_with_a_warning(capsys):
    def command(out: str, overwrite: bool = False) -> tuple[str, bool]:
        return out, overwrite

    argv = cli.renamed_flags(["--out", "x", "--force"], "stepwise train")
    assert cli.call_with_argv(command, argv, "stepwise train") == ("x", True)
    assert (
        "stepwise train: --force is deprecated and goes in the next release: use --overwrite" in capsys.readouterr().err
    )
    assert cli.renamed_flags(["--overwrite", "--out=f"], "stepwise train") == ["--overwrite", "--out=f"]
    # One way to say "on Ray": extract's --ray is --on-ray, as experiment's; --ray-address is left alone.
    assert cli.renamed_flags(["--ray", "--ray-address", "auto"], "stepwise extract") == [
        "--on-ray", "--ray-address", "auto"
    ]  # fmt: skip
