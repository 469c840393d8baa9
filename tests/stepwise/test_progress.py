"""Progress that pipes well (issue 22, item 4): a live bar on a terminal, a whole line every interval in a pipe, and
`--progress` on every command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stepwise import cli

from helpers import ROOT

WORK = """
import time
from stepwise import progress
for _ in progress.bar(range(200), desc="work", unit="item"):
    time.sleep(0.005)
"""


def run_work(**env: str) -> str:
    """stderr of 200 updates over about a second, with stderr a pipe (as in a log file or CI)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "STEPWISE_PROGRESS")} | env
    done = subprocess.run([sys.executable, "-c", WORK], cwd=ROOT, env=environment | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr.decode()  # bytes first: text mode would turn the bar's carriage returns into newlines


def test_in_a_pipe_progress_is_a_whole_line_every_interval():
    output = run_work(STEPWISE_PROGRESS_INTERVAL_S="0.4")
    lines = output.splitlines()
    assert "\r" not in output and 2 <= len(lines) <= 6, lines  # not one line per update (200)
    assert lines[-1].startswith("work: 100%") and "200/200" in lines[-1]


def test_a_chosen_mode_wins_over_the_pipe():
    assert run_work(STEPWISE_PROGRESS="off") == ""
    assert run_work(STEPWISE_PROGRESS="bar").count("\r") > 2  # redrawn in place, as on a terminal


def test_every_command_takes_progress(monkeypatch):
    from stepwise.serving import cascade

    monkeypatch.delenv("STEPWISE_PROGRESS", raising=False)
    with pytest.raises(SystemExit):
        cli.arguments(cascade.main, ["--model", "m", "--progress", "loud"])
    cli.arguments(cascade.main, ["--model", "m", "--progress", "plain"])
    assert os.environ["STEPWISE_PROGRESS"] == "plain"
