"""Starting and stopping a served app in this process: a local Ray closed to the network (or a Ray cluster
someone runs), Serve, the app, and the one shutdown path that Ctrl-C and SIGTERM both take.

Network: Ray runs as a single-node instance whose every server (GCS, raylet, workers, agents, metrics)
listens on 127.0.0.1; only Serve's HTTP port listens where `--host` says. Serving beyond loopback turns on
Ray's token authentication (a token file in the run folder, unless RAY_AUTH_TOKEN(_PATH) is set), and is
refused with RAY_AUTH_MODE=disabled. Ray reads these settings when it is imported, so `ray_environment`
runs before `import ray` (this module imports Ray only inside its functions).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from stepwise import artifacts, envs
from stepwise.net import free_port, wait_until_ready
from stepwise.serving.settings import ServeArgs

APP_NAME = "stepwise"
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-node mode, every Ray server on loopback
_started_ray = False
_on_cluster = False  # the app was deployed onto a cluster at --ray-address: `stop` deletes it and disconnects
_ports: list[tuple[str, int]] = []  # what `start` bound, checked free again by `stop`
_haproxy_dir: list[Path] = []  # HAProxy's config and sockets, removed by `stop`
_server_record: list[Path] = []  # <run-dir>/server.json while this process serves, removed by `stop`
SERVER_RECORD = "server.json"  # who serves from a run folder: a later start cleans up after a killed one
_environment_before: dict[str, str | None] = {}  # what `start` changed in os.environ, restored by `stop`


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Serve's fastest request path measured here (`stepwise bench serving`, serving/README.md): HAProxy as the
# ingress, forwarding straight to each replica's own HTTP server (direct ingress), and Serve's throughput-
# optimized mode (user code and router on the replica's main loop, gRPC between Serve's actors). An operator's
# own setting of either variable wins.
FAST_PATH = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Direct-ingress replicas keep answering this long after shutdown starts so that outside load balancers notice
# (30 s in Ray); here the only balancer is the HAProxy Serve itself runs, so a second is enough.
DRAIN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1", "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1"}
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


# Ports Ray Serve fixes (HAProxy's stats 8404 and metrics 9101, the fallback proxy's 8500 and 9500): two
# servers on one machine would clash on them, so each server takes free ones.
OWN_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def ray_environment(host: str, run_dir: Path, haproxy_dir: Path) -> dict[str, str]:
    """The environment the local Ray starts under for serving on `host`: loopback-only Ray, token auth beyond
    loopback, Serve's fast request path with HAProxy's files in `haproxy_dir` (short: Unix socket paths), and
    free ports where Serve would take fixed ones."""
    settings = {SINGLE_NODE: "0", "RAY_USAGE_STATS_ENABLED": "0"}
    settings |= {k: os.environ.get(k, v) for k, v in FAST_PATH.items() | DRAIN.items()}
    settings |= {k: os.environ.get(k, str(haproxy_dir / name)) for k, name in HAPROXY_FILES.items()}
    for name in OWN_PORTS:
        settings[name] = os.environ.get(name) or str(free_port())
    if is_loopback(host):
        settings["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
        return settings
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        raise ValueError(
            f"--host {host} serves beyond loopback, which needs Ray's token authentication, "
            f"but RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: unset it (or set token)"
        )
    settings["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        token = Path(run_dir).resolve() / "ray-auth-token"
        token.parent.mkdir(parents=True, exist_ok=True)
        if not token.exists():
            token.touch(mode=0o600)
            token.write_text(secrets.token_hex(32))
        settings["RAY_AUTH_TOKEN_PATH"] = str(token)
    return settings


def apply_ray_environment(settings: dict[str, str]) -> None:
    """Put `settings` into this process (and its children). If Ray is imported already, make it re-read them,
    as Ray's own token-auth setup does."""
    import sys

    for name in settings.keys() - _environment_before.keys():
        _environment_before[name] = os.environ.get(name)
    os.environ.update(settings)
    if "ray" in sys.modules:
        import ray._private.ray_constants as ray_constants
        from ray._raylet import Config

        ray_constants.ENABLE_RAY_CLUSTER = settings[SINGLE_NODE] != "0"
        Config.initialize("")


def port_error(host: str, port: int) -> str:
    """Why (host, port) cannot be bound now ("" when it can). SO_REUSEADDR, as servers bind: connections of
    an earlier server still in TIME_WAIT do not keep a new one from listening."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return ""
        except OSError as problem:
            return problem.strerror or str(problem)


def without_pandas() -> None:
    """Ray Serve imports pandas where it is installed (ray.serve._private.utils, only to encode DataFrames, which
    this app never returns): some 80 MB in each of Serve's processes. Import that module with pandas marked absent,
    then unmark it, so that what needs pandas (a task read from a Hugging Face datasets folder) still imports it."""
    import sys

    if "pandas" in sys.modules:
        return
    sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` raises ImportError
    try:
        import ray.serve._private.utils  # noqa: F401
    finally:
        del sys.modules["pandas"]


# What the Ray that `start` starts leaves out (serving/README.md, the stack's memory): worker processes prestarted
# for tasks this app never runs (Serve starts each actor's own worker), the log monitor (it streams worker logs to
# the driver, which log_to_driver=False turns off) and the autoscaler monitor (a single node, nothing to scale).
LIGHT_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


class _LightRayParams:
    """ray.init has no option for the two monitors, which Ray's RayParams (and `ray start`'s --no-monitor) do:
    for the one ray.init call in `start`, ray.init's RayParams is this subclass's. Ray 2.x only: another
    version starts both monitors as before."""

    def __enter__(self) -> None:
        import ray
        from ray._private import parameter

        self.original = parameter.RayParams
        if not ray.__version__.startswith("2.") or not hasattr(self.original, "update_if_absent"):
            return

        class LightRayParams(self.original):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.include_log_monitor = False
                self.no_monitor = True

        parameter.RayParams = LightRayParams

    def __exit__(self, *exc: object) -> None:
        from ray._private import parameter

        parameter.RayParams = self.original


def in_every_ray_worker() -> None:
    """Run by Ray in each worker process of the Ray that `start` starts (runtime_env worker_process_setup_hook):
    Ray Serve 2.60 binds a few listeners to every interface whatever the node's address; bind them where the
    node (single-node mode: 127.0.0.1) is instead. And no pandas (`without_pandas`)."""
    without_pandas()
    from ray.serve._private import haproxy, replica

    bind = replica.add_port_to_grpc_server  # the replicas' inter-deployment gRPC server: [::] in _on_initialized
    if not getattr(bind, "loopback", False):

        def bind_loopback(server: Any, address: str) -> int:
            return bind(server, address.replace("[::]", "127.0.0.1"))

        bind_loopback.loopback = True  # type: ignore[attr-defined]
        replica.add_port_to_grpc_server = bind_loopback
    # HAProxy's Prometheus and stats frontends (`bind :PORT` and `bind *:PORT` in its config template): the stats
    # page has no authentication, so both stay on loopback also when the API goes public (--host 0.0.0.0).
    haproxy.HAPROXY_CONFIG_TEMPLATE = haproxy.HAPROXY_CONFIG_TEMPLATE.replace(
        "bind :{{ config.metrics_port }}", "bind 127.0.0.1:{{ config.metrics_port }}"
    ).replace("bind *:{{ config.stats_port }}", "bind 127.0.0.1:{{ config.stats_port }}")


def check_port_free(host: str, port: int, what: str) -> None:
    problem = port_error(host, port)
    if problem:
        raise ValueError(
            f"{what} port {port} on {host} is not available ({problem}): another `stepwise serve`? choose another port"
        )


def short_ray_dir(ray_dir: Path) -> Path:
    """Ray's sockets live under its temp dir and a Unix socket path holds at most 107 bytes, which a deep
    run folder overflows: then Ray runs in a short /tmp folder and `ray_dir` links to it (logs stay findable)."""
    if len(str(ray_dir)) <= 40:
        return ray_dir
    short = Path(tempfile.mkdtemp(prefix="stepwise-ray-"))
    ray_dir.parent.mkdir(parents=True, exist_ok=True)
    if ray_dir.is_symlink() or ray_dir.exists():
        ray_dir.unlink() if ray_dir.is_symlink() else shutil.rmtree(ray_dir)
    ray_dir.symlink_to(short, target_is_directory=True)
    return short


def start(
    args: ServeArgs,
    port: int = 8000,
    host: str = "127.0.0.1",
    run_dir: Path = Path("runs/serve"),
    ray_cpus: int = 2,
    metrics_port: int | None = None,
    ready_timeout_s: float = 120.0,
    ray_address: str = "",
) -> str:
    """Start Ray (unless already up), Serve and the app in this process; return the base URL once /healthz
    answers. Metrics: http://127.0.0.1:<metrics_port>/metrics. `ray_address`: deploy onto that running cluster
    instead, whose nodes' own settings (network, authentication, metrics) apply; its Serve proxy listens on the
    head node only."""
    global _started_ray, _on_cluster
    import sys

    starts_ray = not ray_address and ("ray" not in sys.modules or not sys.modules["ray"].is_initialized())
    if starts_ray:
        end_killed_server(Path(run_dir))
        check_port_free(host, port, "HTTP")
        if metrics_port:
            check_port_free("127.0.0.1", metrics_port, "metrics")
        _ports[:] = [(host, port)] + ([("127.0.0.1", metrics_port)] if metrics_port else [])
        _haproxy_dir[:] = [Path(tempfile.mkdtemp(prefix="stepwise-hx-"))]
        _server_record[:] = [record_server(Path(run_dir), _haproxy_dir[0])]
        apply_ray_environment(ray_environment(host, run_dir, _haproxy_dir[0]))
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        # Replicas are new processes: they find this checkout's code through PYTHONPATH.
        os.environ["PYTHONPATH"] = envs.root_first(os.environ.get("PYTHONPATH"))
    if starts_ray:
        without_pandas()
    from stepwise.serving.app import build_app

    app = build_app(args)  # checks the model folders before anything starts
    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    if starts_ray:
        ray_dir = short_ray_dir((Path(run_dir) / "ray").resolve())
        with _LightRayParams():
            ray.init(
                num_cpus=ray_cpus,
                include_dashboard=False,
                _temp_dir=str(ray_dir),
                _metrics_export_port=metrics_port,
                log_to_driver=False,
                _system_config=LIGHT_SYSTEM_CONFIG,
                runtime_env={
                    "worker_process_setup_hook": f"{__name__}.in_every_ray_worker",
                    # transformers only tokenizes in the replicas (ONNX Runtime runs the model): without USE_TORCH=0
                    # it imports torch, some 200 MB in each (serving/README.md, the stack's memory). Ray's processes
                    # only: this one may train next. An operator's own setting wins.
                    "env_vars": {"USE_TORCH": os.environ.get("USE_TORCH", "0")},
                },
            )
        _started_ray = True
        if threading.current_thread() is threading.main_thread():
            # ray.init installs a SIGTERM handler that exits without shutting Serve down; from here on SIGTERM
            # (systemd, Docker, Kubernetes) takes the Ctrl-C path, also while Serve is still starting. SIGINT too:
            # a process started in the background by a shell inherits SIGINT ignored, and Python then leaves it so.
            signal.signal(signal.SIGTERM, interrupt)
            signal.signal(signal.SIGINT, interrupt)
    elif ray_address:
        ray.init(address=ray_address, log_to_driver=False)
        _on_cluster = True
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, interrupt)
            signal.signal(signal.SIGINT, interrupt)
    # The proxy's own timeout is a backstop: the app answers 504 at request_timeout_s first, and a teacher fallback
    # gives up after its budget (the student's answer stands), so neither ever meets it.
    http_options = {
        "host": host,
        "port": port,
        "request_timeout_s": args.limits.request_timeout_s + args.fallback.budget_s + 30,
        # One proxy, on the head: what this command's URL names (a load balancer in front of every node's proxy is
        # the RayService's way, serving/README.md).
        **({"location": "HeadOnly"} if ray_address else {}),
    }
    serve.start(
        http_options=http_options, logging_config=LoggingConfig(encoding="JSON", enable_access_log=args.access_log)
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_until_ready(f"{url}/healthz", ready_timeout_s)
    return url


def kill_leftovers(folder: Path) -> None:
    """HAProxy runs as a subprocess of Serve's HAProxy manager actor and can outlive it when Ray goes down first:
    end whatever still runs from `folder` (HAProxy's config and sockets live there, nothing else does)."""
    import psutil

    kill_all([process for process in psutil.process_iter() if runs_from(process, str(folder))])


def runs_from(process: Any, folder: str) -> bool:
    """`folder` is on the command line of `process` (psutil's): HAProxy's, for its config and sockets folder."""
    import psutil

    try:
        return any(folder in part for part in process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def kill_all(processes: list) -> None:
    """SIGKILL `processes` (psutil's) and wait until they have exited, their listening sockets with them. An
    orphan nobody reaps stays a zombie (a container's init may not reap): exited all the same."""
    import psutil

    def exited(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 10
    while not all(exited(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)


def record_server(run_dir: Path, haproxy_dir: Path) -> Path:
    """<run-dir>/server.json: this process (pid and start time, so a reused pid is not taken for it) and its
    HAProxy folder."""
    import psutil

    me = psutil.Process()
    record = {"pid": me.pid, "started": me.create_time(), "haproxy_dir": str(haproxy_dir)}
    return artifacts.write_json(run_dir / SERVER_RECORD, record)


def end_killed_server(run_dir: Path) -> None:
    """A server killed with SIGKILL (Kubernetes after the grace period) takes its Ray driver down, but neither
    HAProxy (Ray starts it in its own session: it keeps the HTTP port) nor Ray's agents (one keeps the metrics
    port). The next start on the same run folder ends them: HAProxy runs from the recorded folder; Ray's agents
    rename themselves over their command line and environment, but keep their logs open under the run folder."""
    import psutil

    path = run_dir / SERVER_RECORD
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text())
        pid, started, haproxy_dir = record["pid"], record["started"], str(record["haproxy_dir"])
    except (ValueError, KeyError, TypeError):  # not ours, or cut short: nothing to go by
        path.unlink()
        return
    try:
        if psutil.Process(pid).create_time() == started:
            return  # that server still runs: the port check names the clash
    except psutil.NoSuchProcess:
        pass
    ray_dir = str((run_dir / "ray").resolve()) + os.sep  # through the link to a short folder, as Ray opened it

    def left_by_it(process: psutil.Process) -> bool:
        try:
            return runs_from(process, haproxy_dir) or any(f.path.startswith(ray_dir) for f in process.open_files())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    left = [process for process in psutil.process_iter() if process.pid != os.getpid() and left_by_it(process)]
    if left:
        print(f"[serve] ending {len(left)} processes that a killed server (pid {pid}) left running", flush=True)
        kill_all(left)
    if Path(haproxy_dir).name.startswith("stepwise-hx-"):  # only a folder `start` made
        shutil.rmtree(haproxy_dir, ignore_errors=True)
    path.unlink()


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM and Ctrl-C: the first starts the shutdown, which no later one may cut short (an impatient
    operator), not even before `stop` begins."""
    ignore_stop_signals()
    raise KeyboardInterrupt


def ignore_stop_signals() -> None:
    """From here on SIGTERM and Ctrl-C do nothing: a shutdown under way finishes (or HAProxy and Ray are left)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop() -> None:
    """Shut Serve down (proxy, replicas) and Ray too when `start` started it; frees the ports. On a cluster, only
    this app goes (other apps and Serve itself stay) and this process disconnects."""
    global _started_ray, _on_cluster
    import ray
    from ray import serve

    if ray.is_initialized() and _on_cluster:
        serve.delete(APP_NAME)
        ray.shutdown()
        _on_cluster = False
    elif ray.is_initialized():
        serve.shutdown()
        if _started_ray:
            ray.shutdown()
            _started_ray = False
            # Ray's agents exit a moment after shutdown returns: wait (briefly) until a restart can bind the ports.
            deadline = time.monotonic() + 15
            while any(port_error(*address) for address in _ports) and time.monotonic() < deadline:
                time.sleep(0.2)
            for folder in _haproxy_dir:
                kill_leftovers(folder)
                shutil.rmtree(folder, ignore_errors=True)
            for record in _server_record:
                record.unlink(missing_ok=True)
            # A later `start` in this process (tests, benchmarks) picks its own ports and folders again, instead of
            # reading this server's from the environment as if an operator had set them.
            for name, value in _environment_before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _environment_before.clear()
