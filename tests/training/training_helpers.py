"""Helpers of the training tests (the generic ones, running `stepwise` and the processes it started, are in
tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path


def esnli_train(out: Path, rationales: Path, *flags: str) -> list[str]:
    """`stepwise train` arguments of a small step-by-step e-SNLI run of a tiny student; `flags` come last and
    win over the defaults here (argparse keeps the last value of a repeated flag)."""
    return ["train", "--task", "esnli", "--rationales", str(rationales), "--student", "tiny", "--out", str(out),
            "--data-fraction", "0.03", "--learning-rate", "1e-3", "--batch-size", "16", "--eval-limit", "16",
            "--max-input-tokens", "96", "--max-target-tokens", "48", *flags]  # fmt: skip
