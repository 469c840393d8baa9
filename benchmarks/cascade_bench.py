"""The served cascade under load: `stepwise serve` with the teacher fallback off, on at a margin that sends ~10% of
the requests to the teacher, and with a dead teacher URL (the student's answers must keep flowing), with and without
the cooldown that skips a teacher for a while after it failed, in one run.

The student is a tiny e-SNLI T5 trained briefly (a random one is sure of everything: margin 1.0 on every input),
exported fp32. The teacher is the tiny random teacher (extraction/tiny_teacher.py) on a vLLM OpenAI server on this
CPU: one thread, slow per token, and its answers are noise (readable thanks to structured output); it stands in for
a real teacher's latency shape, not its cost, so its time per fallback is measured and reported on its own. The
margin is calibrated on the student's own margins over the benchmark's inputs (the 200 first e-SNLI test inputs,
each request one of them, in turn): the 10th percentile. Every server runs as `python -m stepwise serve` in its own
process; the load comes from an httpx client (`hey` sends one body over and over, and the share sent to the
teacher depends on the inputs), which also reads who answered each request.

    flock /tmp/stepwise-bench.lock .venv/student/bin/python -m benchmarks.cascade_bench   # -> benchmarks/results/cascade_bench.*
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serving_bench import free_port, stop_server
from stepwise import artifacts, envs, tasks

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEACHER_TOKENS = 320  # the structured answer's longest form: a 300-character rationale line, then the label
SHARE = 0.10  # of the inputs the margin threshold sends to the teacher


# ---------------------------------------------------------------- the student, the inputs, the teacher


def trained_export(workdir: Path, steps: int) -> Path:
    """A tiny e-SNLI student trained `steps` steps (standard fine-tuning), exported fp32 (parity-gated); reused. Not
    int8: barely trained, many of its inputs sit near a decision boundary, where int8 flips enough labels to fail the
    parity gate's accuracy check, and the tiny model's latency is about the same either way (README, Export)."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training import train

    export = workdir / f"export-fp32-{steps}"
    if (export / "parity.json").exists():
        return export
    student = train.main(task="esnli", out=workdir / f"student-{steps}", mode="standard-finetune", vocab_size=1000,
                         data=train.DataOptions(max_input_length=128, max_target_length=16),
                         optim=train.OptimOptions(learning_rate=1e-3, batch_size=32, max_steps=steps),
                         evaluation=train.EvalOptions(eval_every=steps, eval_limit=64))
    return export_main(model=student, out=export, parity=ParityOptions(parity_limit=64), overwrite=True)


def request_bodies(count: int) -> tuple[list[tasks.Example], list[dict]]:
    examples = tasks.load_split(tasks.get_task("esnli"), "test")[:count]
    bodies = []
    for example in examples:
        premise, hypothesis = example.input.removeprefix("Premise: ").split("\nHypothesis: ")
        bodies.append({"inputs": {"premise": premise, "hypothesis": hypothesis}})
    return examples, bodies


def calibrate(export: Path, examples: list[tasks.Example]) -> tuple[dict[str, Any], list[tasks.Example]]:
    """The margin below which SHARE of the inputs go to the teacher (halfway between the student's margins on either
    side of that rank; each input predicted alone, as a single request is), and those inputs."""
    from stepwise.export.runtime import load_runtime, predict

    runtime = load_runtime(export, threads=1)
    margins = [predict(runtime, [example])[0].margin for example in examples]
    ranked = sorted(margins)
    rank = round(SHARE * len(ranked))
    threshold = (ranked[rank - 1] + ranked[rank]) / 2
    calibration = {"margin": threshold, "sent": rank, "inputs": len(ranked),
                   "student_margin_p10_p50_p90": [round(statistics.quantiles(ranked, n=10)[i], 4) for i in (0, 4, 8)]}
    return calibration, [e for e, m in zip(examples, margins) if m < threshold]


def build_teacher(workdir: Path) -> Path:
    out = workdir / "tiny-teacher"
    if not (out / "config.json").exists():
        subprocess.run([str(envs.venv_python("teacher")), "-m", "stepwise.extraction.tiny_teacher", str(out)], env=os.environ | {"PYTHONPATH": str(ROOT)},
                       check=True, capture_output=True)
    return out


def start_teacher(model: Path, workdir: Path, port: int) -> subprocess.Popen:
    """vLLM's OpenAI server in the teacher environment, CPU settings as the tests use (one thread, 1 GiB KV cache)."""
    scratch = workdir / "teacher-server"
    for folder in ("tmp", "cache"):
        (scratch / folder).mkdir(parents=True, exist_ok=True)
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                        "TMPDIR": str(scratch / "tmp"), "XDG_CACHE_HOME": str(scratch / "cache"), "VLLM_CACHE_ROOT": str(scratch / "cache")}
    command = [str(envs.venv_python("teacher")), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--enforce-eager", "--served-model-name", "tiny", "--max-model-len", "4096"]
    server = subprocess.Popen(command, env=env, stdout=(scratch / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(f"http://127.0.0.1:{port}/health", server, 600)
    return server


def wait_for(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def teacher_alone(teacher_url: str, examples: list[tasks.Example]) -> dict[str, Any]:
    """What one fallback costs on its own: the served fallback's exchange (prompt, structured output, parse) for each
    input, one after another, straight to the teacher."""
    from stepwise.export.runtime import Prediction
    from stepwise.serving import fallback
    from stepwise.serving.settings import Fallback

    settings = Fallback(fallback=teacher_url, fallback_margin=1.0, fallback_model="tiny", fallback_max_tokens=TEACHER_TOKENS, fallback_timeout_s=120, fallback_retries=0)
    student = Prediction("neutral", None, 1 / 3, 0.0, {"entailment": 1 / 3, "neutral": 1 / 3, "contradiction": 1 / 3})

    async def ask_each() -> list[fallback.Outcome]:
        teacher = fallback.prepare(settings, tasks.get_task("esnli"))
        return [await fallback.ask(teacher, example, student) for example in examples]

    outcomes = asyncio.run(ask_each())
    seconds = [1000 * o.seconds for o in outcomes]
    return {"calls": len(outcomes), "p50_ms": round(statistics.median(seconds), 1), "max_ms": round(max(seconds), 1),
            "answered": sum(o.source == "teacher" for o in outcomes), "rationale_chars_p50": statistics.median(len(o.prediction.rationale or "") for o in outcomes)}


# ---------------------------------------------------------------- serving and load


def start_student(export: Path, workdir: Path, name: str, port: int, fallback: list[str]) -> subprocess.Popen:
    run_dir = workdir / f"serve-{name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "stepwise", "serve", "--model", str(export), "--port", str(port), "--metrics-port", str(free_port()), "--run-dir", str(run_dir),
               "--max-ongoing-requests", "128", "--max-queued-requests", "1024", *fallback]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=(workdir / f"serve-{name}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(f"http://127.0.0.1:{port}/healthz", server, 600)
    return server


async def load(url: str, bodies: list[dict], clients: int, requests: int) -> dict[str, Any]:
    """`requests` requests from `clients` concurrent clients, the inputs in turn; latency by who answered."""
    latencies: dict[str, list[float]] = {"student": [], "teacher": [], "student, teacher failed": []}
    statuses: dict[int, int] = {}
    errors: set[str] = set()
    remaining = iter(range(requests))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients), timeout=300) as client:

        async def one_client() -> None:
            for i in remaining:
                started = time.perf_counter()
                response = await client.post(url, json=bodies[i % len(bodies)])
                ms = 1000 * (time.perf_counter() - started)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    [answer] = response.json()["predictions"]
                    latencies["student, teacher failed" if answer.get("fallback_error") else answer["source"]].append(ms)
                    errors.add((answer.get("fallback_error") or "")[:90])

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    every = sorted(ms for values in latencies.values() for ms in values)
    return {"clients": clients, "requests": requests, "p50_ms": round(statistics.median(every), 1), "p99_ms": round(statistics.quantiles(every, n=100)[98], 1),
            "rps": round(requests / wall, 1), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "by_source": {source: {"requests": len(v), "p50_ms": round(statistics.median(v), 1)} for source, v in latencies.items() if v},
            "fallback_errors": sorted(e for e in errors if e)}


def measure(export: Path, workdir: Path, name: str, fallback: list[str], bodies: list[dict], concurrency: list[int], requests: int) -> dict[str, Any]:
    port = free_port()
    server = start_student(export, workdir, name, port, fallback)
    url = f"http://127.0.0.1:{port}/v1/predict"
    try:
        asyncio.run(load(url, bodies[:8], 2, 16))  # warm-up: the model loaded, connections open
        points = []
        for clients in concurrency:
            points.append(asyncio.run(load(url, bodies, clients, requests)))
            print(f"[bench] {name:28s} {json.dumps(points[-1])}", flush=True)
        return {"config": name, "flags": fallback, "points": points}
    finally:
        stop_server(server)


# ---------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    base = {p["clients"]: p for p in result["rows"][0]["points"]}
    teacher = result["teacher_alone"]
    lines = [f"Student: {result['student']}. Teacher: {result['teacher']}. Inputs: {result['calibration']['inputs']} e-SNLI test inputs in turn, one per "
             f"request; threshold margin {result['calibration']['margin']:.4f} sends {result['calibration']['sent']} of them "
             f"({result['calibration']['sent'] / result['calibration']['inputs']:.0%}) to the teacher. Load: httpx, {result['requests_per_point']} requests per point.",
             "", f"The teacher alone (the fallback's exchange, one call at a time, {teacher['calls']} unsure inputs): p50 {teacher['p50_ms']} ms per fallback, "
             f"max {teacher['max_ms']} ms; {teacher['answered']}/{teacher['calls']} answers readable.", "",
             "| fallback | clients | p50 ms | p99 ms | req/s | p50 / off | p99 / off | req/s / off | answered by | non-200 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for p in row["points"]:
            ref = base[p["clients"]]
            sources = ", ".join(f"{source} {v['requests']} (p50 {v['p50_ms']} ms)" for source, v in p["by_source"].items())
            non_200 = sum(n for code, n in p["statuses"].items() if code != "200")
            lines.append(f"| {row['config']} | {p['clients']} | {p['p50_ms']} | {p['p99_ms']} | {p['rps']} | {p['p50_ms'] / ref['p50_ms']:.2f} | "
                         f"{p['p99_ms'] / ref['p99_ms']:.2f} | {p['rps'] / ref['rps']:.2f} | {sources} | {non_200} |")
    errors = sorted({e for row in result["rows"] for p in row["points"] for e in p["fallback_errors"]})
    if errors:
        lines += ["", "Fallback errors seen (the student's answer stood): " + "; ".join(f"`{e}`" for e in errors)]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, clients = result["rows"], [p["clients"] for p in result["rows"][0]["points"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(rows)
    for metric, ax, label in (("p50_ms", axes[0], "p50 latency, ms"), ("p99_ms", axes[1], "p99 latency, ms (log)"), ("rps", axes[2], "requests per second")):
        for i, row in enumerate(rows):
            ax.bar([c + i * width for c in range(len(clients))], [p[metric] for p in row["points"]], width, label=row["config"])
        ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(clients))], [f"{c} client{'s' if c > 1 else ''}" for c in clients])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"stepwise serve with a teacher fallback (~{SHARE:.0%} of requests), tiny student + tiny teacher on vLLM CPU; shared 2-core machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(concurrency: list[int] = [1, 16], requests: int = 400, train_steps: int = 100, workdir: Path = Path("runs/bench-cascade"),
         out: Path = RESULTS / "cascade_bench") -> Path:
    """Served p50/p99 and throughput with the teacher fallback off, on (~10% of requests) and with a dead teacher.

    Args:
        concurrency: concurrent clients per point
        requests: requests per point (the inputs in turn)
        train_steps: training steps of the tiny student (its margins must spread for a 10% share to exist)
        workdir: the student, the teacher and the servers' run folders
        out: result files (.json, .md, .png) without suffix
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    export = trained_export(workdir, train_steps)
    examples, bodies = request_bodies(200)
    calibration, unsure = calibrate(export, examples)
    print(f"[bench] calibration: {calibration}", flush=True)
    margin = f"{calibration['margin']:.6f}"
    teacher_port = free_port()
    teacher = start_teacher(build_teacher(workdir), workdir, teacher_port)
    teacher_url = f"http://127.0.0.1:{teacher_port}"
    try:
        alone = teacher_alone(teacher_url, unsure)
        print(f"[bench] teacher alone: {alone}", flush=True)
        fallback = ["--fallback-margin", margin, "--fallback-model", "tiny", "--fallback-max-tokens", str(TEACHER_TOKENS)]
        dead = ["--fallback", f"http://127.0.0.1:{free_port()}", *fallback]
        configs = {"off": [], "on (vLLM tiny teacher)": ["--fallback", teacher_url, *fallback], "dead teacher URL": dead,
                   "dead teacher URL, no cooldown": [*dead, "--fallback-cooldown-s", "0"]}
        rows = [measure(export, workdir, name, flags, bodies, concurrency, requests) for name, flags in configs.items()]
    finally:
        stop_server(teacher)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other work: compare rows of one run",
              "student": f"tiny T5 (1.3M parameters) trained {train_steps} steps on e-SNLI, fp32 ONNX, one replica, 1 ONNX Runtime thread",
              "teacher": "the tiny random Llama-shaped teacher (2 layers, hidden 128) on vLLM's OpenAI server, CPU, 1 thread, structured output, "
                         f"up to {TEACHER_TOKENS} tokens",
              "requests_per_point": requests, "calibration": calibration, "teacher_alone": alone, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    artifacts.write_json(out.with_suffix(".json"), result)
    artifacts.write_atomic(out.with_suffix(".md"), table)
    plot(result, out.with_suffix(".png"))
    print(table)
    return out.with_suffix(".json")


if __name__ == "__main__":
    from stepwise.cli import call_with_argv

    call_with_argv(main, sys.argv[1:], prog="python -m benchmarks.cascade_bench")
