"""One Ray node against a 3-node Ray cluster on loopback with the same CPUs, side by side in one run: extraction
(two vLLM engine actors under Ray Data, the tiny teacher) and Ray Train (two workers, a tiny student), both writing
to the loopback S3 server. The cluster is a head with no CPUs and two worker nodes with one each, as separate
raylets (benchmarks.harness.ray_nodes); the one node has the same two CPUs. Nothing gets faster here: the figures
are what spreading one job over raylets costs (objects and gRPC between raylets, a process group across nodes),
not a speed-up, which needs more machines.

    python3 -m stepwise bench cluster   # -> benchmarks/results/cluster.{json,md}
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import (
    RESULTS,
    bench_lock,
    command_line,
    machine,
    new_bucket,
    ray_nodes,
    s3_server,
    vllm_cpu_environment,
    write_results,
)
from stepwise import envs

CPUS = 2  # both sides: the one node's, and the cluster's two worker nodes' together


def stepwise(python: Path, args: list[str], env: dict[str, str]) -> None:
    """`python -m stepwise ...` to its end, as a user runs it; its output shown only when it fails."""
    done = subprocess.run(
        [str(python), "-m", "stepwise", *args], cwd=envs.ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"stepwise {' '.join(args[:1])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def extraction_rate(out: str) -> float:
    """Records per second of the Ray job that wrote `out` (its manifest's last run: on Ray, generation time holds
    connecting to Ray and the engine actors' start as well as their work)."""
    from stepwise import artifacts

    run = artifacts.read_manifest(out)["last_run"]
    return run["records_this_run"] / run["generation_s"]


def training_rate(out: str) -> float:
    """Optimizer steps per second between the run's first and last loss rows (validation and checkpoints in
    between included; the workers' start is not)."""
    from stepwise import artifacts, storage

    rows = [r for r in csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/{artifacts.TRAIN_LOG}").decode()))]
    losses = [r for r in rows if r["loss"]]
    first, last = losses[0], losses[-1]
    return (int(last["step"]) - int(first["step"])) / (float(last["elapsed_s"]) - float(first["elapsed_s"]))


def side_by_side(name: str, run: Callable[[str, int], float], address: str, repeats: int) -> dict:
    """`run(ray_address, i)` -> a rate, on the one node ("") and on the cluster, alternating which goes first."""
    rates: dict[str, list[float]] = {"one_node": [], "cluster": []}
    walls: dict[str, list[float]] = {"one_node": [], "cluster": []}
    for i in range(repeats):
        order = [("one_node", ""), ("cluster", address)]
        for side, where in order if i % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            rates[side].append(run(where, i))
            walls[side].append(time.perf_counter() - started)
            print(f"[cluster] {name} on {side}: {rates[side][-1]:.2f}/s, {walls[side][-1]:.0f} s", flush=True)
    one, spread = statistics.median(rates["one_node"]), statistics.median(rates["cluster"])
    return {
        "stage": name,
        "one_node_per_s": one,
        "cluster_per_s": spread,
        "cluster_over_one_node": spread / one,
        "one_node_wall_s": statistics.median(walls["one_node"]),
        "cluster_wall_s": statistics.median(walls["cluster"]),
        "runs": rates,
    }


def main(
    records: int = 64,
    max_tokens: int = 32,
    train_steps: int = 40,
    repeats: int = 2,
    out: Path = RESULTS / "cluster",
) -> Path:
    """Extraction and Ray Train on one Ray node against a 3-node loopback cluster, both on the loopback S3 server.

    Args:
        records: e-SNLI validation inputs extracted per run
        max_tokens: tokens the tiny teacher generates per record
        train_steps: optimizer steps per training run (two workers, a tiny student)
        repeats: runs per stage and side (medians reported)
        out: result files (.json, .md) without suffix
    """
    from stepwise.extraction.run import main as extract

    scratch = Path(tempfile.mkdtemp(prefix="sw-cluster-", dir="/tmp"))  # short: Ray's and vLLM's socket paths
    teacher_python, student_python = envs.venv_python("teacher"), envs.venv_python("student")
    rows = []
    try:
        with bench_lock(), s3_server() as s3:
            os.environ.update(s3)
            bucket = new_bucket()
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | s3 | {
                "PYTHONPATH": str(envs.ROOT), "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
                "STEPWISE_CACHE": str(scratch / "driver-cache"),
            }  # fmt: skip
            teacher_env = env | vllm_cpu_environment(scratch)
            teacher = scratch / "tiny-teacher"
            subprocess.run([str(teacher_python), "-c", "import sys, pathlib; from stepwise.extraction.tiny_teacher "
                            "import build_tiny_teacher; build_tiny_teacher(pathlib.Path(sys.argv[1]))", str(teacher)],
                           cwd=envs.ROOT, env=teacher_env, check=True, capture_output=True)  # fmt: skip

            def extraction(address: str, i: int) -> float:
                where = f"{bucket}/extract-{'cluster' if address else 'one'}-{i}"
                stepwise(teacher_python, ["extract", "--task", "esnli", "--split", "valid", "--limit", str(records),
                         "--teacher", "vllm", "--model", str(teacher), "--max-tokens", str(max_tokens),
                         "--enforce-eager", "--chunk-size", "8", "--on-ray", "--ray-actors", "2", "--out", where,
                         *(["--ray-address", address] if address else [])], teacher_env)  # fmt: skip
                return extraction_rate(where)

            with ray_nodes(teacher_env, worker_cpus=CPUS // 2, python=teacher_python) as cluster:
                rows.append(
                    side_by_side(
                        "extraction job (records/s, engines' start included)", extraction, cluster.address, repeats
                    )
                )

            rationales = f"{bucket}/rationales"
            extract(task="esnli", teacher="replay", out=rationales)

            def training(address: str, i: int) -> float:
                where = f"{bucket}/train-{'cluster' if address else 'one'}-{i}"
                stepwise(student_python, ["train", "--task", "esnli", "--rationales", rationales, "--student",
                         "tiny", "--out", where, "--data-fraction", "0.05", "--batch-size", "16", "--eval-limit",
                         "16", "--max-input-tokens", "96", "--max-target-tokens", "48", "--max-steps",
                         str(train_steps), "--eval-every", str(train_steps // 2), "--log-every", "5",
                         "--workers", "2", *(["--ray-address", address] if address else [])], env)  # fmt: skip
                return training_rate(where)

            with ray_nodes(env, worker_cpus=CPUS // 2, python=student_python, dashboard=True) as cluster:
                rows.append(side_by_side("training (steps/s)", training, cluster.address, repeats))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "command": command_line(),
        "machine": machine(),
        "cpus": CPUS,
        "one_node": f"a private Ray with {CPUS} CPUs, started by the command",
        "cluster": f"head (0 CPUs) + 2 worker nodes x {CPUS // 2} CPU, separate raylets on 127.0.0.1",
        "store": "moto S3 server on 127.0.0.1 (both sides write there)",
        "records": records,
        "max_tokens": max_tokens,
        "train_steps": train_steps,
        "rows": rows,
    }
    return write_results(Path(out), report, render_table(rows))


def render_table(rows: list[dict]) -> str:
    lines = [
        f"Medians over alternating runs; the same {CPUS} CPUs on both sides (this measures the cluster's overhead, "
        "not a speed-up); both write to moto's S3 server on loopback.",
        "",
        "| stage | one node | 3-node cluster | cluster / one node | wall s (one node / cluster) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['one_node_per_s']:.2f} | {row['cluster_per_s']:.2f} | "
            f"{row['cluster_over_one_node']:.2f}x | {row['one_node_wall_s']:.0f} / {row['cluster_wall_s']:.0f} |"
        )
    return "\n".join(lines)
