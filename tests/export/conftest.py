"""More exports of the tiny students: the merged decoder layout."""

from __future__ import annotations

from pathlib import Path

import pytest


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
