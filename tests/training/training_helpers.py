"""Helpers of the training tests: running `stepwise` as a user would, the processes a run started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """What a user's shell would hold, with Ray's token auth off (tests only) and one thread per process."""
    return dict(
        os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", **extra
    )


def stepwise(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m stepwise ...` in a child process, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "stepwise", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode:
        raise AssertionError(f"stepwise {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (Ray's daemons and workers are children of the driver that started Ray),
    with its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


def esnli_train(out: Path, rationales: Path, *flags: str) -> list[str]:
    """`stepwise train` arguments of a small step-by-step e-SNLI run of a tiny student; `flags` come last and
    win over the defaults here (argparse keeps the last value of a repeated flag)."""
    return ["train", "--task", "esnli", "--rationales", str(rationales), "--student", "tiny", "--out", str(out),
            "--data-fraction", "0.03", "--learning-rate", "1e-3", "--batch-size", "16", "--eval-limit", "16",
            "--max-input-length", "96", "--max-target-length", "48", *flags]  # fmt: skip


def start_stepwise(*args: str, **popen) -> subprocess.Popen:
    """`python -m stepwise ...` started in the background (to be killed), its output discarded."""
    return subprocess.Popen([sys.executable, "-m", "stepwise", *args], cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **popen)  # fmt: skip
