"""Fixtures shared across stages: small models built locally (nothing can come from a hub here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """Student environment only (needs torch/transformers/sentencepiece)."""
    from stepwise.training.tiny import build_student_folder

    return build_student_folder(tmp_path_factory.mktemp("tiny-student"), "tiny", "esnli", vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_student_dir, tmp_path_factory) -> Path:
    """`stepwise export` of tiny_student_dir (fp32, CPU target, parity-gated on 32 valid examples). Student environment only."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main

    return export_main(model=tiny_student_dir, out=tmp_path_factory.mktemp("tiny-export") / "onnx", parity=ParityOptions(parity_limit=32))
