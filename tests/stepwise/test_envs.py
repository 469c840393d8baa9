"""The GPU set-up, checked without a GPU: every package the GPU recipes pin exists on the index, and the pins
agree with what the pinned packages themselves require (a recipe nobody can run here must at least name
packages that exist and fit together)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from stepwise import envs

# onnxruntime-gpu stands in for onnxruntime in the GPU student environment (both provide the module).
STANDS_IN_FOR = {"onnxruntime-gpu": "onnxruntime"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(requirements: list[str]) -> dict[str, dict]:
    """pip's resolution of `requirements` alone (no dependencies, nothing installed): name -> metadata."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-deps",
            "--quiet",
            "--report",
            "-",
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"pip could not resolve {requirements}:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    return {canonical(item["metadata"]["name"]): item["metadata"] for item in report["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("env_name", ["student", "teacher"])
def test_gpu_recipe_pins_exist_and_agree(env_name):
    requirements = envs.requirements(env_name, gpu=True)
    exact = {
        canonical(Requirement(r).name): Version(next(iter(Requirement(r).specifier)).version)
        for r in requirements
        if "==" in r
    }
    resolved = resolve(requirements)
    for name, version in exact.items():
        assert name in resolved and Version(resolved[name]["version"]).public == str(version), (
            f"{name}=={version} did not resolve"
        )
    pins = exact | {STANDS_IN_FOR[name]: version for name, version in exact.items() if name in STANDS_IN_FOR}
    disagreements = []
    for package, metadata in resolved.items():
        for text in metadata.get("requires_dist") or []:
            required = Requirement(text)
            if required.marker and not required.marker.evaluate({"extra": ""}):
                continue  # an optional extra's requirement, or one for another platform
            name = canonical(required.name)
            if name in pins and name != package and not required.specifier.contains(pins[name], prereleases=True):
                disagreements.append(f"{package} requires {text}, the recipe pins {name}=={pins[name]}")
    assert not disagreements, disagreements


def test_the_recipes_install_what_pyproject_pins():
    for env_name in ("student", "teacher"):
        cpu, gpu = envs.install_steps(env_name, gpu=False), envs.install_steps(env_name, gpu=True)
        assert cpu[0][-1] == envs.pinned(env_name, False, "torch") == "torch==2.13.0"
        assert not any("torch==" in step[-1] for step in gpu)  # on a CUDA box the index's CUDA torch is the point
    assert envs.install_steps("student", gpu=True)[-1][-1] == envs.pinned("student", True, "onnxruntime-gpu")


def test_a_failed_setup_names_the_package_and_the_log(tmp_path, capsys):
    """pip's output goes to the log, not the terminal; the one-line failure names what pip failed on and the log."""
    log = tmp_path / "student-setup.log"
    log.write_text("")
    missing = ["install", "--no-index", "--find-links", str(tmp_path), "stepwise-no-such-package==1.0"]
    with pytest.raises(SystemExit) as failure:
        envs.run_pip_step(Path(sys.executable), missing, log, "student environment: step 2/2", time.time())
    message = str(failure.value)
    assert "setting up the student environment: step 2/2 failed: package stepwise-no-such-package==1.0" in message
    assert str(log) in message and "No matching distribution found" in log.read_text()
    assert "No matching distribution" not in capsys.readouterr().err


def test_a_first_setup_prints_a_line_per_environment_with_its_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STEPWISE_VENVS", str(tmp_path))
    monkeypatch.setattr(envs, "install_steps", lambda name, gpu: [["--version"], ["list"]])
    python = envs.ensure_env("student")
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines[0]
        == f"[stepwise] setting up the student environment in {tmp_path / 'student'} (first run: a few minutes)"
    )
    assert re.fullmatch(
        rf"\[stepwise\] student environment ready in \d+ s \(pip's output: {tmp_path}/student-setup.log\)", lines[-1]
    )
    assert len(lines) == 2 and "$ pip list" in envs.setup_log("student").read_text()
    assert envs.ensure_env("student") == python and capsys.readouterr().err == ""  # the stamp matches: nothing to do
