"""`stepwise serve`: exported students over HTTP on Ray Serve until Ctrl-C or SIGTERM.

stepwise serve --model runs/export-esnli                       # one student, model id = its task name
stepwise serve --model runs/export-esnli cqa=runs/export-cqa   # several; requests choose by model id
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from stepwise import storage, tasks
from stepwise.serving import lifecycle
from stepwise.serving.settings import (
    BatchingOptions,
    FallbackOptions,
    LimitOptions,
    OverloadOptions,
    ScalingOptions,
    ServeArgs,
)


def parse_models(specs: list[str]) -> dict[str, str]:
    """`DIR` (id: the folder's task name) or `ID=DIR` -> {id: DIR}; DIR may be a prefix on an object store."""
    models: dict[str, str] = {}
    for spec in specs:
        model_id, folder = spec.split("=", 1) if "=" in spec and "://" not in spec.split("=", 1)[0] else ("", spec)
        if not model_id:
            where = storage.as_location(folder)
            if storage.is_remote(where):
                storage.check_location(where, "--model", must_exist=True)
            model_id = tasks.load_task(where).name
        if model_id in models:
            raise ValueError(f"model id {model_id!r} given twice: name them with ID=DIR")
        models[model_id] = folder
    return models


def serve_args(
    models: Sequence[str | Path],
    port: int,
    run_dir: Path | None = None,
    metrics_port: int | None = None,
    flags: Sequence[str] = (),
) -> list[str]:
    """The arguments of `stepwise serve` for these exports (DIR or ID=DIR), for a caller that starts it as a process
    (`python -m stepwise *serve_args(...)`): the benchmarks, the demo and the tests. Unset: the command's default."""
    args = ["serve", "--model", *map(str, models), "--port", str(port)]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    return args + list(flags)


def main(
    model: list[str],
    port: int = 8000,
    host: str = "127.0.0.1",
    batching: BatchingOptions = BatchingOptions(),
    limits: LimitOptions = LimitOptions(),
    overload: OverloadOptions = OverloadOptions(),
    scaling: ScalingOptions = ScalingOptions(),
    fallback: FallbackOptions = FallbackOptions(),
    access_log: bool = False,
    allow_unverified: bool = False,
    ray_cpus: int = 2,
    metrics_port: int = 9464,
    run_dir: Path = Path("runs/serve"),
    ray_address: str = "",
) -> Path:
    """Serve exported students over HTTP on Ray Serve until Ctrl-C or SIGTERM.

    Args:
        model: export folders, as DIR (model id = its task name) or ID=DIR; several for several students. DIR may be
            a prefix on an object store (s3://bucket/prefix): every replica downloads it once per content into its
            node's cache (STEPWISE_CACHE) and verifies its checksums
        port: HTTP port
        host: address to listen on; beyond loopback (e.g. 0.0.0.0) Ray's token authentication is turned on
        batching: dynamic batching
        limits: what one request may ask for
        overload: backpressure
        scaling: replicas and their threads
        fallback: a teacher answers what the student is unsure of
        access_log: a JSON access-log line per request (costs latency)
        allow_unverified: serve exports whose parity gate failed, was skipped or never ran
        ray_cpus: CPUs of the local Ray instance
        metrics_port: Prometheus metrics at http://127.0.0.1:PORT/metrics
        run_dir: Ray's temporary folder and logs (ray/session_latest/logs/serve/ holds the JSON logs)
        ray_address: a running Ray cluster to deploy onto (host:port of its head) instead of a local Ray; Serve's
            proxy answers on the head node's --host/--port, replicas go where the cluster has room, and the app is
            deleted from the cluster on Ctrl-C. Metrics and logs are then the cluster's (its nodes' metrics ports,
            their Ray logs); --ray-cpus, --metrics-port and --run-dir are not used
    """
    args = ServeArgs(
        models=parse_models(model),
        batching=batching,
        limits=limits,
        overload=overload,
        scaling=scaling,
        fallback=fallback,
        access_log=access_log,
        allow_unverified=allow_unverified,
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        url = lifecycle.start(
            args, port=port, host=host, run_dir=run_dir, ray_cpus=ray_cpus, metrics_port=metrics_port,
            ray_address=ray_address,
        )  # fmt: skip  # SIGTERM: as Ctrl-C
        logs = f"{run_dir.resolve()}/ray/session_latest/logs/serve"
        where = f"on the cluster at {ray_address}" if ray_address else f"metrics {metrics_url}  logs {logs}"
        print(f"[serve] {url}/v1/predict  docs {url}/docs  {where}  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", flush=True)
    finally:
        lifecycle.ignore_stop_signals()  # also when the shutdown began otherwise than by a signal
        lifecycle.stop()
    return run_dir
