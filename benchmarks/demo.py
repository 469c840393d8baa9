"""`stepwise demo`: the whole pipeline on the embedded default, then a report of what it did.

extract (replay teacher) -> train (step-by-step and standard fine-tuning) -> export (int8) -> serve on
loopback and send real requests -> benchmark -> cascade -> report.md with plots. Every stage runs as the user
would run it (`python -m stepwise <stage>`, each in its own environment); each step's artifact is reused when
already there (unless --overwrite), and every artifact is written whole or not at all, so Ctrl-C loses nothing.
It sits on top of the stages and the benchmarks (its latency step is the export benchmark's timing), so it
lives in the checkout beside them.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.export import time_backend
from benchmarks.harness import in_fresh_process
from stepwise import artifacts, envs, tasks
from stepwise.serving.run import serve_args

MODES = ("step-by-step", "standard-finetune")
STEP_COUNT = 9


@dataclass(frozen=True)
class TeacherOptions:
    """The teacher that writes the rationales.

    Args:
        teacher: replay (the shipped PaLM-540B outputs) or vllm (a real teacher; needs --teacher-model).
        teacher_model: vLLM model name or folder for --teacher vllm.
        teacher_probe: inputs the tiny vLLM teacher answers to measure teacher cost (replay teacher only).
    """

    teacher: Literal["replay", "vllm"] = "replay"
    teacher_model: str = ""
    teacher_probe: int = 64

    def __post_init__(self) -> None:
        if self.teacher == "vllm" and not self.teacher_model:
            raise ValueError("--teacher vllm needs --teacher-model (a vLLM model name or folder)")
        if self.teacher_probe < 1:
            raise ValueError(f"--teacher-probe must be 1 or more, got {self.teacher_probe}")


@dataclass(frozen=True)
class StudentOptions:
    """The two students the demo trains (step-by-step and standard fine-tuning).

    Args:
        student: tiny (built locally) or a T5 checkpoint name/folder, e.g. google/t5-v1_1-base.
        train_minutes: wall-clock budget of each training run.
        max_steps: cap on training steps per run (0: the time budget decides).
        train_limit: only the first N train examples are extracted (0: all).
        learning_rate: 0: 1e-3 for a student built from scratch (tiny, small), 5e-5 (the paper's) for a checkpoint.
        eval_limit: validation/test examples scored during and after training, and test inputs of the cascade (0: all
            in training, 1000 in the cascade).
    """

    student: str = "tiny"
    train_minutes: float = 4.0
    max_steps: int = 0
    train_limit: int = 0
    learning_rate: float = 0.0
    eval_limit: int = 300

    def __post_init__(self) -> None:
        if min(self.max_steps, self.train_limit, self.learning_rate, self.eval_limit) < 0 or self.train_minutes <= 0:
            raise ValueError(
                "--train-minutes must be above 0, and --max-steps, --train-limit, --learning-rate and "
                "--eval-limit 0 or more"
            )


@dataclass(frozen=True)
class DeliveryOptions:
    """How the step-by-step student is exported, served and timed.

    Args:
        export_target: cpu (int8, CPU EP), cuda (fp16, CUDA EP) or tensorrt (fp16, TensorRT EP).
        max_accuracy_drop: the export's parity gate: validation accuracy the ONNX model may lose against PyTorch.
        requests: test requests sent to the served student.
        port: HTTP port for the served student (loopback).
        bench_calls: timed calls per backend in the latency benchmark.
    """

    export_target: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    max_accuracy_drop: float = 0.02
    requests: int = 100
    port: int = 8765
    bench_calls: int = 40

    def __post_init__(self) -> None:
        if self.requests < 1 or self.bench_calls < 1:
            raise ValueError(
                f"--requests and --bench-calls must be 1 or more, got {self.requests} and {self.bench_calls}"
            )


def say(step: int, text: str) -> None:
    print(f"\n[demo {step}/{STEP_COUNT}] {text}", flush=True)


def save(path: Path, data: dict) -> dict:
    """A step's result, whole or not at all: a half-written one would be 'reused' on the next run."""
    artifacts.write_json(path, data)
    return data


def reused(path: Path, overwrite: bool) -> dict | None:
    """A step's earlier result, unless --overwrite."""
    if overwrite or not path.exists():
        return None
    print(f"reusing {path}")
    return artifacts.read_json(path, "a result the demo wrote")


def stepwise(*args: str) -> dict:
    """Run `python -m stepwise ARGS` (it re-executes in the stage's environment); return its wall time
    and peak RSS. A failing stage prints its own error; the demo then stops, naming the command."""
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
        raise RuntimeError(
            f"`stepwise {' '.join(args)}` failed (exit {os.waitstatus_to_exitcode(status)}); "
            "fix the error above and rerun the demo: finished steps are reused"
        )
    return {"wall_s": round(time.time() - started, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


# ---------------------------------------------------------------- steps


def extract(out: Path, task: str, teacher: str, teacher_model: str, limit: int, overwrite: bool) -> dict:
    folder = out / "extract"
    manifest = artifacts.read_manifest(folder) if (folder / artifacts.MANIFEST).exists() else None
    if manifest and manifest["complete"] and not overwrite:
        print(f"reusing {folder} ({manifest['counts']['records']} records)")
        return json.loads((out / "extract.json").read_text()) if (out / "extract.json").exists() else {}
    if overwrite:
        shutil.rmtree(folder, ignore_errors=True)
    args = ["extract", "--task", task, "--split", "train", "--teacher", teacher, "--out", str(folder)]
    if teacher == "vllm":
        args += ["--model", teacher_model]
    if limit:
        args += ["--limit", str(limit)]
    return save(out / "extract.json", stepwise(*args))


def teacher_cost(out: Path, task: str, teacher: str, extract_run: dict, limit: int, overwrite: bool) -> dict:
    """Cost of teacher predictions per 1k inputs, measured on a real vLLM engine. A replay teacher costs
    nothing to measure, so the demo times a tiny local teacher of the student's own size instead (a lower
    bound: same-size models, so what remains is the few-shot prompt plus the rationale it generates)."""
    result_path = out / "teacher-cost.json"
    if (cached := reused(result_path, overwrite)) is not None:
        return cached
    folder = teacher_cost_folder(out, teacher)
    if teacher == "vllm":
        cost = cost_from_manifest(artifacts.read_manifest(folder), extract_run, "the teacher model of the run")
        return save(result_path, cost)
    model_dir = out / "tiny-teacher"
    if not (model_dir / "config.json").exists():
        build = (
            "import sys; from pathlib import Path; from stepwise.extraction.tiny_teacher import "
            "build_tiny_teacher; build_tiny_teacher(Path(sys.argv[1]))"
        )
        built = subprocess.run(
            [str(envs.ensure_env("teacher")), "-c", build, str(model_dir)],
            cwd=envs.ROOT,
            env=envs.quiet_runtime_env() | {"PYTHONPATH": str(envs.ROOT)},
        )
        if built.returncode != 0:
            raise RuntimeError(
                f"building the tiny teacher in {model_dir} failed (exit {built.returncode}); see the error above"
            )
    run = stepwise(
        "extract",
        "--task",
        task,
        "--split",
        "test",
        "--limit",
        str(limit),
        "--teacher",
        "vllm",
        "--model",
        str(model_dir),
        "--max-tokens",
        "64",
        "--enforce-eager",
        "--out",
        str(folder),
        "--overwrite",
    )
    tiny = "a tiny random local teacher (2 layers, hidden 128)"
    cost = cost_from_manifest(artifacts.read_manifest(folder), run, tiny)
    return save(result_path, cost)


def teacher_cost_folder(out: Path, teacher: str) -> Path:
    """The extraction whose manifest times the teacher: the run's own for a vLLM teacher, else the tiny teacher's."""
    return out / ("extract" if teacher == "vllm" else "teacher-cost")


def cost_from_manifest(manifest: artifacts.Manifest, run: dict, teacher_name: str) -> dict:
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


def train(out: Path, task: str, mode: str, training: StudentOptions, overwrite: bool) -> dict:
    folder = out / "train" / mode
    if (folder / artifacts.METRICS).exists() and not overwrite:
        print(f"reusing {folder}")
    else:
        learning_rate = training.learning_rate or (1e-3 if training.student in ("tiny", "small") else 5e-5)
        args = [
            "train",
            "--task",
            task,
            "--student",
            training.student,
            "--mode",
            mode,
            "--out",
            str(folder),
            "--max-minutes",
            str(training.train_minutes),
            "--learning-rate",
            str(learning_rate),
            "--batch-size",
            "32",
            "--eval-every",
            "100",
            "--eval-limit",
            str(training.eval_limit),
        ]
        if mode != "standard-finetune":
            args += ["--rationales", str(out / "extract")]
        if training.max_steps:
            args += ["--max-steps", str(training.max_steps)]
        if overwrite:
            args += ["--overwrite"]
        stepwise(*args)
    return artifacts.read_metrics(folder)


def export(out: Path, target: str, max_accuracy_drop: float, overwrite: bool) -> dict:
    folder = out / "export"
    if (folder / artifacts.PARITY).exists() and not overwrite and (parity := artifacts.read_parity(folder))["passed"]:
        print(f"reusing {folder}")
        return parity
    # A folder without a passing parity report is a half-finished export: start it again.
    precision = (
        ["--quantize", "int8"] if target == "cpu" else ["--precision", "fp16"]
    )  # int8 for CPU, fp16 (+TensorRT) for GPU
    stepwise(
        "export",
        "--model",
        str(out / "train" / "step-by-step"),
        "--out",
        str(folder),
        "--target",
        target,
        *precision,
        "--max-accuracy-drop",
        str(max_accuracy_drop),
        "--overwrite",
    )
    return artifacts.read_parity(folder)


def serve_and_query(out: Path, requests: int, port: int, overwrite: bool) -> dict:
    """Start `stepwise serve` on loopback, send real test-split requests over HTTP, compare with offline predictions."""
    result_path = out / "serve.json"
    if (cached := reused(result_path, overwrite)) is not None:
        return cached
    import httpx

    from stepwise.export.runtime import load_runtime, predict
    from stepwise.net import wait_until_ready

    export_dir = out / "export"
    task = tasks.load_task(export_dir)
    examples = tasks.load_split(task, "test")[:requests]
    # One at a time, as the sequential requests below are decoded: int8 dynamic quantization scales
    # activations per batch, so a near-tie can flip with the batch an input lands in.
    runtime = load_runtime(export_dir, threads=1)
    offline = [predict(runtime, [example])[0].label for example in examples]
    env = envs.quiet_runtime_env() | {"PYTHONPATH": str(envs.ROOT), "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "stepwise", *serve_args([export_dir], port, out / "serve")]
    server = subprocess.Popen(command, cwd=envs.ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(f"{url}/healthz", 240, server)
        except (RuntimeError, TimeoutError) as problem:
            raise RuntimeError(f"`stepwise serve` did not come up: {problem}") from None
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
    return save(
        result_path,
        {
            "requests": len(examples),
            "p50_ms": statistics.median(latencies),
            "p95_ms": sorted(latencies)[int(0.95 * (len(latencies) - 1))],
            "agreement_with_offline": sum(a == b for a, b in zip(served, offline, strict=True)) / len(offline),
            "accuracy": tasks.accuracy(task, served, [e.label for e in examples]),
            "burst": burst,
            "example": {"input": examples[0].input, "gold": examples[0].label, "response": explained},
        },
    )


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
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "ok": statuses.count(200),
        "requests_per_s": len(bodies) / wall,
    }


def benchmark(out: Path, calls: int, overwrite: bool) -> dict:
    """Label-only latency of the trained student: PyTorch eager vs the ONNX export, greedy vs the fast
    path, each backend alone in a fresh process (the export benchmark's timing)."""
    result_path = out / "bench.json"
    if (cached := reused(result_path, overwrite)) is not None:
        return cached
    export_config = artifacts.read_export_config(out / "export")
    student = out / "train" / "step-by-step"
    backends: dict[str, Any] = {}
    # The export benchmark's loader by backend kind; the folder decides the precision.
    for name, kind, path in (("pytorch", "pytorch", student), ("onnx", "ort", out / "export")):
        print(f"timing {name}", flush=True)
        result = in_fresh_process(
            time_backend,
            env={"OMP_NUM_THREADS": "1"},
            kind=kind,
            path=path,
            model_dir=student,
            label_tokens=export_config["max_new_tokens"]["label"],
            threads=1,
            calls_batch1=calls,
            calls_batch16=max(3, calls // 5),
        )
        for row in result["rows"]:
            row.pop("labels")
        backends[name] = result | {"precision": export_config["precision"] if name == "onnx" else "fp32"}
    return save(result_path, backends)


def cascade(out: Path, teacher: str, limit: int, overwrite: bool) -> dict | None:
    """`stepwise cascade` on the export: accuracy against the share of test inputs the student hands the teacher
    (least sure first), the teacher's answers being the task's shipped test completions (PaLM-540B for the built-in
    tasks), its cost per 1k the teacher-cost step's. None when the task ships no test completions."""
    folder = out / "cascade"
    if (cached := reused(folder / "cascade.json", overwrite)) is not None:
        return cached
    task = tasks.load_task(out / "export")
    if not any(e.teacher_completion for e in tasks.load_split(task, "test")[:limit]):
        print(f"skipped: {task.name} ships no teacher completions for its test split")
        return None
    stepwise(
        "cascade",
        "--model",
        str(out / "export"),
        "--split",
        "test",
        "--limit",
        str(limit),
        "--teacher-cost",
        str(teacher_cost_folder(out, teacher)),
        "--out",
        str(folder),
    )
    return artifacts.read_json(folder / "cascade.json", "written by `stepwise cascade`")


# ---------------------------------------------------------------- report


def bench_row(bench: dict, backend: str, batch: int, fast: bool) -> dict:
    return next(r for r in bench[backend]["rows"] if (r["batch"], r["fast_path"]) == (batch, fast))


def report_figures(results: dict) -> dict:
    """What the report's plots and tables show, from the steps' results: test accuracy per mode, batch-1 latency
    per backend, the student's cost per 1k predictions."""
    bench = results["bench"]
    onnx = f"ORT {bench['onnx']['precision']}"
    student_fast = bench_row(bench, "onnx", 16, True)
    return {
        "onnx": onnx,
        "accuracy": {mode: m["test"]["accuracy"] for mode, m in results["train"].items()},
        "latency": {
            "PyTorch eager\ngreedy": bench_row(bench, "pytorch", 1, False)["p50_ms"],
            f"{onnx}\ngreedy": bench_row(bench, "onnx", 1, False)["p50_ms"],
            f"{onnx}\nlabel fast path": bench_row(bench, "onnx", 1, True)["p50_ms"],
            f"Ray Serve HTTP\n({onnx} + fast path)": results["serve"]["p50_ms"],
        },
        "student_seconds_per_1k": 1000 / student_fast["throughput_per_s"],
        "student_rss": bench["onnx"]["peak_rss_mb"],
    }


def write_plots(plots: Path, task_name: str, teacher: str, teacher_accuracy: float, figures: dict, cost: dict) -> None:
    """accuracy_by_mode.png, latency_by_backend.png and cost_per_1k.png in `plots`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    accuracy, latency = figures["accuracy"], figures["latency"]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(list(accuracy), list(accuracy.values()), color=["tab:green", "tab:gray"])
    axis.axhline(
        teacher_accuracy,
        color="tab:red",
        linestyle="--",
        label="teacher on train (shipped PaLM-540B)" if teacher == "replay" else "teacher on train",
    )
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{task_name}: student accuracy by training mode")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(plots / "accuracy_by_mode.png", dpi=110)

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(list(latency), list(latency.values()), color=["tab:gray", "tab:blue", "tab:green", "tab:purple"])
    axis.set_ylabel("p50 latency per input, ms (batch 1)")
    axis.set_title("Label-only prediction latency by backend")
    figure.tight_layout()
    figure.savefig(plots / "latency_by_backend.png", dpi=110)

    figure, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].bar(
        ["teacher", "student"],
        [cost["seconds_per_1k"], figures["student_seconds_per_1k"]],
        color=["tab:red", "tab:green"],
    )
    axes[0].set_ylabel("seconds per 1k predictions")
    axes[0].set_yscale("log")
    axes[1].bar(["teacher", "student"], [cost["peak_rss_mb"], figures["student_rss"]], color=["tab:red", "tab:green"])
    axes[1].set_ylabel("peak RSS, MB")
    figure.suptitle("Cost per 1k predictions: teacher (few-shot CoT) vs student (label only)")
    figure.tight_layout()
    figure.savefig(plots / "cost_per_1k.png", dpi=110)
    plt.close("all")


def write_report(out: Path, task: str, teacher: str, results: dict) -> Path:
    """report.md, with its plots in <out>/plots."""
    task_def = tasks.get_task(task)
    manifest = artifacts.read_manifest(out / "extract")
    train_metrics, bench, served = results["train"], results["bench"], results["serve"]
    cost, parity = results["teacher_cost"], results["parity"]
    figures = report_figures(results)
    write_plots(out / "plots", task_def.name, teacher, manifest["counts"]["teacher_accuracy"] or 0, figures, cost)
    onnx, latency = figures["onnx"], figures["latency"]
    student_seconds_per_1k, student_rss = figures["student_seconds_per_1k"], figures["student_rss"]

    counts = manifest["counts"]
    rows = "\n".join(
        f"| {mode} | {m['steps']} | {m['train_minutes']:.1f} | {m['valid']['accuracy']:.3f} | "
        f"{m['test']['accuracy']:.3f} ({m['test'].get('examples', '?')} examples) |"
        for mode, m in train_metrics.items()
    )
    example = served["example"]
    text = (
        f"""# stepwise demo report

Task **{task_def.name}**, teacher **{teacher}**, """
        f"""written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. Artifacts are in `{out}`.

## 1. Teacher rationales (`stepwise extract`)
{counts["records"]} train records, parse rate {counts["parse_rate"]:.1%}, """
        f"""teacher accuracy against gold {counts["teacher_accuracy"]:.1%}.

## 2. Students (`stepwise train`)
| mode | steps | minutes | valid accuracy | test accuracy |
|---|---|---|---|---|
{rows}

![accuracy by mode](plots/accuracy_by_mode.png)

A tiny T5 trained from scratch for minutes on a CPU is not the paper's pretrained T5: read these as a check
that the pipeline learns, not as a reproduction (training/README.md has the GPU recipe for that).

## 3. Export (`stepwise export`, {bench["onnx"]["precision"]})
Parity gate {"passed" if parity["passed"] else "FAILED"} on {parity["examples"]} validation examples: """
        f"""labels equal to PyTorch's for
{parity["fast_path_agreement"]:.1%} (label fast path, what serving uses) """
        f"""and {parity["greedy_agreement"]:.1%} (greedy); accuracy
{parity["accuracy_pytorch"]:.3f} (PyTorch) -> {parity["accuracy_onnx"]:.3f} (ONNX). Full report: `export/parity.json`.

## 4. Serving (`stepwise serve`, real HTTP on 127.0.0.1)
{served["requests"]} test requests one at a time: p50 {served["p50_ms"]:.1f} ms, p95 {served["p95_ms"]:.1f} ms; """
        f"""labels equal to offline
prediction for {served["agreement_with_offline"]:.1%}; accuracy {served["accuracy"]:.3f}. """
        f"""Burst of {served["burst"]["requests"]} at
concurrency {served["burst"]["concurrency"]}: {served["burst"]["ok"]} answered 200, """
        f"""{served["burst"]["requests_per_s"]:.0f} requests/s.

Example (`"explain": true`): input `{example["input"][:160]!r}`, gold `{example["gold"]}`, """
        f"""response `{json.dumps(example["response"])[:400]}`

## 5. Latency and cost
![latency by backend](plots/latency_by_backend.png)

| backend (batch 1, label only) | p50 ms |
|---|---|
""" + "\n".join(f"| {name.replace(chr(10), ' ')} | {ms:.2f} |" for name, ms in latency.items()) + f"""

![cost per 1k predictions](plots/cost_per_1k.png)

| per 1k predictions | seconds | peak RSS MB |
|---|---|---|
| teacher: {cost["teacher"]} ({cost["tokens_in_per_record"]:.0f} prompt + """
        f"""{cost["tokens_out_per_record"]:.0f} generated tokens per input) | """
        f"""{cost["seconds_per_1k"]:.1f} | {cost["peak_rss_mb"]:.0f} |
| student: {onnx}, label fast path, batch 16 | {student_seconds_per_1k:.2f} | {student_rss:.0f} |

Teacher time: {cost["note"]} ({cost["startup_s"]:.0f} s). Teacher memory includes the KV cache vLLM reserves up front
(on a CPU, `VLLM_CPU_KVCACHE_SPACE` GiB, 4 by default in stepwise). """
        f"""Figures come from one run on a shared 2-core CPU; compare ratios, not absolutes.
""" + cascade_section(out, results["cascade"])
    )
    return artifacts.write_atomic(out / "report.md", text)


def cascade_section(out: Path, result: dict | None) -> str:
    """The report's cascade section: `stepwise cascade`'s plot and table."""
    heading = "\n## 6. Cascade (`stepwise cascade`)\n"
    if result is None:
        return heading + "Skipped: the task ships no teacher completions for its test split.\n"
    examples, teacher, seconds = result["examples"], result["teacher"], result["teacher_per_1k"]["seconds"]
    return (
        heading
        + f"""The student answers first and hands its least sure share of the {examples} test inputs
(smallest margin between its two best labels) to the teacher, whose answers are the {teacher}. The teacher's
cost per 1k predictions is the teacher-cost step's ({seconds:.1f} s of generation). Files: `cascade/`.

![cascade](cascade/cascade.png)

{(out / "cascade" / "cascade.md").read_text()}"""
    )


# ---------------------------------------------------------------- the recipe


def main(
    task: str = "esnli",
    out: Path = Path("runs/demo"),
    teaching: TeacherOptions = TeacherOptions(),
    training: StudentOptions = StudentOptions(),
    delivery: DeliveryOptions = DeliveryOptions(),
    overwrite: bool = False,
) -> Path:
    """The whole pipeline on the embedded default (replay teacher on e-SNLI, tiny student), then a report.

    Args:
        task: svamp, cqa, esnli, or a custom dataset path.
        out: run folder; every step's artifact lands here and is reused on the next run.
        teaching: the teacher that writes the rationales.
        training: the two students the demo trains.
        delivery: how the step-by-step student is exported, served and timed.
        overwrite: redo every step even where its artifact exists.
    """
    teacher = teaching.teacher
    started = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}

    say(1, f"extract: {teacher} teacher on {task}/train -> {out / 'extract'}")
    extract_run = extract(out, task, teacher, teaching.teacher_model, training.train_limit, overwrite)
    say(2, "teacher cost: a real vLLM engine answering few-shot chain-of-thought prompts")
    results["teacher_cost"] = teacher_cost(out, task, teacher, extract_run, teaching.teacher_probe, overwrite)
    results["train"] = {}
    for i, mode in enumerate(MODES):
        say(3 + i, f"train {mode} ({training.student} student, up to {training.train_minutes:g} min)")
        results["train"][mode] = train(out, task, mode, training, overwrite)
    precision = "int8" if delivery.export_target == "cpu" else "fp16"
    say(5, f"export the step-by-step student to ONNX ({precision}, {delivery.export_target}), parity-gated")
    results["parity"] = export(out, delivery.export_target, delivery.max_accuracy_drop, overwrite)
    say(6, f"serve it on Ray Serve at 127.0.0.1:{delivery.port} and send {delivery.requests} real requests")
    results["serve"] = serve_and_query(out, delivery.requests, delivery.port, overwrite)
    say(7, "benchmark label-only latency: PyTorch eager vs ONNX Runtime, greedy vs fast path")
    results["bench"] = benchmark(out, delivery.bench_calls, overwrite)
    say(8, "cascade: the student first, its least sure test inputs to the teacher")
    results["cascade"] = cascade(out, teacher, training.eval_limit or 1000, overwrite)
    say(9, "report")
    report = write_report(out, task, teacher, results)
    print(f"\n[demo] done in {(time.time() - started) / 60:.1f} min. Report: {report}", flush=True)
    return out
