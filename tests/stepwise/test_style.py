"""The repository's style, as pyproject.toml's [tool.ruff] sets it: `ruff check .` and `ruff format --check .`
find nothing (run from the repository root with the ruff installed beside this Python)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    """`ruff *args` in the repository root, with the ruff next to sys.executable; skips the test when there is none."""
    binary = Path(sys.executable).with_name("ruff")
    if not binary.exists():
        pytest.skip(f"ruff is not installed beside {sys.executable} (no {binary})")
    return subprocess.run(
        [str(binary), *args, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_check_finds_nothing():
    result = ruff("check")
    assert result.returncode == 0, f"ruff check . found problems:\n{result.stdout}{result.stderr}"


def test_ruff_format_would_change_nothing():
    result = ruff("format", "--check")
    assert result.returncode == 0, f"ruff format --check . would reformat:\n{result.stdout}{result.stderr}"
