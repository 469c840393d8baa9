"""A shortened `stepwise demo`, run as a user runs it: every stage for real, then the report; a second run reuses.
The demo lives in the checkout (benchmarks/demo.py), on top of the stages and the benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stepwise import envs

from helpers import free_port

pytestmark = pytest.mark.slow

# A 60-step student sits on near-ties, where int8 flips a few validation labels either way: a looser gate
# than the default 0.02 keeps this test about the pipeline, not about rounding noise.
SHORT = [
    "--max-accuracy-drop",
    "0.06",
    "--max-steps",
    "60",
    "--train-limit",
    "300",
    "--eval-limit",
    "24",
    "--requests",
    "8",
    "--teacher-probe",
    "4",
    "--bench-calls",
    "4",
]


def run_demo(out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "STEPWISE_INPROCESS"}
    system_python = getattr(sys, "_base_executable", sys.executable)
    return subprocess.run(
        [system_python, "-m", "stepwise", "demo", "--out", str(out), *SHORT, "--port", str(free_port()), *extra],
        cwd=envs.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (out / "report.md").read_text()
    for heading in ("Teacher rationales", "Students", "Export", "Serving", "Latency and cost", "Cascade"):
        assert heading in report
    for plot in ("plots/accuracy_by_mode", "plots/latency_by_backend", "plots/cost_per_1k", "cascade/cascade"):
        assert (out / f"{plot}.png").stat().st_size > 10_000
    bench = json.loads((out / "bench.json").read_text())  # the export benchmark's timing, a process per backend
    assert {row["batch"] for row in bench["onnx"]["rows"]} == {1, 16} and bench["onnx"]["precision"] == "int8"
    assert bench["pytorch"]["peak_rss_mb"] > 0 and bench["onnx"]["peak_rss_mb"] > 0
    served = json.loads((out / "serve.json").read_text())
    assert served["agreement_with_offline"] == 1.0  # HTTP answers equal offline ONNX predictions
    assert served["burst"]["ok"] == served["requests"] == 8
    assert served["example"]["response"]["predictions"][0]["rationale"] is not None
    assert json.loads((out / "export" / "parity.json").read_text())["passed"]
    for mode in ("step-by-step", "standard-finetune"):
        assert json.loads((out / "train" / mode / "metrics.json").read_text())["steps"] == 60
    cascade = json.loads((out / "cascade" / "cascade.json").read_text())
    assert cascade["examples"] == 24 and cascade["teacher"] == "shipped completions of esnli/test"  # --eval-limit 24
    everything_to_the_teacher = cascade["rows"][-1]
    assert everything_to_the_teacher["teacher_calls"] == 24
    assert everything_to_the_teacher["accuracy"] >= cascade["reference"]["teacher"]  # unreadable answers: the student's
    assert cascade["teacher_per_1k"]["seconds"] > 0  # the tiny vLLM teacher's generation time (the teacher-cost step)
    assert "| sent to the teacher |" in report

    second = run_demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing") == 8  # every step but the report found its artifact


def test_demo_refuses_a_vllm_teacher_without_a_model(tmp_path):
    result = run_demo(tmp_path / "x", "--teacher", "vllm")
    assert result.returncode == 1
    assert "stepwise demo: error: --teacher vllm needs --teacher-model" in result.stderr
    assert "Traceback" not in result.stderr
