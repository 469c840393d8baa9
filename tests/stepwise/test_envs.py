"""The GPU set-up, checked without a GPU: every package the GPU recipes pin exists on the index, and the pins
agree with what the pinned packages themselves require (a recipe nobody can run here must at least name
packages that exist and fit together)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

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
