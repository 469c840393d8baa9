"""Fixtures shared across stages: small models built locally (nothing can come from a hub here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import harness

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
    """`stepwise export` of tiny_student_dir (fp32, CPU target, parity-gated on 32 valid examples). Student
    environment only."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main

    return export_main(
        model=tiny_student_dir,
        out=tmp_path_factory.mktemp("tiny-export") / "onnx",
        parity=ParityOptions(parity_limit=32),
    )


@pytest.fixture(scope="session")
def custom_nli_rows() -> list[dict]:
    """A custom 3-class NLI dataset as a user would bring it, made from shipped e-SNLI rows: id, premise,
    hypothesis, input (the two joined), label (as text), rationale (the human explanation), completion (PaLM's
    raw chain-of-thought output, run-on included) and split (240 train, 30 valid, 60 test)."""
    from stepwise import tasks

    esnli = tasks.get_task("esnli")
    rows = []
    for split, count in (("train", 240), ("valid", 30), ("test", 60)):
        for example in tasks.load_split(esnli, split)[:count]:
            premise, hypothesis = example.input.removeprefix("Premise: ").split("\nHypothesis: ")
            rows.append(
                {
                    "id": example.id,
                    "premise": premise,
                    "hypothesis": hypothesis,
                    "input": example.input,
                    "label": example.label,
                    "rationale": example.rationale,
                    "completion": example.teacher_completion,
                    "split": split,
                }
            )
    return rows


@pytest.fixture(scope="session")
def start_vllm_server():
    """`with start_vllm_server(model, scratch, python=None) as base_url:` a real vLLM OpenAI server on loopback
    (benchmarks.harness.vllm_openai_server)."""
    return harness.vllm_openai_server


@pytest.fixture(scope="session")
def s3_env():
    """A real S3 server (moto) on loopback for the whole session; its environment (endpoint, credentials) is set
    in this process too, so in-process storage calls and every child process reach it."""
    with harness.s3_server() as env:
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield env
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(s3_env) -> str:
    """s3://<a fresh bucket> on the session's S3 server."""
    return harness.new_bucket()


@pytest.fixture(scope="session")
def choice_and_open_students(tmp_path_factory) -> dict[str, Path]:
    """Students for the other answer styles: a choice task (per-example candidates) and an open one (greedy)."""
    from stepwise.training.tiny import build_student_folder

    return {
        name: build_student_folder(tmp_path_factory.mktemp(f"tiny-{name}"), "tiny", name, vocab_size=1000)
        for name in ("cqa", "svamp")
    }


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
