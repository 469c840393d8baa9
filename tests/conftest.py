"""Fixtures shared across stages: small models built locally (nothing can come from a hub here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stepwise import tasks  # noqa: E402


def build_tiny_student_folder(task_name: str, out: Path) -> Path:
    """A random tiny T5 (untied) with a tokenizer trained on the task's text, saved like a trained student."""
    from training.tiny import build_student, train_tokenizer

    task = tasks.get_task(task_name)
    train = tasks.load_split(task, "train")[:2000]
    texts = [tasks.label_input(e) for e in train] + [tasks.rationale_input(e) for e in train] + [e.label for e in train]
    tokenizer = train_tokenizer(texts, out, vocab_size=1000)
    build_student(tokenizer, "tiny").save_pretrained(out)
    tasks.save_task(task, out)
    return out


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """Student environment only (needs torch/transformers/sentencepiece)."""
    return build_tiny_student_folder("esnli", tmp_path_factory.mktemp("tiny-student"))


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_student_dir, tmp_path_factory) -> Path:
    """`stepwise export` of tiny_student_dir (fp32, CPU target, parity-gated on 32 valid examples). Student environment only."""
    from export.run import main as export_main

    out = tmp_path_factory.mktemp("tiny-export") / "onnx"
    if export_main(model=tiny_student_dir, out=out, parity_limit=32) != 0:
        raise RuntimeError(f"tiny export failed its parity gate: {out / 'parity.json'}")
    return out
