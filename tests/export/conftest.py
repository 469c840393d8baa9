"""Students for the other answer styles: a choice task (per-example candidates) and an open one (greedy),
and more exports of the tiny students (the merged decoder layout, the choice task)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def choice_and_open_students(tmp_path_factory) -> dict[str, Path]:
    from stepwise.training.tiny import build_student_folder

    return {
        name: build_student_folder(tmp_path_factory.mktemp(f"tiny-{name}"), "tiny", name, vocab_size=1000)
        for name in ("cqa", "svamp")
    }


@pytest.fixture(scope="session")
def tiny_merged_export_dir(tiny_student_dir, tmp_path_factory) -> Path:
    """The tiny e-SNLI student exported with the merged decoder (one graph, an If on the cache), fp32."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main

    return export_main(
        model=tiny_student_dir,
        out=tmp_path_factory.mktemp("tiny-merged") / "onnx",
        decoder_layout="merged",
        parity=ParityOptions(parity_limit=16),
    )


@pytest.fixture(scope="session")
def cqa_export_dir(choice_and_open_students, tmp_path_factory) -> Path:
    """The tiny CQA student (five choices per example) exported fp32, split layout."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main

    return export_main(
        model=choice_and_open_students["cqa"],
        out=tmp_path_factory.mktemp("tiny-cqa") / "onnx",
        parity=ParityOptions(parity_limit=16),
    )
