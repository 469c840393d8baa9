"""The served student under load: Ray Serve configurations against a plain FastAPI app and in-process calls.

Every server runs as its own process, the way an operator starts it (`python -m stepwise serve ...`, or uvicorn
for the plain app), on int8 exports of a tiny and a t5-small-shaped student. Load comes from `hey` (an outside
load generator: `apt-get install hey`; skipped with a message when absent) and from an httpx client that also
reads each response's Server-Timing header, to show where a request's milliseconds go hop by hop. Memory is
the whole serving stack's: the proportional set size (PSS) and the RSS summed over the server process and every
process it started (proxy or HAProxy, controller, replicas, Ray's own processes).

    python3 -m stepwise bench serving   # -> benchmarks/results/serving.{json,md,png}
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import RESULTS, ROOT, bench_lock, free_port, wait_until_ready
from stepwise import artifacts, tasks
from stepwise.serving.run import serve_args

if TYPE_CHECKING:
    import httpx

FAST = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# name -> (environment of the server, extra `stepwise serve` flags); "plain" is the uvicorn app.
CONFIGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "plain FastAPI": ({}, []),
    "plain FastAPI, USE_TORCH=0": ({"USE_TORCH": "0"}, []),
    "Serve, Python proxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, []),
    "Serve, Python proxy, same-loop": (
        {
            "RAY_SERVE_ENABLE_HA_PROXY": "0",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        },
        [],
    ),
    "Serve, Python proxy, throughput-optimized": (
        {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        [],
    ),
    "Serve, HAProxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, []),
    "stepwise serve (HAProxy, throughput-optimized)": (FAST, []),
    "  without batching (max batch 1)": (FAST, ["--max-batch-size", "1"]),
    "  batch wait 2 ms": (FAST, ["--batch-wait-timeout-s", "0.002"]),
    "  2 replicas x 1 ORT thread": (FAST, ["--replicas", "2", "--replica-cpus", "1"]),
    "  1 replica x 2 ORT threads": (FAST, ["--ort-threads", "2"]),
}
DEFAULT = "stepwise serve (HAProxy, throughput-optimized)"


# ---------------------------------------------------------------- models and servers


def int8_export(size: str, workdir: Path) -> Path:
    """An int8 export (what CPU serving uses) of a random untied student of `size` (latency only: its labels mean
    nothing)."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training.tiny import build_student_folder

    export = workdir / f"export-{size}-int8"
    if (export / artifacts.PARITY).exists():
        return export
    student = build_student_folder(workdir / f"student-{size}", size, "esnli")
    return export_main(
        model=student, out=export, quantize="int8", parity=ParityOptions(parity_limit=32), overwrite=True
    )


def start_server(config: str, export: Path, port: int, run_dir: Path) -> subprocess.Popen:
    env, flags = CONFIGS[config]
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
        | env
        | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    )
    if config.startswith("plain FastAPI"):
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.serving_plain:build_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        env["STEPWISE_PLAIN_MODEL"] = str(export)
    else:
        load = ["--max-ongoing-requests", "128", "--max-queued-requests", "1024", "--request-timeout-s", "120"]
        command = [sys.executable, "-m", "stepwise", *serve_args([export], port, run_dir, free_port(), load + flags)]
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(2)  # Ctrl-C: the shutdown path operators use
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)
        server.wait()


def stack_memory_mb(server: subprocess.Popen) -> dict[str, float]:
    """PSS and RSS summed over the server process and all its descendants (HAProxy, Ray's processes, replicas)."""
    import psutil

    root = psutil.Process(server.pid)
    pss = rss = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            pss, rss = pss + info.pss, rss + info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return {
        "pss_mb": round(pss / 2**20),
        "rss_mb": round(rss / 2**20),
        "processes": len(root.children(recursive=True)) + 1,
    }


# Process roles of a serving stack, by what each process's command line names (Ray renames its workers
# "ray::<actor class>"): first match wins.
ROLES = (
    ("HAProxy", ("haproxy",)),
    ("GCS server", ("gcs_server",)),
    ("raylet", ("raylet/raylet", "/raylet ")),
    ("dashboard", ("dashboard/dashboard.py",)),
    ("dashboard subprocess", ("ray-dashboard-", "dashboard.subprocesses")),
    ("dashboard agent (metrics)", ("DashboardAgent", "dashboard/agent.py")),
    ("runtime-env agent", ("RuntimeEnvAgent", "runtime_env/agent/main.py")),
    ("log monitor", ("log_monitor.py",)),
    ("autoscaler monitor", ("autoscaler/_private/monitor.py", "monitor.py")),
    ("Serve controller", ("ServeController",)),
    ("Serve fallback proxy (Python)", ("ProxyActor",)),
    ("Serve HAProxy manager", ("HAProxyManager",)),
    ("Serve replica", ("ServeReplica",)),
    ("idle Ray worker", ("ray::IDLE", "default_worker.py")),
    ("other Ray process", ("ray",)),
)


def process_role(cmdline: str, root: bool) -> str:
    if root:
        return "server process (driver / uvicorn)"
    for role, marks in ROLES:
        if any(mark in cmdline for mark in marks):
            return role
    return "other"


def stack_memory_by_role(pid: int) -> dict[str, Any]:
    """PSS (and RSS, count) per process role over `pid` and its descendants, plus the stack's totals (MB)."""
    import psutil

    root = psutil.Process(pid)
    roles: dict[str, dict[str, float]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            role = process_role(" ".join(process.cmdline()), process.pid == root.pid)
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        entry = roles.setdefault(role, {"pss_mb": 0.0, "rss_mb": 0.0, "processes": 0})
        entry["pss_mb"] += info.pss / 2**20
        entry["rss_mb"] += info.rss / 2**20
        entry["processes"] += 1
    for entry in roles.values():
        entry["pss_mb"], entry["rss_mb"] = round(entry["pss_mb"], 1), round(entry["rss_mb"], 1)
    return {
        "pss_mb": round(sum(e["pss_mb"] for e in roles.values())),
        "rss_mb": round(sum(e["rss_mb"] for e in roles.values())),
        "processes": int(sum(e["processes"] for e in roles.values())),
        "roles": dict(sorted(roles.items(), key=lambda item: -item[1]["pss_mb"])),
    }


def measure_memory(config: str, export: Path, workdir: Path, body: dict) -> dict[str, Any]:
    """Start `config`'s server, answer a few requests (models loaded, every process of the request path up), let
    it settle, and take its stack's memory by process role."""
    port = free_port()
    run_dir = workdir / ("mem-" + re.sub(r"\W+", "-", config.strip()).strip("-").lower())
    server = start_server(config, export, port, run_dir)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/healthz", 600, server)
        asyncio.run(httpx_load(f"http://127.0.0.1:{port}/v1/predict", body, 2, 20))
        time.sleep(5)  # prestarted or short-lived workers come and go at start-up
        return {"config": config, **stack_memory_by_role(server.pid)}
    finally:
        stop_server(server)


def memory_markdown(result: dict[str, Any]) -> str:
    plain, light, serve = result["rows"]
    lines = [
        f"Stack PSS, {result['size']} student (int8), after {result['requests']} requests; {result['machine']}.",
        "",
        f"**{serve['config']}: {serve['pss_mb']} MB in {serve['processes']} processes; {plain['config']}: "
        f"{plain['pss_mb']} MB in {plain['processes']}; ratio {result['ratio']}x** (to {light['config']}, "
        f"{light['pss_mb']} MB: {result['ratio_to_plain_without_torch']}x)",
        "",
        "| process role | " + " | ".join(f"{row['config']}: PSS MB (processes)" for row in result["rows"]) + " |",
        "|---|" + "---|" * len(result["rows"]),
    ]
    roles = list(dict.fromkeys(role for row in result["rows"][::-1] for role in row["roles"]))
    for role in roles:
        cells = [
            f"{row['roles'][role]['pss_mb']} ({row['roles'][role]['processes']})" if role in row["roles"] else "-"
            for row in result["rows"]
        ]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines.append(
        "| **total** | " + " | ".join(f"**{row['pss_mb']}** ({row['processes']})" for row in result["rows"]) + " |"
    )
    return "\n".join(lines) + "\n"


def memory_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(dict.fromkeys(role for row in result["rows"][::-1] for role in row["roles"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [row["config"] for row in result["rows"]]
    bottom = [0.0] * len(names)
    for role in roles:
        values = [row["roles"].get(role, {}).get("pss_mb", 0.0) for row in result["rows"]]
        ax.barh(names, values, left=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("stack PSS, MB")
    ax.set_title(f"serving stack memory by process role (ratio {result['ratio']}x)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_memory_only(size: str, workdir: Path, body: dict, out: Path) -> Path:
    """The default `stepwise serve` stack and the plain app side by side, memory only: serving_memory.*"""
    export = int8_export(size, workdir)
    configs = ["plain FastAPI", "plain FastAPI, USE_TORCH=0", DEFAULT]
    with bench_lock():
        rows = [measure_memory(config, export, workdir, body) for config in configs]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "size": size,
        "requests": 20,
        "ratio": round(rows[-1]["pss_mb"] / rows[0]["pss_mb"], 2),
        "ratio_to_plain_without_torch": round(rows[-1]["pss_mb"] / rows[1]["pss_mb"], 2),
        "rows": rows,
    }
    artifacts.write_json(out.with_suffix(".json"), result)
    artifacts.write_atomic(out.with_suffix(".md"), memory_markdown(result))
    memory_plot(result, out.with_suffix(".png"))
    print(memory_markdown(result))
    return out.with_suffix(".json")


# ---------------------------------------------------------------- load


def hey(url: str, body_file: Path, concurrency: int, requests: int) -> dict[str, float] | None:
    """`hey` from Debian's packages: p50/p99 latency and requests per second, or None when it is not installed."""
    if not shutil.which("hey"):
        return None
    out = subprocess.run(
        [
            "hey",
            "-n",
            str(requests),
            "-c",
            str(concurrency),
            "-m",
            "POST",
            "-T",
            "application/json",
            "-D",
            str(body_file),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    seconds = {int(p): float(v) for p, v in re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out)}
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    p99 = round(1000 * seconds[99], 2) if 99 in seconds else None  # hey prints "0% in 0.0000 secs" below ~100 requests
    rps = round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), 1)
    return {
        "p50_ms": round(1000 * seconds[50], 2),
        "p99_ms": p99,
        "rps": rps,
        "non_200": sum(int(n) for code, n in statuses.items() if code != "200"),
    }


def timings(response: httpx.Response) -> dict[str, float]:
    """Server-Timing's durations (ms) and the batch size (its desc)."""
    parts = dict(
        part.strip().split(";", 1) for part in response.headers.get("server-timing", "").split(",") if ";" in part
    )
    return {name: float(value.split("=", 1)[1]) for name, value in parts.items() if value.startswith(("dur=", "desc="))}


async def httpx_load(url: str, body: dict, concurrency: int, requests: int) -> dict[str, Any]:
    """Our own client: latency, throughput and, from Server-Timing, the median time in the app, the batch queue
    and the runtime, so that what the client saw splits into hops."""
    latencies: list[float] = []
    parts: dict[str, list[float]] = {"app": [], "queue": [], "runtime": [], "batch": []}
    import httpx

    remaining = iter(range(requests))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=120) as client:

        async def one_client() -> None:
            for _ in remaining:
                started = time.perf_counter()
                response = await client.post(url, json=body)
                latencies.append(1000 * (time.perf_counter() - started))
                for name, ms in timings(response).items():
                    parts.setdefault(name, []).append(ms)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    result = {"p50_ms": round(statistics.median(latencies), 2), "rps": round(requests / wall, 1)}
    return result | {
        f"{name}_p50{'' if name == 'batch' else '_ms'}": round(statistics.median(values), 2)
        for name, values in parts.items()
        if values
    }


def in_process(export: Path, body: dict, requests: int) -> dict[str, float]:
    """`stepwise.export.runtime.predict` called directly, one input at a time and in batches of 16."""
    from stepwise.export.runtime import load_runtime, predict

    runtime = load_runtime(export, threads=1)
    example = tasks.Example("x", tasks.format_input(runtime.task, body["inputs"]), "")
    for _ in range(20):
        predict(runtime, [example])
    one = []
    for _ in range(requests):
        started = time.perf_counter()
        predict(runtime, [example])
        one.append(1000 * (time.perf_counter() - started))
    started = time.perf_counter()
    for _ in range(requests // 16):
        predict(runtime, [example] * 16)
    per_example_16 = 1000 * (time.perf_counter() - started) / (16 * (requests // 16))
    return {
        "p50_ms": round(statistics.median(one), 2),
        "examples_per_s_batch1": round(1000 / statistics.median(one), 1),
        "examples_per_s_batch16": round(1000 / per_example_16, 1),
    }


# ---------------------------------------------------------------- the run


def measure(
    config: str, export: Path, workdir: Path, body: dict, body_file: Path, concurrency: Sequence[int], requests: int
) -> dict[str, Any]:
    port = free_port()
    run_dir = workdir / re.sub(r"\W+", "-", config.strip()).strip("-").lower()
    server = start_server(config, export, port, run_dir)
    url = f"http://127.0.0.1:{port}/v1/predict"
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/healthz", 600, server)
        asyncio.run(httpx_load(url, body, 4, 100))  # warm-up: models loaded, connections and caches warm
        row: dict[str, Any] = {"config": config, "points": []}
        for clients in concurrency:
            count = requests if clients > 1 else requests // 2
            point = {
                "clients": clients,
                "hey": hey(url, body_file, clients, count),
                "httpx": asyncio.run(httpx_load(url, body, clients, count)),
            }
            row["points"].append(point)
            print(f"[bench] {config:48s} c={clients:<3d} hey {point['hey']}  httpx {point['httpx']}", flush=True)
        row["memory"] = stack_memory_mb(server)
        return row
    finally:
        stop_server(server)


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for size, block in result["sizes"].items():
        direct = block["in_process"]
        clients = [p["clients"] for p in block["rows"][0]["points"]]
        lines += [
            f"\n**{size} student (int8)** - in process: p50 {direct['p50_ms']} ms at batch 1, "
            f"{direct['examples_per_s_batch16']} examples/s in batches of 16\n",
            "| configuration | "
            + " | ".join(f"p50 ms / req/s, {c} client{'s' if c > 1 else ''}" for c in clients)
            + " | stack PSS MB (RSS) | processes |",
            "|---|" + "---|" * len(clients) + "---|---|",
        ]
        for row in block["rows"]:
            cells = [f"{(p['hey'] or p['httpx'])['p50_ms']} / {(p['hey'] or p['httpx'])['rps']}" for p in row["points"]]
            lines.append(
                f"| {row['config'].strip()} | "
                + " | ".join(cells)
                + f" | {row['memory']['pss_mb']} ({row['memory']['rss_mb']}) | {row['memory']['processes']} |"
            )
        lines += [
            "",
            "Where one request's milliseconds go (httpx client, Server-Timing; p50):",
            "",
            "| configuration | clients | client total | outside the app (ingress, Serve's hop, transport) "
            "| in the app before and after decoding | batch queue | runtime (tokenize + ONNX Runtime) | batch size |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in block["rows"]:
            for point in row["points"]:
                h = point["httpx"]
                if "app_p50_ms" not in h or "runtime_p50_ms" not in h:
                    continue
                lines.append(
                    f"| {row['config'].strip()} | {point['clients']} | {h['p50_ms']} | "
                    f"{h['p50_ms'] - h['app_p50_ms']:.2f} | "
                    f"{h['app_p50_ms'] - h['queue_p50_ms'] - h['runtime_p50_ms']:.2f} | "
                    f"{h['queue_p50_ms']} | {h['runtime_p50_ms']} | {h.get('batch_p50', '-')} |"
                )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    fig, axes = plt.subplots(len(sizes), 2, figsize=(13, 4.5 * len(sizes)), squeeze=False)
    for i, size in enumerate(sizes):
        for row in result["sizes"][size]["rows"]:
            points = [(p["clients"], p["hey"] or p["httpx"]) for p in row["points"]]
            style = {"linewidth": 3} if row["config"] in (DEFAULT, "plain FastAPI") else {"linewidth": 1, "alpha": 0.7}
            axes[i][0].plot(
                [c for c, _ in points],
                [m["p50_ms"] for _, m in points],
                marker="o",
                label=row["config"].strip(),
                **style,
            )
            axes[i][1].plot(
                [c for c, _ in points], [m["rps"] for _, m in points], marker="o", label=row["config"].strip(), **style
            )
        for ax, ylabel in ((axes[i][0], "p50 latency, ms (log)"), (axes[i][1], "requests per second")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{size} student, int8, label only")
            ax.grid(alpha=0.3)
        axes[i][0].set_yscale("log")
        axes[i][1].legend(fontsize=7)
    fig.suptitle("stepwise serve vs plain FastAPI (shared 2-core CPU, one run: compare within the figure)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(
    sizes: Sequence[str] = ("tiny", "small"),
    configs: Sequence[str] = tuple(CONFIGS),
    concurrency: Sequence[int] = (1, 16, 32),
    requests: int = 600,
    workdir: Path = Path("runs/bench-serving"),
    out: Path = RESULTS / "serving",
    memory_only: bool = False,
) -> Path:
    """Serve configurations under load (hey and httpx), hop by hop, with the memory of each serving stack.

    Args:
        sizes: student shapes (tiny, small = t5-small's shape), each exported int8
        configs: server configurations to measure (see CONFIGS)
        concurrency: concurrent clients per point
        requests: requests per point (half at one client)
        workdir: the exports and the servers' run folders
        out: result files (.json, .md, .png) without suffix
        memory_only: only the stack memory per process role, `stepwise serve` beside the plain app, for the first
            size (no load): benchmarks/results/serving_memory.{json,md,png} unless --out names other files
    """
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    if not shutil.which("hey"):
        print(
            "[bench] hey is not installed (apt-get install hey): load numbers come from the httpx client alone",
            flush=True,
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    body = {
        "inputs": {
            "premise": "A man plays a guitar on a stage in front of a crowd.",
            "hypothesis": "A person makes music.",
        }
    }
    if memory_only:
        target = RESULTS / "serving_memory" if Path(out) == RESULTS / "serving" else Path(out)
        return run_memory_only(sizes[0], workdir, body, target)
    body_file = workdir / "body.json"
    body_file.write_text(json.dumps(body))
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared: compare rows of one run",
        "load_generator": "hey" if shutil.which("hey") else "httpx",
        "requests_per_point": requests,
        "sizes": {},
    }
    exports = {size: int8_export(size, workdir) for size in sizes}
    with bench_lock():
        for size, export in exports.items():
            block: dict[str, Any] = {"in_process": in_process(export, body, 200), "rows": []}
            print(f"[bench] {size} in process: {block['in_process']}", flush=True)
            for config in configs:
                block["rows"].append(measure(config, export, workdir, body, body_file, concurrency, requests))
            result["sizes"][size] = block
    out = Path(out)
    artifacts.write_json(out.with_suffix(".json"), result)
    artifacts.write_atomic(out.with_suffix(".md"), markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return out.with_suffix(".json")
