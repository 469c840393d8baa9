"""Fixtures of the training tests: a real teacher's records (the shipped PaLM-540B outputs) in the extraction
output format; a small learnable task (the label is a deterministic function of the input) with rationales
in that format."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def esnli_rationales(tmp_path_factory) -> Path:
    from stepwise.extraction.run import main as extract

    return extract(task="esnli", out=tmp_path_factory.mktemp("esnli-rationales") / "extract", teacher="replay")


@pytest.fixture(scope="session")
def learnable_words(tmp_path_factory) -> tuple[Path, Path]:
    """A custom task whose label is the category most of its four words belong to (chance: 25%), and its
    rationales as an extraction folder (training/tiny.py writes both)."""
    from stepwise.training.tiny import write_words_task

    return write_words_task(tmp_path_factory.mktemp("learnable"))


@pytest.fixture(scope="session")
def learnable_task(learnable_words) -> Path:
    return learnable_words[0]


@pytest.fixture(scope="session")
def learnable_rationales(learnable_words) -> Path:
    return learnable_words[1]
