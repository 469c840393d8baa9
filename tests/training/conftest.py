"""Fixtures of the training tests: a real teacher's records (the shipped PaLM-540B outputs) in the
extraction output format, written into the run's temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def esnli_rationales(tmp_path_factory) -> Path:
    from stepwise.extraction.run import main as extract

    return extract(task="esnli", out=tmp_path_factory.mktemp("esnli-rationales") / "extract", teacher="replay")
