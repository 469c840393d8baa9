"""Students for the other answer styles: a choice task (per-example candidates) and an open one (greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def choice_and_open_students(tmp_path_factory) -> dict[str, Path]:
    from stepwise.training.tiny import build_student_folder

    return {name: build_student_folder(tmp_path_factory.mktemp(f"tiny-{name}"), "tiny", name, vocab_size=1000) for name in ("cqa", "svamp")}
