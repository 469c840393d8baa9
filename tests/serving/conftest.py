"""What the cascade tests need: a student whose margins vary (a random one is sure of everything), and a real
teacher: the tiny random teacher (extraction/tiny_teacher.py) on a vLLM OpenAI server. Serving tests run in the
student environment, which has no vLLM: the teacher environment's Python builds the model and runs the server, as
an operator runs a teacher beside the served student."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stepwise import envs

from helpers import ROOT


def teacher_python() -> Path:
    python = envs.venv_python("teacher")
    if not python.exists():
        pytest.skip(
            f"no teacher environment at {python.parent.parent} (vLLM runs there): `python3 -m stepwise setup` builds it"
        )
    return python


@pytest.fixture(scope="session")
def tiny_teacher_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-teacher")
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    built = subprocess.run(
        [str(teacher_python()), "-m", "stepwise.extraction.tiny_teacher", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def teacher_url(tiny_teacher_model, start_vllm_server, tmp_path_factory) -> str:
    """Base URL of a vLLM OpenAI server on loopback serving the tiny teacher as model "tiny"."""
    with start_vllm_server(
        tiny_teacher_model, tmp_path_factory.mktemp("teacher-server"), python=teacher_python()
    ) as url:
        yield url


def trained_export(folder: Path, mode: str, rationales: list[str] | None, max_target_tokens: int) -> Path:
    """A tiny e-SNLI student trained for 60 steps in `mode`, exported fp32 into `folder`/export."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training import train

    student = train.main(
        task="esnli",
        out=folder / "student",
        rationales=rationales,
        mode=mode,
        vocab_size=1000,
        data=train.DataOptions(max_input_tokens=128, max_target_tokens=max_target_tokens),
        optim=train.OptimOptions(learning_rate=1e-3, batch_size=32, max_steps=60),
        evaluation=train.EvalOptions(eval_every=60, eval_limit=32),
    )
    return export_main(model=student, out=folder / "export", parity=ParityOptions(parity_limit=16))


@pytest.fixture(scope="session")
def trained_export_dir(tmp_path_factory) -> Path:
    """A tiny e-SNLI student trained for 60 steps (standard fine-tuning), exported fp32. A random student puts all
    its probability on the shortest label (margin 1.0 everywhere); 60 steps leave margins spread from ~0 to ~0.5,
    which the cascade ranks by."""
    return trained_export(tmp_path_factory.mktemp("trained-student"), "standard-finetune", None, 16)


@pytest.fixture(scope="session")
def step_by_step_export_dir(tmp_path_factory) -> Path:
    """A tiny e-SNLI student trained step-by-step for 60 steps on the shipped PaLM-540B rationales (replayed), exported
    fp32: its rationales reach another label than its label path for about a third of the test inputs, which the
    consistency signal sends."""
    from stepwise.extraction.run import main as extract

    folder = tmp_path_factory.mktemp("step-by-step-student")
    rationales = [str(extract(task="esnli", out=folder / "extract", teacher="replay"))]
    return trained_export(folder, "step-by-step", rationales, 48)
