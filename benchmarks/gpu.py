"""The GPU path measured in one command: ONNX Runtime fp16 on the CUDA and TensorRT providers, PyTorch bf16 eager,
CTranslate2 on CUDA and the served student, side by side from one run.

The export benchmark's timing (`benchmarks.export.time_backend`: batch 1 and 16, label path and greedy, each
backend alone in a fresh process) on exports written by `stepwise export --target cuda|tensorrt --precision fp16`,
then the serving benchmark's in-process and HTTP measurements (`benchmarks.serving`) on the CUDA export.

A preflight first checks what the path needs: a CUDA device for torch and onnxruntime-gpu's CUDA provider (both
needed: without either, one line names everything missing and the command exits 0 with nothing measured), then
TensorRT (the provider and libnvinfer) and CTranslate2 with CUDA: a box without one of those two runs the rest and
records it under `skipped` with the reason. `--device cpu` runs the same orchestration on the CPU provider in fp32
(what the tests run; the only difference is the providers, the precisions and the device).

    STEPWISE_GPU=1 python3 -m stepwise setup   # onnxruntime-gpu; torch and ctranslate2 wheels carry CUDA
    python3 -m stepwise bench gpu              # -> benchmarks/results/gpu.{json,md}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.export import SIZES, Placement
from benchmarks.harness import RESULTS, ROOT, bench_lock, command_line, in_fresh_process, machine, write_results

TASK = "esnli"


@dataclass(frozen=True)
class Plan:
    """What one device measures: the ONNX targets (exported at `precision`), and where PyTorch and CTranslate2 run
    in what precision."""

    targets: tuple[str, ...]
    precision: str
    placement: Placement


PLANS = {
    "cuda": Plan(("cuda", "tensorrt"), "fp16", Placement("cuda", "bfloat16", "float16")),
    "cpu": Plan(("cpu",), "fp32", Placement("cpu", "float32", "float32")),
}
# Without these the GPU path measures nothing; the other parts are skipped alone.
REQUIRED = ("cuda", "ort-cuda")


def preflight() -> dict[str, str]:
    """What this box lacks for the GPU path, part -> why (empty: nothing). Reads versions and device counts only."""
    import ctypes.util
    import importlib.util

    import ctranslate2
    import onnxruntime
    import torch

    lacks: dict[str, str] = {}
    if not torch.cuda.is_available():
        lacks["cuda"] = "no CUDA device (torch.cuda.is_available() is False)"
    providers, ort = onnxruntime.get_available_providers(), f"onnxruntime {onnxruntime.__version__}"
    if "CUDAExecutionProvider" not in providers:
        lacks["ort-cuda"] = f"{ort} has no CUDAExecutionProvider (STEPWISE_GPU=1 python3 -m stepwise setup installs it)"
    if "TensorrtExecutionProvider" not in providers:
        lacks["tensorrt"] = f"{ort} has no TensorrtExecutionProvider"
    # onnxruntime-gpu lists the TensorRT provider whether or not TensorRT is installed, then falls back to CUDA.
    elif not ctypes.util.find_library("nvinfer") and importlib.util.find_spec("tensorrt_libs") is None:
        lacks["tensorrt"] = "TensorRT is not installed (no libnvinfer on the library path, no tensorrt_libs)"
    if ctranslate2.get_cuda_device_count() == 0:
        lacks["ctranslate2"] = f"ctranslate2 {ctranslate2.__version__} sees no CUDA device"
    return lacks


def backends(plan: Plan, skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Row name -> `time_backend`'s kind and settings, for what `plan` measures and this box has."""
    rows: dict[str, dict[str, Any]] = {
        f"pytorch-{plan.placement.torch_dtype}": {"kind": "pytorch"},
        # a target is skipped under its own name (tensorrt); a missing "cuda" stops the run before this
        **{f"ort-{t}-{plan.precision}": {"kind": "ort", "target": t} for t in plan.targets if t not in skipped},
    }
    if "ctranslate2" not in skipped:
        rows[f"ct2-{plan.placement.device}-{plan.placement.ct2_compute_type}"] = {"kind": "ct2"}
    return rows


def prepare(workdir: Path, size: str, plan: Plan, names: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The student, its parity-gated ONNX export per target and its CTranslate2 conversion: row name -> folder."""
    from ctranslate2.converters import TransformersConverter

    from stepwise import artifacts
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training.tiny import build_student_folder

    model_dir = build_student_folder(workdir / size / "student", size, TASK)
    paths: dict[str, str] = {}
    for name, backend in names.items():
        out = workdir / size / name
        if backend["kind"] == "pytorch":
            paths[name] = str(model_dir)
        elif backend["kind"] == "ort":
            if not (out / artifacts.PARITY).exists():
                export_main(
                    model=model_dir,
                    out=out,
                    target=backend["target"],
                    precision=plan.precision,
                    parity=ParityOptions(parity_limit=64),
                    overwrite=True,
                )
            paths[name] = str(out)
        else:  # CTranslate2 converts the weights to its compute type when it loads them
            if not (out / "model.bin").exists():
                TransformersConverter(str(model_dir)).convert(str(out), force=True)
            paths[name] = str(out)
    exports = [name for name in names if names[name]["kind"] == "ort"]
    config = artifacts.read_export_config(Path(paths[exports[0]]))
    return {
        "model_dir": str(model_dir),
        "paths": paths,
        "serve": paths[exports[0]],  # the first target's export: CUDA on a GPU box
        "label_tokens": config["max_new_tokens"]["label"],
        "configured_providers": {n: artifacts.read_export_config(Path(paths[n]))["providers"] for n in exports},
        "parity": {n: artifacts.read_parity(Path(paths[n])) for n in exports},
    }


def time_size(
    prepared: dict[str, Any], names: dict[str, dict[str, Any]], plan: Plan, calls_batch1: int, calls_batch16: int
) -> list[dict[str, Any]]:
    """Every backend of one size in its own fresh process: the export benchmark's rows, labels compared with
    PyTorch's."""
    from benchmarks.export import time_backend

    rows: list[dict[str, Any]] = []
    reference: dict[tuple[int, bool], list[str]] = {}
    for name, backend in names.items():  # PyTorch first: the labels the others are compared with
        print(f"[bench] {name}", flush=True)
        result = in_fresh_process(
            time_backend,
            env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
            kind=backend["kind"],
            path=prepared["paths"][name],
            model_dir=prepared["model_dir"],
            label_tokens=prepared["label_tokens"],
            threads=1,
            calls_batch1=calls_batch1,
            calls_batch16=calls_batch16,
            placement=plan.placement,
        )
        for row in result["rows"]:
            labels = row.pop("labels")
            expected = reference.setdefault((row["batch"], row["fast_path"]), labels)
            same = sum(a == b for a, b in zip(labels, expected, strict=True)) / len(expected)
            rows.append(row | {"backend": name, "peak_rss_mb": result["peak_rss_mb"], "agreement_with_pytorch": same})
    return rows


def serve(export: Path, workdir: Path, concurrency: Sequence[int], requests: int) -> dict[str, Any]:
    """The serving benchmark on `export`: in-process calls, then `stepwise serve` under load."""
    import json

    from benchmarks import serving

    body = {"inputs": {"premise": "A man plays a guitar on a stage.", "hypothesis": "A person makes music."}}
    body_file = workdir / "body.json"
    body_file.write_text(json.dumps(body))
    direct = serving.in_process(export, body, requests)
    served = serving.measure(serving.DEFAULT, export, workdir, body, body_file, concurrency, requests)
    return {"in_process": direct, "served": served}


def ratios(rows: list[dict[str, Any]], pytorch: str) -> dict[str, dict[str, float]]:
    """Per batch: PyTorch's greedy p50 over each backend's p50 (label path and greedy), from the one run."""
    base = {r["batch"]: r["p50_ms"] for r in rows if r["backend"] == pytorch and not r["fast_path"]}
    return {
        f"batch{batch}": {
            f"{r['backend']} {'label path' if r['fast_path'] else 'greedy'}": p50 / r["p50_ms"]
            for r in rows
            if r["batch"] == batch
        }
        for batch, p50 in base.items()
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['device']}; {report['machine']}"]
    lines += [f"skipped: {part} ({reason})" for part, reason in report["skipped"].items()]
    for size, block in report["sizes"].items():
        lines += [
            "",
            f"**{size} student**",
            "",
            # what the parity gate's sessions ran on: ONNX Runtime falls back to the next provider without a word
            *(
                f"- {name}: {', '.join(gate['providers'])}; parity gate "
                f"{'passed' if gate['passed'] else 'failed'}, label agreement {gate['fast_path_agreement']:.3f}"
                for name, gate in block["parity"].items()
            ),
            "",
            "| backend | path | batch | p50 ms | p95 ms | examples/s | PyTorch greedy p50 / this | labels = PyTorch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in block["rows"]:
            path = "label path" if r["fast_path"] else "greedy"
            ratio = block["ratios"][f"batch{r['batch']}"][f"{r['backend']} {path}"]
            lines.append(
                f"| {r['backend']} | {path} | {r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                f"{r['throughput_per_s']:.0f} | {ratio:.2f}x | {r['agreement_with_pytorch']:.2f} |"
            )
        direct, served = block["serving"]["in_process"], block["serving"]["served"]
        lines += [
            "",
            f"Served ({served['config']}, {block['serving']['export']}): in process p50 {direct['p50_ms']} ms, "
            f"{direct['examples_per_s_batch16']} examples/s in batches of 16",
            "",
            "| clients | p50 ms | requests/s |",
            "|---|---|---|",
        ]
        for point in served["points"]:
            load = point["hey"] or point["httpx"]
            lines.append(f"| {point['clients']} | {load['p50_ms']} | {load['rps']} |")
    return "\n".join(lines)


def main(
    device: Literal["cuda", "cpu"] = "cuda",
    sizes: Sequence[str] = SIZES,
    calls_batch1: int = 60,
    calls_batch16: int = 12,
    concurrency: Sequence[int] = (1, 16),
    requests: int = 400,
    workdir: Path = ROOT / "runs" / "bench-gpu",
    out: Path = RESULTS / "gpu",
) -> Path | None:
    """The GPU path in one run: ONNX Runtime fp16 (CUDA, TensorRT), PyTorch bf16, CTranslate2 on CUDA, serving.

    Args:
        device: cuda; cpu runs the same on the CPU provider in fp32 (the check the tests run)
        sizes: student shapes (tiny, small = t5-small's shape)
        calls_batch1: timed calls per backend and path at batch 1 (after 3 warm-up calls)
        calls_batch16: timed calls per backend and path at batch 16
        concurrency: concurrent clients per serving point
        requests: requests per serving point (half at one client), and in-process calls
        workdir: the students, exports and conversions (reused when rerun), the servers' run folders
        out: result files (.json, .md) without suffix
    """
    if min(calls_batch1, calls_batch16) < 1 or requests < 16:
        raise ValueError(
            f"--calls-batch1 and --calls-batch16 must be 1 or more and --requests 16 or more (one batch of 16), "
            f"got {calls_batch1}, {calls_batch16} and {requests}"
        )
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise ValueError(f"unknown sizes {unknown}; known: {list(SIZES)}")
    plan = PLANS[device]
    lacks = preflight() if device == "cuda" else {}
    if any(part in lacks for part in REQUIRED):
        print(f"stepwise bench gpu: nothing measured: {'; '.join(lacks.values())}", flush=True)
        return None
    names = backends(plan, lacks)
    workdir = Path(workdir).resolve()
    prepared = {size: prepare(workdir, size, plan, names) for size in sizes}
    import ctranslate2
    import onnxruntime
    import torch

    report: dict[str, Any] = {
        "command": command_line(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (check run: CPU provider, fp32)",
        "machine": machine(),
        "task": TASK,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "ctranslate2": ctranslate2.__version__,
        },  # fmt: skip
        "skipped": lacks,
        "sizes": {},
    }
    with bench_lock():
        for size, info in prepared.items():
            rows = time_size(info, names, plan, calls_batch1, calls_batch16)
            serving = serve(Path(info["serve"]), workdir / size, concurrency, requests)
            report["sizes"][size] = {
                "configured_providers": info["configured_providers"],
                "parity": info["parity"],
                "rows": rows,
                "ratios": ratios(rows, next(iter(names))),
                "serving": serving | {"export": Path(info["serve"]).name},
            }
    return write_results(Path(out), report, render(report))
