"""Serving latency and throughput: the Ray Serve endpoint against direct in-process calls to the same runtime
and against the same model behind a plain FastAPI app on uvicorn (no Ray, no batching), so that Serve's own
overhead shows apart from HTTP's. A bounded load generator (fixed request count and time limit per point,
httpx async on loopback) at each concurrency; label-only, and with rationales at low concurrency.

    flock /tmp/stepwise-bench.lock .venv/student/bin/python -m benchmarks.serving_bench --model EXPORT_DIR
    # without --model: a random t5-small-shaped student is built and exported under runs/bench-serving/

Writes benchmarks/results/serving.json and serving.png and prints a markdown table.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

import httpx

from stepwise import tasks

ROOT = Path(__file__).resolve().parent.parent
# Serve as configured, and with Serve's event-loop hops removed: user code on the replica's main loop and the
# proxy's router on its main loop (fewer thread handoffs per request; Ray Serve 2.60 environment flags).
SERVE_VARIANTS = {
    "serve": {},
    "serve-sameloop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
}


# ---------------------------------------------------------------- the model


def random_student_export(size: str, workdir: Path) -> Path:
    """An exported random untied T5 of `size` (latency only: its labels mean nothing)."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training.tiny import build_student, train_tokenizer

    student, export = workdir / f"student-{size}", workdir / f"export-{size}"
    if (export / "export_config.json").exists():
        return export
    task = tasks.get_task("esnli")
    train = tasks.load_split(task, "train")[:2000]
    tokenizer = train_tokenizer([tasks.label_input(e) for e in train] + [tasks.rationale_input(e) for e in train], student, vocab_size=2000)
    build_student(tokenizer, size).save_pretrained(student)
    tasks.save_task(task, student)
    return export_main(model=student, out=export, parity=ParityOptions(parity_limit=32), overwrite=True)


# ---------------------------------------------------------------- load generators


def summary(latencies_s: list[float], wall_s: float, errors: int) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies_s)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 2)

    return {"requests": len(ms), "errors": errors, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": round(statistics.fmean(ms), 2), "throughput_rps": round(len(ms) / wall_s, 1)}


async def http_load(url: str, bodies: list[dict], concurrency: int, total: int, time_limit_s: float) -> dict[str, Any]:
    """`concurrency` clients posting back to back until `total` requests or the time limit."""
    latencies: list[float] = []
    errors = 0
    counter = itertools.count()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        deadline = time.perf_counter() + time_limit_s

        async def client_loop() -> None:
            nonlocal errors
            while (i := next(counter)) < total and time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.post(url, json=bodies[i % len(bodies)])
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return summary(latencies, time.perf_counter() - started, errors)


def direct_load(call: Callable[[int], Any], concurrency: int, total: int, time_limit_s: float) -> dict[str, Any]:
    """The same shape without HTTP: `concurrency` threads calling the runtime directly."""
    latencies: list[float] = []
    counter, lock = itertools.count(), threading.Lock()
    deadline = time.perf_counter() + time_limit_s

    def client_loop() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= total or time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    return summary(latencies, time.perf_counter() - started, 0)


# ---------------------------------------------------------------- targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_plain(model: Path, port: int) -> subprocess.Popen:
    env = os.environ | {"STEPWISE_PLAIN_MODEL": str(model), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "uvicorn", "benchmarks.serving_plain:app", "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return subprocess.Popen(command, cwd=ROOT, env=env)


def run_points(name: str, measure: Callable[[int, bool, int], dict[str, Any]], concurrencies: list[int], explain_concurrencies: list[int], requests: int, explain_requests: int) -> list[dict[str, Any]]:
    rows = []
    for explain, levels, count in ((False, concurrencies, requests), (True, explain_concurrencies, explain_requests)):
        for concurrency in levels:
            row = {"target": name, "explain": explain, "concurrency": concurrency} | measure(concurrency, explain, max(count, 4 * concurrency))
            print(f"[bench] {name:14s} explain={explain!s:5s} c={concurrency:<4d} p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  {row['throughput_rps']:8.1f} req/s  errors {row['errors']}", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | rationale | concurrency | p50 ms | p95 ms | p99 ms | req/s | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["explain"], r["concurrency"], r["target"])):
        lines.append(f"| {r['target']} | {'yes' if r['explain'] else 'no'} | {r['concurrency']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['throughput_rps']} | {r['errors']} |")
    return "\n".join(lines)


def overhead_lines(rows: list[dict[str, Any]]) -> str:
    p50 = {(r["target"], r["concurrency"]): r["p50_ms"] for r in rows if not r["explain"]}
    lines = []
    for c in sorted({c for _, c in p50})[:1]:  # above one client, the gaps are queueing, not overhead
        if all((t, c) in p50 for t in ("serve", "plain", "direct")):
            lines.append(f"concurrency {c}: Serve adds {p50[('serve', c)] - p50[('direct', c)]:.2f} ms p50 over direct calls, {p50[('serve', c)] - p50[('plain', c)]:.2f} ms over plain FastAPI/uvicorn (which adds {p50[('plain', c)] - p50[('direct', c)]:.2f} ms)")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for target in ("serve", "serve-sameloop", "plain", "direct"):
        points = sorted((r for r in rows if r["target"] == target and not r["explain"]), key=lambda r: r["concurrency"])
        if not points:
            continue
        xs = [r["concurrency"] for r in points]
        line = latency.plot(xs, [r["p50_ms"] for r in points], marker="o", label=f"{target} p50")[0]
        latency.plot(xs, [r["p99_ms"] for r in points], linestyle="--", color=line.get_color(), label=f"{target} p99")
        throughput.plot(xs, [r["throughput_rps"] for r in points], marker="o", color=line.get_color(), label=target)
    for ax, ylabel in ((latency, "latency (ms)"), (throughput, "throughput (requests/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    latency.set_yscale("log")
    fig.suptitle("stepwise student, label-only: Ray Serve vs plain FastAPI vs direct calls (shared 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- main


def main(
    model: Path | None = None,
    student_size: Literal["tiny", "small"] = "small",
    concurrency: list[int] = [1, 8, 32, 128],
    explain_concurrency: list[int] = [1, 8],
    requests: int = 400,
    explain_requests: int = 40,
    time_limit_s: float = 20.0,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.0,
    targets: list[str] = ["serve", "serve-sameloop", "plain", "direct"],
    workdir: Path = Path("runs/bench-serving"),
    out: Path = Path("benchmarks/results/serving.json"),
) -> int:
    """Serve endpoint vs direct runtime calls vs plain FastAPI: p50/p95/p99 and throughput per concurrency.

    Args:
        model: an export folder; default: a random student of --student-size, exported under --workdir
        student_size: shape of the random student when no --model is given
        concurrency: concurrent clients, label-only
        explain_concurrency: concurrent clients with rationales ("explain": true)
        requests: requests per label-only point (at least 4 per client)
        explain_requests: requests per rationale point
        time_limit_s: a point stops at this many seconds even if requests remain
        max_batch_size: Serve's dynamic batch size
        batch_wait_timeout_s: Serve's batch wait
        targets: which of serve, serve-sameloop, plain, direct to run
        workdir: Ray's folder and the built student
        out: the JSON result; the PNG goes next to it
    """
    from stepwise.export.runtime import load_runtime, predict

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    workdir = workdir.resolve()
    model = Path(model) if model else random_student_export(student_size, workdir)
    examples = [e for e in tasks.load_split(tasks.get_task("esnli"), "valid")[:64]]
    bodies = {explain: [{"inputs": e.input, "explain": explain} for e in examples] for explain in (False, True)}
    rows: list[dict[str, Any]] = []
    points = dict(concurrencies=concurrency, explain_concurrencies=explain_concurrency, requests=requests, explain_requests=explain_requests)

    if "direct" in targets:
        runtime = load_runtime(model, threads=1)
        for e in examples[:8]:
            predict(runtime, [e])
        # One runtime thread fed first come, first served (the fast tokenizer is not thread-safe; no batching).
        runtime_thread = ThreadPoolExecutor(1)

        def call(i: int, explain: bool) -> None:
            runtime_thread.submit(predict, runtime, [examples[i % len(examples)]], explain).result()

        rows += run_points("direct", lambda c, explain, n: direct_load(lambda i: call(i, explain), c, n, time_limit_s), **points)

    if "plain" in targets:
        from stepwise.serving.lifecycle import wait_ready

        port = free_port()
        server = start_plain(model, port)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, 120, process=server)
            asyncio.run(http_load(f"{url}/v1/predict", bodies[False], 4, 40, time_limit_s))  # warm-up
            rows += run_points("plain", lambda c, explain, n: asyncio.run(http_load(f"{url}/v1/predict", bodies[explain], c, n, time_limit_s)), **points)
        finally:
            server.terminate()
            server.wait(30)

    from stepwise.serving.settings import Batching, Limits, Overload, Scaling, ServeArgs

    settings = ServeArgs(models={"esnli": str(model)}, batching=Batching(max_batch_size, batch_wait_timeout_s, max(128, max_batch_size)),
                         limits=Limits(request_timeout_s=120.0), overload=Overload(max_queued_requests=512), scaling=Scaling(replica_cpus=1.0))
    for target in [t for t in targets if t in SERVE_VARIANTS]:
        from stepwise.serving import lifecycle

        saved = dict(os.environ)
        os.environ.update(SERVE_VARIANTS[target])  # read by the proxy and replica processes at start
        url = lifecycle.start(settings, port=free_port(), run_dir=workdir)
        try:
            asyncio.run(http_load(f"{url}/v1/predict", bodies[False], 4, 40, time_limit_s))
            rows += run_points(target, lambda c, explain, n: asyncio.run(http_load(f"{url}/v1/predict", bodies[explain], c, n, time_limit_s)), **points)
        finally:
            lifecycle.stop()
            os.environ.clear()
            os.environ.update(saved)

    out.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "export_config.json").read_text())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work: compare rows of one run, not absolute numbers)",
        "model": {"export": str(model), "d_model": config["model"]["d_model"], "precision": config["precision"], "decoder_layout": config["decoder_layout"], "max_rationale_tokens": config["max_new_tokens"]["rationale"]},
        "serve_settings": settings.to_dict(),
        "ort_threads": 1,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print(overhead_lines(rows))
    print(f"[bench] wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    from stepwise.cli import call_with_argv

    raise SystemExit(call_with_argv(main, sys.argv[1:], prog="python -m benchmarks.serving_bench"))
