"""Fixtures of the training tests: a real teacher's records (the shipped PaLM-540B outputs) in the
extraction output format, written into the run's temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepwise import tasks


@pytest.fixture(scope="session")
def esnli_rationales(tmp_path_factory) -> Path:
    from training.data import write_shipped_teacher_records

    return write_shipped_teacher_records(tasks.get_task("esnli"), tmp_path_factory.mktemp("esnli-rationales"))
