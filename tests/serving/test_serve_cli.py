"""`stepwise serve` as a user and an operator run it: a separate process that answers HTTP with nothing of Ray
reachable beyond loopback, then SIGTERM (what systemd, Docker and Kubernetes send) or Ctrl-C shuts everything
down: exit code 0, both ports free again, no Ray process left behind, and a restart on the same ports answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from stepwise import tasks
from stepwise.serving.run import serve_args

from helpers import ROOT, free_port, loopback

pytestmark = pytest.mark.slow


def port_is_free(port: int) -> bool:
    """Nothing listens on it (connections of the stopped server in TIME_WAIT don't count: servers bind with
    SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def processes_using(folder: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(folder) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def start_server(export: Path, port: int, metrics_port: int, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "stepwise", *serve_args([export], port, run_dir, metrics_port, extra)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, server.stdout.read()
        try:
            # Its own HAProxy answers (one a killed server left behind could answer too)
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200 and holding(port) & {
                p.pid for p in psutil.Process(server.pid).children(recursive=True)
            }:
                return server
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "stepwise serve did not become ready"
        time.sleep(0.5)


def listening(server: subprocess.Popen, port: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of the server and all its descendants, once
    `port` is among them: Serve reloads HAProxy as replicas come up (the new process takes the sockets over from
    the old one), so a single pass can fall between the two."""
    deadline = time.monotonic() + 30
    while True:
        root = psutil.Process(server.pid)
        found = []
        for process in [root, *root.children(recursive=True)]:
            try:
                found += [
                    (c.laddr.ip, c.laddr.port, process.name())
                    for c in process.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN
                ]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if port in {p for _, p, _ in found} or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def haproxies() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}


def holding(port: int) -> set[int]:
    """The processes listening on `port`, on any address."""
    return {
        c.pid for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def running(pids: set[int]) -> set[int]:
    """Those of `pids` that have not exited (an orphan nobody reaps stays a zombie: it has)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def own_haproxies(server: subprocess.Popen) -> set[int]:
    """The server's own (its descendants: other servers on the machine start and stop HAProxies meanwhile). Ray's
    short-lived workers come and go while they are listed: name them in one pass that skips the ones gone."""
    descendants = psutil.Process(server.pid).children(recursive=True)
    return {
        p.info["pid"] for p in psutil.process_iter(["pid", "name"]) if p in descendants and p.info["name"] == "haproxy"
    }


def stop_and_check(
    server: subprocess.Popen, how: int, ports: tuple[int, ...], run_dir: Path, again: int | None = None
) -> None:
    """Stop `server` with signal `how` (and `again` a moment later, as an impatient operator does) and check that
    everything it ran is gone."""
    ours = own_haproxies(server)
    assert ours, "the server runs an HAProxy ingress"
    server.send_signal(how)
    before = ""
    if again is not None:
        while "shutting down" not in before and server.poll() is None:  # once the shutdown has begun
            before += server.stdout.readline()
        server.send_signal(again)
    output, _ = server.communicate(timeout=90)
    output = before + output
    assert server.returncode == 0, output
    assert "shutting down" in output and "Traceback" not in output
    assert all(port_is_free(p) for p in ports), [p for p in ports if not port_is_free(p)]
    deadline = time.monotonic() + 30
    while processes_using(run_dir) and time.monotonic() < deadline:  # raylet children exit a moment later
        time.sleep(0.5)
    assert not processes_using(run_dir), [p.info["cmdline"][:3] for p in processes_using(run_dir)]
    assert not ours & haproxies(), "HAProxy outlived the server"


def test_sigterm_shuts_down_cleanly_and_nothing_listens_beyond_loopback(tiny_export_dir, tmp_path_factory):
    # A short folder: Ray's socket paths under it must stay within 107 bytes.
    port, metrics_port, run_dir = free_port(), free_port(), tmp_path_factory.mktemp("cli")
    server = start_server(tiny_export_dir, port, metrics_port, run_dir)
    try:
        # The model id defaults to the export's task name; a single served model needs no id in the request.
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/predict",
            json={"inputs": {"premise": "A dog runs.", "hypothesis": "An animal moves."}},
            timeout=30,
        ).json()
        assert answer["model"] == "esnli" and answer["predictions"][0]["label"] in tasks.NLI_LABELS
        sockets = listening(server, port)
        assert len(sockets) >= 8, sockets  # the proxy, GCS, raylet, workers, agents, metrics: all of them counted
        assert (port in {p for _, p, _ in sockets}) and (metrics_port in {p for _, p, _ in sockets})
        assert [s for s in sockets if not loopback(s[0])] == []
        stop_and_check(server, signal.SIGTERM, (port, metrics_port), run_dir)
    finally:
        if server.poll() is None:
            server.kill()
    # The same ports again at once: nothing of the first server holds them.
    again = start_server(tiny_export_dir, port, metrics_port, run_dir)
    try:
        assert (
            httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": "a dog runs"}, timeout=30).status_code
            == 200
        )
        stop_and_check(again, signal.SIGINT, (port, metrics_port), run_dir)
    finally:
        if again.poll() is None:
            again.kill()


def test_a_killed_server_is_cleaned_up_by_the_next_start_and_a_second_ctrl_c_finishes_the_shutdown(
    tiny_export_dir, tmp_path_factory
):
    """kill -9 (Kubernetes after the grace period) takes the server's Ray driver down but not HAProxy, which Ray
    starts in its own session (it keeps the HTTP port), nor Ray's agents (one keeps the metrics port). The next
    `stepwise serve` on the run folder ends them and answers on the same ports."""
    port, metrics_port, run_dir = free_port(), free_port(), tmp_path_factory.mktemp("killed")
    server = start_server(tiny_export_dir, port, metrics_port, run_dir)
    server.kill()
    server.communicate(timeout=30)
    left = holding(port) | holding(metrics_port)
    try:
        assert holding(port) and holding(metrics_port), "the killed server's processes still hold both ports"
        again = start_server(tiny_export_dir, port, metrics_port, run_dir)
        try:
            assert not running(left), "the next start ended what the killed server left"
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": "a dog runs"}, timeout=30)
            assert answer.status_code == 200
            stop_and_check(again, signal.SIGINT, (port, metrics_port), run_dir, again=signal.SIGINT)
            assert not (run_dir / "server.json").exists()
        finally:
            if again.poll() is None:  # stopped as an operator would, or it leaves the same behind
                again.send_signal(signal.SIGTERM)
                again.communicate(timeout=90)
    finally:
        for pid in running(left):
            psutil.Process(pid).kill()


SERVE_HTTP = (
    "haproxy",
    "ray::ProxyActor",
    "ray::ServeReplica",
)  # Serve's HTTP side: HAProxy, the fallback proxy, replicas' own HTTP


def test_serving_beyond_loopback_keeps_ray_local_and_turns_on_token_auth(tiny_export_dir, tmp_path_factory):
    port, metrics_port, run_dir = free_port(), free_port(), tmp_path_factory.mktemp("public")
    server = start_server(tiny_export_dir, port, metrics_port, run_dir, "--host", "0.0.0.0")
    try:
        public = [s for s in listening(server, port) if not loopback(s[0])]
        assert ("0.0.0.0", port, "haproxy") in public
        # Beyond loopback only Serve's HTTP servers (the API and the app behind it): nothing of Ray itself.
        assert [s for s in public if not s[2].startswith(SERVE_HTTP)] == [], public
        assert metrics_port not in {p for _, p, _ in public}
        # HAProxy's stats page (no authentication) and its metrics stay on loopback: public is the API alone
        assert [s for s in public if s[2] == "haproxy" and s[1] != port] == [], public
        token = run_dir / "ray-auth-token"
        assert token.stat().st_mode & 0o077 == 0 and len(token.read_text()) == 64
        stop_and_check(server, signal.SIGTERM, (port, metrics_port), run_dir)
    finally:
        if server.poll() is None:
            server.kill()


def test_a_taken_port_is_a_one_line_error_before_ray_starts(tiny_export_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-m", "stepwise", *serve_args([tiny_export_dir], port, tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert (
        f"stepwise serve: error: HTTP port {port} on 127.0.0.1 is not available" in done.stderr
        and "Traceback" not in done.stderr
    )
    assert not processes_using(tmp_path)
