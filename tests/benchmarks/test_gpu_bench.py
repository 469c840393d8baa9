"""`stepwise bench gpu`: on a box without the GPU path, one line naming what is missing, exit 0, nothing written;
the orchestration itself end to end on the CPU provider (`--device cpu`), the tiny student, few calls."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from benchmarks import gpu
from stepwise import envs


def test_without_the_gpu_path_it_names_what_is_missing_in_one_line_and_measures_nothing(tmp_path):
    lacks = gpu.preflight()
    if not any(part in lacks for part in gpu.REQUIRED):
        pytest.skip("this box has the GPU path: the command measures")
    env = {k: v for k, v in os.environ.items() if k != "STEPWISE_INPROCESS"}
    result = subprocess.run(
        [str(envs.venv_python("student")), "-m", "stepwise", "bench", "gpu",
         "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "gpu")],
        cwd=envs.ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"stepwise bench gpu: nothing measured: {'; '.join(lacks.values())}"]
    assert "no CUDA device" in result.stdout or "CUDAExecutionProvider" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_box_without_tensorrt_or_ctranslate2_on_cuda_measures_the_rest():
    plan = gpu.PLANS["cuda"]
    assert list(gpu.backends(plan, {})) == [
        "pytorch-bfloat16",
        "ort-cuda-fp16",
        "ort-tensorrt-fp16",
        "ct2-cuda-float16",
    ]
    skipped = {"tensorrt": "TensorRT is not installed", "ctranslate2": "ctranslate2 sees no CUDA device"}
    assert list(gpu.backends(plan, skipped)) == ["pytorch-bfloat16", "ort-cuda-fp16"]


def test_the_gpu_run_on_the_cpu_provider_writes_one_results_file_and_a_table(tmp_path):
    written = gpu.main(
        device="cpu",
        sizes=("tiny",),
        calls_batch1=3,
        calls_batch16=2,
        concurrency=(2,),
        requests=16,
        workdir=tmp_path / "work",
        out=tmp_path / "gpu",
    )
    report = json.loads(written.read_text())
    assert report["device"].startswith("cpu") and report["skipped"] == {}
    block = report["sizes"]["tiny"]
    names = ["pytorch-float32", "ort-cpu-fp32", "ct2-cpu-float32"]
    assert [r["backend"] for r in block["rows"]] == [n for n in names for _ in range(4)]  # batch 1, 16 x both paths
    assert all(r["p50_ms"] > 0 and r["agreement_with_pytorch"] == 1.0 for r in block["rows"])  # fp32 everywhere
    assert block["parity"]["ort-cpu-fp32"]["passed"] and block["parity"]["ort-cpu-fp32"]["providers"] == [
        "CPUExecutionProvider"
    ]
    assert block["ratios"]["batch16"]["pytorch-float32 greedy"] == 1.0
    assert set(block["ratios"]["batch1"]) == {f"{n} {p}" for n in names for p in ("label path", "greedy")}
    served = block["serving"]["served"]
    assert block["serving"]["export"] == "ort-cpu-fp32" and [p["clients"] for p in served["points"]] == [2]
    assert served["points"][0]["httpx"]["rps"] > 0 and block["serving"]["in_process"]["p50_ms"] > 0
    table = (tmp_path / "gpu.md").read_text()
    assert "| ort-cpu-fp32 | label path | 16 |" in table and "ort-cpu-fp32: CPUExecutionProvider" in table
