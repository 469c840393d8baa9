"""`stepwise demo`: the whole pipeline on the embedded default, then a report of what it did.

extract (replay teacher) -> train (step-by-step and standard fine-tuning) -> export (int8) -> serve on
loopback and send real requests -> benchmark -> report.md with plots. Every stage runs as the user would
run it (`python -m stepwise <stage>`, each in its own environment); each step's artifact is reused when
already there (unless --force), and every artifact is written whole or not at all, so Ctrl-C loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from stepwise import envs, tasks

MODES = ("step-by-step", "standard-finetune")
STEP_COUNT = 8


def say(step: int, text: str) -> None:
    print(f"\n[demo {step}/{STEP_COUNT}] {text}", flush=True)


def write_json(path: Path, data: dict) -> dict:
    """Whole or not at all: a half-written artifact would be 'reused' on the next run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)
    return data


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def stepwise(*args: str) -> dict:
    """Run `python -m stepwise ARGS` (it re-executes in the stage's environment); return its wall time
    and peak RSS, or stop the demo with the stage's own error."""
    started = time.time()
    env = envs.quiet_runtime_env() | {"PYTHONPATH": str(envs.ROOT)}
    env.pop("STEPWISE_INPROCESS", None)
    process = subprocess.Popen([sys.executable, "-m", "stepwise", *args], cwd=envs.ROOT, env=env)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except KeyboardInterrupt:
        process.wait()
        raise
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[demo] `stepwise {' '.join(args)}` failed (exit {os.waitstatus_to_exitcode(status)}); fix the error above and rerun the demo: finished steps are reused")
    return {"wall_s": round(time.time() - started, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


# ---------------------------------------------------------------- steps


def extract(out: Path, task: str, teacher: str, teacher_model: str, limit: int, force: bool) -> dict:
    folder = out / "extract"
    manifest = read_json(folder / "manifest.json")
    if manifest and manifest["complete"] and not force:
        print(f"reusing {folder} ({manifest['counts']['records']} records)")
        return read_json(out / "extract.json") or {}
    if force:
        shutil.rmtree(folder, ignore_errors=True)
    args = ["extract", "--task", task, "--split", "train", "--teacher", teacher, "--out", str(folder)]
    if teacher == "vllm":
        args += ["--model", teacher_model]
    if limit:
        args += ["--limit", str(limit)]
    return write_json(out / "extract.json", stepwise(*args))


def teacher_cost(out: Path, task: str, teacher: str, extract_run: dict, limit: int, force: bool) -> dict:
    """Cost of teacher predictions per 1k inputs, measured on a real vLLM engine. A replay teacher costs
    nothing to measure, so the demo times a tiny local teacher of the student's own size instead (a lower
    bound: same-size models, so what remains is the few-shot prompt plus the rationale it generates)."""
    result_path = out / "teacher-cost.json"
    if (cached := read_json(result_path)) and not force:
        print(f"reusing {result_path}")
        return cached
    if teacher == "vllm":
        manifest = read_json(out / "extract" / "manifest.json")
        return write_json(result_path, cost_from_manifest(manifest, extract_run, "the teacher model of the run"))
    model_dir = out / "tiny-teacher"
    if not (model_dir / "config.json").exists():
        build = "import sys; from pathlib import Path; from stepwise.extraction.tiny_teacher import build_tiny_teacher; build_tiny_teacher(Path(sys.argv[1]))"
        subprocess.run([str(envs.ensure_env("teacher")), "-c", build, str(model_dir)], check=True, cwd=envs.ROOT,
                       env=envs.quiet_runtime_env() | {"PYTHONPATH": str(envs.ROOT)})
    folder = out / "teacher-cost"
    run = stepwise("extract", "--task", task, "--split", "test", "--limit", str(limit), "--teacher", "vllm", "--model", str(model_dir),
                   "--max-tokens", "64", "--enforce-eager", "--out", str(folder), "--overwrite")
    return write_json(result_path, cost_from_manifest(read_json(folder / "manifest.json"), run, "a tiny random local teacher (2 layers, hidden 128)"))


def cost_from_manifest(manifest: dict, run: dict, teacher_name: str) -> dict:
    records = manifest["counts"]["records"]
    generation_s = manifest["last_run"]["generation_s"]
    return {
        "teacher": teacher_name,
        "records": records,
        "seconds_per_1k": generation_s / records * 1000,
        "startup_s": round(run["wall_s"] - generation_s, 1),
        "peak_rss_mb": run["peak_rss_mb"],
        "tokens_in_per_record": manifest["counts"]["tokens_in"] / records,
        "tokens_out_per_record": manifest["counts"]["tokens_out"] / records,
        "note": "generation time only; the engine's start-up is reported apart",
    }


def train(out: Path, task: str, student: str, mode: str, minutes: float, max_steps: int, learning_rate: float, eval_limit: int, force: bool) -> dict:
    folder = out / "train" / mode
    if (folder / "metrics.json").exists() and not force:
        print(f"reusing {folder}")
    else:
        args = ["train", "--task", task, "--student", student, "--mode", mode, "--out", str(folder), "--max-minutes", str(minutes),
                "--learning-rate", str(learning_rate), "--batch-size", "32", "--eval-every", "100", "--eval-limit", str(eval_limit)]
        if mode != "standard-finetune":
            args += ["--rationales", str(out / "extract")]
        if max_steps:
            args += ["--max-steps", str(max_steps)]
        if force:
            args += ["--force"]
        stepwise(*args)
    return read_json(folder / "metrics.json")


def export(out: Path, target: str, max_accuracy_drop: float, force: bool) -> dict:
    folder = out / "export"
    parity = read_json(folder / "parity.json")
    if parity and parity.get("passed") and not force:
        print(f"reusing {folder}")
        return parity
    # A folder without a passing parity report is a half-finished export: start it again.
    precision = ["--quantize", "int8"] if target == "cpu" else ["--precision", "fp16"]  # int8 for CPU, fp16 (+TensorRT) for GPU
    stepwise("export", "--model", str(out / "train" / "step-by-step"), "--out", str(folder), "--target", target, *precision,
             "--max-accuracy-drop", str(max_accuracy_drop), "--overwrite")
    return read_json(folder / "parity.json")


def serve_and_query(out: Path, requests: int, port: int, force: bool) -> dict:
    """Start `stepwise serve` on loopback, send real test-split requests over HTTP, compare with offline predictions."""
    result_path = out / "serve.json"
    if (cached := read_json(result_path)) and not force:
        print(f"reusing {result_path}")
        return cached
    import httpx

    from stepwise.export.runtime import load_runtime, predict
    from stepwise.serving.lifecycle import wait_ready

    export_dir = out / "export"
    task = tasks.load_task(export_dir)
    examples = tasks.load_split(task, "test")[:requests]
    # One at a time, as the sequential requests below are decoded: int8 dynamic quantization scales
    # activations per batch, so a near-tie can flip with the batch an input lands in.
    runtime = load_runtime(export_dir, threads=1)
    offline = [predict(runtime, [example])[0].label for example in examples]
    env = envs.quiet_runtime_env() | {"PYTHONPATH": str(envs.ROOT), "RAY_AUTH_MODE": "disabled"}
    server = subprocess.Popen([sys.executable, "-m", "stepwise", "serve", "--model", str(export_dir), "--port", str(port), "--run-dir", str(out / "serve")],
                              cwd=envs.ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, timeout_s=240, process=server)
        except (RuntimeError, TimeoutError) as problem:
            raise SystemExit(f"[demo] `stepwise serve`: {problem}") from None
        body = lambda e: {"inputs": {"input": e.input, **({"choices": e.choices} if e.choices else {})}}  # noqa: E731
        with httpx.Client(base_url=url, timeout=60) as client:
            latencies, served = [], []
            for example in examples:
                started = time.perf_counter()
                response = client.post("/v1/predict", json=body(example))
                latencies.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                served.append(response.json()["predictions"][0]["label"])
            explained = client.post("/v1/predict", json=body(examples[0]) | {"explain": True}).json()
        burst = asyncio.run(concurrent_burst(url, [body(e) for e in examples], concurrency=16))
    finally:
        stop_server(server)
    return write_json(result_path, {
        "requests": len(examples),
        "p50_ms": statistics.median(latencies),
        "p95_ms": sorted(latencies)[int(0.95 * (len(latencies) - 1))],
        "agreement_with_offline": sum(a == b for a, b in zip(served, offline)) / len(offline),
        "accuracy": tasks.accuracy(task, served, [e.label for e in examples]),
        "burst": burst,
        "example": {"input": examples[0].input, "gold": examples[0].label, "response": explained},
    })


def stop_server(server: subprocess.Popen) -> None:
    """The server's own Ctrl-C path, so Serve and Ray shut down cleanly; killed if that hangs."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


async def concurrent_burst(url: str, bodies: list[dict], concurrency: int) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(body: dict) -> None:
            async with gate:
                statuses.append((await client.post("/v1/predict", json=body)).status_code)

        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": len(bodies), "ok": statuses.count(200), "requests_per_s": len(bodies) / wall}


def benchmark(out: Path, calls: int, force: bool) -> dict:
    """Label-only latency of the trained student: PyTorch eager vs the ONNX export, greedy vs the fast
    path, each backend in its own process (the export benchmark's worker)."""
    result_path = out / "bench.json"
    if (cached := read_json(result_path)) and not force:
        print(f"reusing {result_path}")
        return cached
    export_config = read_json(out / "export" / "export_config.json")
    env = envs.quiet_runtime_env() | {"PYTHONPATH": str(envs.ROOT), "OMP_NUM_THREADS": "1"}
    backends: dict[str, Any] = {}
    # The export benchmark's worker picks its loader by backend kind; the folder decides the precision.
    for name, backend, path in (("pytorch", "pytorch-eager", out / "train" / "step-by-step"), ("onnx", "ort-fp32", out / "export")):
        spec = {"backend": backend, "path": str(path), "model_dir": str(out / "train" / "step-by-step"), "threads": 1,
                "label_tokens": export_config["max_new_tokens"]["label"], "calls_batch1": calls, "calls_batch16": max(3, calls // 5)}
        print(f"timing {name}", flush=True)
        done = subprocess.run([sys.executable, "-m", "benchmarks.export_bench", "--worker", json.dumps(spec)], cwd=envs.ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"[demo] benchmark of {name} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for row in result["rows"]:
            row.pop("labels")
        backends[name] = result | {"precision": export_config["precision"] if name == "onnx" else "fp32"}
    return write_json(result_path, backends)


# ---------------------------------------------------------------- report


def bench_row(bench: dict, backend: str, batch: int, fast: bool) -> dict:
    return next(r for r in bench[backend]["rows"] if (r["batch"], r["fast_path"]) == (batch, fast))


def write_report(out: Path, task: str, teacher: str, results: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    spec = tasks.get_task(task)
    manifest = read_json(out / "extract" / "manifest.json")
    train_metrics, bench, served, cost, parity = results["train"], results["bench"], results["serve"], results["teacher_cost"], results["parity"]

    accuracy = {mode: m["test"]["accuracy"] for mode, m in train_metrics.items()}
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(list(accuracy), list(accuracy.values()), color=["tab:green", "tab:gray"])
    axis.axhline(manifest["counts"]["teacher_accuracy"] or 0, color="tab:red", linestyle="--", label="teacher on train (shipped PaLM-540B)" if teacher == "replay" else "teacher on train")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{spec.name}: student accuracy by training mode")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(plots / "accuracy_by_mode.png", dpi=110)

    onnx = f"ORT {bench['onnx']['precision']}"
    latency = {
        "PyTorch eager\ngreedy": bench_row(bench, "pytorch", 1, False)["p50_ms"],
        f"{onnx}\ngreedy": bench_row(bench, "onnx", 1, False)["p50_ms"],
        f"{onnx}\nlabel fast path": bench_row(bench, "onnx", 1, True)["p50_ms"],
        f"Ray Serve HTTP\n({onnx} + fast path)": served["p50_ms"],
    }
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(list(latency), list(latency.values()), color=["tab:gray", "tab:blue", "tab:green", "tab:purple"])
    axis.set_ylabel("p50 latency per input, ms (batch 1)")
    axis.set_title("Label-only prediction latency by backend")
    figure.tight_layout()
    figure.savefig(plots / "latency_by_backend.png", dpi=110)

    student_fast = bench_row(bench, "onnx", 16, True)
    student_seconds_per_1k = 1000 / student_fast["throughput_per_s"]
    student_rss = bench["onnx"]["peak_rss_mb"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].bar(["teacher", "student"], [cost["seconds_per_1k"], student_seconds_per_1k], color=["tab:red", "tab:green"])
    axes[0].set_ylabel("seconds per 1k predictions")
    axes[0].set_yscale("log")
    axes[1].bar(["teacher", "student"], [cost["peak_rss_mb"], student_rss], color=["tab:red", "tab:green"])
    axes[1].set_ylabel("peak RSS, MB")
    figure.suptitle("Cost per 1k predictions: teacher (few-shot CoT) vs student (label only)")
    figure.tight_layout()
    figure.savefig(plots / "cost_per_1k.png", dpi=110)

    counts = manifest["counts"]
    rows = "\n".join(f"| {mode} | {m['steps']} | {m['train_minutes']:.1f} | {m['valid']['accuracy']:.3f} | {m['test']['accuracy']:.3f} ({m['test'].get('examples', '?')} examples) |"
                     for mode, m in train_metrics.items())
    example = served["example"]
    text = f"""# stepwise demo report

Task **{spec.name}**, teacher **{teacher}**, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Artifacts are in `{out}`.

## 1. Teacher rationales (`stepwise extract`)
{counts['records']} train records, parse rate {counts['parse_rate']:.1%}, teacher accuracy against gold {counts['teacher_accuracy']:.1%}.

## 2. Students (`stepwise train`)
| mode | steps | minutes | valid accuracy | test accuracy |
|---|---|---|---|---|
{rows}

![accuracy by mode](plots/accuracy_by_mode.png)

A tiny T5 trained from scratch for minutes on a CPU is not the paper's pretrained T5: read these as a check
that the pipeline learns, not as a reproduction (README, Training, has the GPU recipe for that).

## 3. Export (`stepwise export`, {bench['onnx']['precision']})
Parity gate {'passed' if parity['passed'] else 'FAILED'} on {parity['examples']} validation examples: labels equal to PyTorch's for
{parity['fast_path_agreement']:.1%} (label fast path, what serving uses) and {parity['greedy_agreement']:.1%} (greedy); accuracy
{parity['accuracy_pytorch']:.3f} (PyTorch) -> {parity['accuracy_onnx']:.3f} (ONNX). Full report: `export/parity.json`.

## 4. Serving (`stepwise serve`, real HTTP on 127.0.0.1)
{served['requests']} test requests one at a time: p50 {served['p50_ms']:.1f} ms, p95 {served['p95_ms']:.1f} ms; labels equal to offline
prediction for {served['agreement_with_offline']:.1%}; accuracy {served['accuracy']:.3f}. Burst of {served['burst']['requests']} at
concurrency {served['burst']['concurrency']}: {served['burst']['ok']} answered 200, {served['burst']['requests_per_s']:.0f} requests/s.

Example (`"explain": true`): input `{example['input'][:160]!r}`, gold `{example['gold']}`, response `{json.dumps(example['response'])[:400]}`

## 5. Latency and cost
![latency by backend](plots/latency_by_backend.png)

| backend (batch 1, label only) | p50 ms |
|---|---|
""" + "\n".join(f"| {name.replace(chr(10), ' ')} | {ms:.2f} |" for name, ms in latency.items()) + f"""

![cost per 1k predictions](plots/cost_per_1k.png)

| per 1k predictions | seconds | peak RSS MB |
|---|---|---|
| teacher: {cost['teacher']} ({cost['tokens_in_per_record']:.0f} prompt + {cost['tokens_out_per_record']:.0f} generated tokens per input) | {cost['seconds_per_1k']:.1f} | {cost['peak_rss_mb']:.0f} |
| student: {onnx}, label fast path, batch 16 | {student_seconds_per_1k:.2f} | {student_rss:.0f} |

Teacher time: {cost['note']} ({cost['startup_s']:.0f} s). Teacher memory includes the KV cache vLLM reserves up front
(on a CPU, `VLLM_CPU_KVCACHE_SPACE` GiB, 4 by default in stepwise). Figures come from one run on a shared 2-core CPU; compare ratios, not absolutes.
"""
    report = out / "report.md"
    partial = report.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, report)
    return report


# ---------------------------------------------------------------- the recipe


def main(
    task: str = "esnli",
    teacher: Literal["replay", "vllm"] = "replay",
    teacher_model: str = "",
    student: str = "tiny",
    out: Path = Path("runs/demo"),
    train_minutes: float = 4.0,
    max_steps: int = 0,
    train_limit: int = 0,
    learning_rate: float = 0.0,
    eval_limit: int = 300,
    export_target: Literal["cpu", "cuda", "tensorrt"] = "cpu",
    max_accuracy_drop: float = 0.02,
    requests: int = 100,
    teacher_probe: int = 64,
    bench_calls: int = 40,
    port: int = 8765,
    force: bool = False,
) -> int:
    """The whole pipeline on the embedded default (replay teacher on e-SNLI, tiny student), then a report.

    Args:
        task: svamp, cqa, esnli, or a custom dataset path.
        teacher: replay (the shipped PaLM-540B outputs) or vllm (a real teacher; needs --teacher-model).
        teacher_model: vLLM model name or folder for --teacher vllm.
        student: tiny (built locally) or a T5 checkpoint name/folder, e.g. google/t5-v1_1-base.
        out: run folder; every step's artifact lands here and is reused on the next run.
        train_minutes: wall-clock budget of each training run.
        max_steps: cap on training steps per run (0: the time budget decides).
        train_limit: only the first N train examples are extracted (0: all).
        learning_rate: 0: 1e-3 for a student built from scratch (tiny, small), 5e-5 (the paper's) for a checkpoint.
        eval_limit: validation/test examples scored during and after training (0: all).
        export_target: cpu (int8, CPU EP), cuda (fp16, CUDA EP) or tensorrt (fp16, TensorRT EP).
        max_accuracy_drop: the export's parity gate: validation accuracy the ONNX model may lose against PyTorch.
        requests: test requests sent to the served student.
        teacher_probe: inputs the tiny vLLM teacher answers to measure teacher cost (replay teacher only).
        bench_calls: timed calls per backend in the latency benchmark.
        port: HTTP port for the served student (loopback).
        force: redo every step even where its artifact exists.
    """
    if teacher == "vllm" and not teacher_model:
        raise SystemExit("stepwise demo: --teacher vllm needs --teacher-model (a vLLM model name or folder)")
    learning_rate = learning_rate or (1e-3 if student in ("tiny", "small") else 5e-5)
    started = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}

    say(1, f"extract: {teacher} teacher on {task}/train -> {out / 'extract'}")
    extract_run = extract(out, task, teacher, teacher_model, train_limit, force)
    say(2, "teacher cost: a real vLLM engine answering few-shot chain-of-thought prompts")
    results["teacher_cost"] = teacher_cost(out, task, teacher, extract_run, teacher_probe, force)
    results["train"] = {}
    for i, mode in enumerate(MODES):
        say(3 + i, f"train {mode} ({student} student, up to {train_minutes:g} min)")
        results["train"][mode] = train(out, task, student, mode, train_minutes, max_steps, learning_rate, eval_limit, force)
    say(5, f"export the step-by-step student to ONNX ({'int8' if export_target == 'cpu' else 'fp16'}, {export_target}), parity-gated against PyTorch")
    results["parity"] = export(out, export_target, max_accuracy_drop, force)
    say(6, f"serve it on Ray Serve at 127.0.0.1:{port} and send {requests} real requests")
    results["serve"] = serve_and_query(out, requests, port, force)
    say(7, "benchmark label-only latency: PyTorch eager vs ONNX Runtime, greedy vs fast path")
    results["bench"] = benchmark(out, bench_calls, force)
    say(8, "report")
    report = write_report(out, task, teacher, results)
    print(f"\n[demo] done in {(time.time() - started) / 60:.1f} min. Report: {report}", flush=True)
    return 0
