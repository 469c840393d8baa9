"""Progress on long work that reads well wherever it goes: a live bar on a terminal; in a pipe or a log file a plain
line every 30 s (`STEPWISE_PROGRESS_INTERVAL_S`), never one line per update. `--progress bar|plain|off` on any
command (or `STEPWISE_PROGRESS`) chooses; `TQDM_DISABLE=1` still turns every bar off."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

MODES = ("auto", "bar", "plain", "off")


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def mode() -> str:
    chosen = os.environ.get("STEPWISE_PROGRESS", "auto")
    if chosen not in MODES:
        raise ValueError(f"STEPWISE_PROGRESS={chosen!r}: choose one of {', '.join(MODES)}")
    if chosen == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return chosen


def bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """tqdm with stepwise's output rules (options as tqdm's: total, desc, unit, disable, ...)."""
    from tqdm import tqdm  # imported here: the command line imports this module under a bare python3

    chosen = mode()
    if chosen == "off":
        options["disable"] = True
    elif chosen == "plain":
        interval = float(os.environ.get("STEPWISE_PROGRESS_INTERVAL_S", "30"))
        options |= {"file": _Lines(sys.stderr), "mininterval": interval, "maxinterval": interval, "ascii": True}
        options |= {"ncols": 100, "dynamic_ncols": False}
    return tqdm(iterable, **options)
