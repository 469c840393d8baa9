"""`stepwise bench <name>`: every benchmark is a command with typed options, and importing one does no work."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from stepwise import cli, envs

BENCHMARKS = envs.ROOT / "benchmarks"
NOT_COMMANDS = {"__init__", "harness", "demo", "serving_plain"}  # helpers, `stepwise demo`, the uvicorn baseline app
# What a benchmark may load only once it runs: frameworks, and what starts threads or reads the GPU.
HEAVY = ("torch", "transformers", "onnxruntime", "ctranslate2", "vllm", "ray", "numpy", "matplotlib", "httpx")


def run(python, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STEPWISE_INPROCESS"} | {"PYTHONPATH": str(envs.ROOT)}
    return subprocess.run(
        [str(python), *args],
        cwd=envs.ROOT,
        env=env | kwargs.pop("env", {}),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_every_benchmark_module_is_a_command_named_after_it():
    modules = {path.stem for path in BENCHMARKS.glob("*.py")} - NOT_COMMANDS
    assert {module: name for name, (module, _) in cli.BENCHMARKS.items()} == {
        f"benchmarks.{m}": m.replace("_", "-") for m in modules
    }


@pytest.mark.parametrize("module", sorted({p.stem for p in BENCHMARKS.glob("*.py")} - {"__init__", "serving_plain"}))
def test_importing_a_benchmark_does_no_work(module, tmp_path):
    """A fresh interpreter imports the module: no framework loaded, nothing printed, no file or folder made."""
    env_name = dict(cli.BENCHMARKS.values()).get(f"benchmarks.{module}", "student")
    temp = tmp_path / "tmp"
    temp.mkdir()
    probe = (
        f"import importlib, sys; importlib.import_module('benchmarks.{module}'); "
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    )
    result = run(envs.venv_python(env_name), "-c", probe, env={"TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # and nothing else printed
    assert list(temp.iterdir()) == []


def test_bench_alone_lists_every_benchmark_with_a_line():
    result = run(getattr(sys, "_base_executable", sys.executable), "-m", "stepwise", "bench")  # no environment needed
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert set(lines) == set(cli.BENCHMARKS)
    for name, (_, env_name) in cli.BENCHMARKS.items():
        summary = lines[name].split(f"({env_name})", 1)[1].strip()
        assert len(summary) > 20, lines[name]


@pytest.mark.parametrize("name", sorted(cli.BENCHMARKS))
def test_bench_help_lists_the_options_of_main(name):
    """Run by its own environment's python (no re-execution, nothing installed)."""
    module, env_name = cli.BENCHMARKS[name]
    main = importlib.import_module(module).main
    result = run(envs.venv_python(env_name), "-m", "stepwise", "bench", name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: stepwise bench {name}")
    flags = {"--" + option.name.replace("_", "-") for option in cli.options_of(main)}
    assert flags and all(flag in result.stdout for flag in flags)


def test_an_unknown_benchmark_is_refused_with_the_list():
    result = run(sys.executable, "-m", "stepwise", "bench", "exprot")
    assert result.returncode == 1
    assert "unknown benchmark 'exprot'" in result.stderr and "training-memory" in result.stderr


def test_bad_options_are_one_line(tmp_path):
    result = run(sys.executable, "-m", "stepwise", "bench", "export", "--sizes", "huge", "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert "stepwise bench export: error: unknown sizes ['huge']" in result.stderr and "Traceback" not in result.stderr


def test_a_benchmark_runs_as_a_command_and_writes_its_results(tmp_path):
    """training-memory: arithmetic on meta-device models, seconds."""
    result = run(sys.executable, "-m", "stepwise", "bench", "training-memory", "--out", str(tmp_path / "memory"))
    assert result.returncode == 0, result.stderr
    assert f"[stepwise bench training-memory] output: {tmp_path / 'memory.json'}" in result.stdout
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [r["student"] for r in rows] == ["t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl", "t5-v1_1-xxl"]
    assert rows[0]["params"] == 247_577_856  # google/t5-v1_1-base
    assert "| t5-v1_1-xxl |" in (tmp_path / "memory.md").read_text()


def test_the_gpu_check_runs_without_the_stepwise_environments():
    """On a bare GPU box: `python3 -m benchmarks.gpu_train_check` from the checkout, no venv (here: its options)."""
    result = run(getattr(sys, "_base_executable", sys.executable), "-m", "benchmarks.gpu_train_check", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python3 -m benchmarks.gpu_train_check") and "--skip-base" in result.stdout
