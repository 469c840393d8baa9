"""The teacher answers a server obtains, kept as training rows (`stepwise serve --fallback-log DIR`): each fallback
the teacher answered becomes a record in the extraction stage's format (id, input, label, choices, rationale,
teacher_label, status, reason, fingerprint; plus the student's label and margin, the signal that sent it, the model
id and version, the time), in JSONL shards under DIR/<model id>/ beside the task's task.json and a manifest marking
it as such, which `stepwise train --rationales EXTRACT_DIR DIR/<model id>` reads beside the extraction.

Off the request path: the replica hands rows to a writer thread through a bounded queue. The thread appends them to
a hidden file of its own and renames it into a shard once it holds SHARD_BYTES, is ROTATE_S old, or the replica
stops, so a reader only ever sees whole shards. The folder is bounded: past MAX_SHARDS shards the oldest go. A full
queue, a full disk or any write error drops the row and counts it; a request never fails for it. Inputs are user
data: of a request only the input (and its choices) is kept, never another field.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from stepwise import artifacts, tasks
from stepwise.export.runtime import Prediction

logger = logging.getLogger("ray.serve")

SHARD_BYTES = 1 << 20  # a shard is closed at 1 MiB ...
ROTATE_S = 60.0  # ... or a minute after its first row, whichever comes first
MAX_SHARDS = 256  # per model folder: 256 MiB at most
QUEUE_ROWS = 10_000  # rows waiting for the writer; beyond, new ones are dropped


def served_record(
    task: tasks.Task,
    example: tasks.Example,
    student: Prediction,
    teacher: Prediction,
    model_id: str,
    version: str,
    signal: str,
) -> dict:
    """One teacher answer as an extraction record. The id is the input's fingerprint, so an input served twice is
    one example to training; there is no gold label."""
    fingerprint = tasks.input_fingerprint(example)
    return {
        "id": f"served-{fingerprint}",
        "input": example.input,
        "label": "",
        "choices": example.choices,
        "rationale": teacher.rationale or "",
        "teacher_label": teacher.label,
        "status": "ok",
        "reason": "",
        "fingerprint": fingerprint,
        "student_label": student.label,
        "student_margin": student.margin,
        "signal": signal,  # what sent it to the teacher (--fallback-signal)
        "model": model_id,
        "version": version,
        "time": round(time.time(), 3),
    }


class FallbackLog:
    """A writer thread and its queue for one replica's model; `add` never blocks and never raises."""

    def __init__(self, folder: Path, task: tasks.Task, dropped: Callable[[str], None]):
        self.folder, self.dropped = Path(folder), dropped
        self.rows: queue.Queue[dict | None] = queue.Queue(QUEUE_ROWS)
        self.writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this replica's, in its files' names
        self.active, self.size, self.opened, self.closed = self.folder / f".served-{self.writer}.jsonl", 0, 0.0, 0
        self.folder.mkdir(parents=True, exist_ok=True)
        tasks.save_task(task, self.folder)  # the task the rows belong to, as an extraction folder has it
        if not (self.folder / artifacts.MANIFEST).exists():  # an extraction folder's mark; its shards are the count
            manifest = artifacts.whole_manifest(0, {"kind": "stepwise serve --fallback-log", "task": task.name})
            artifacts.write_json(self.folder / artifacts.MANIFEST, manifest | {"shards": 0, "counts": {}})
        self.thread = threading.Thread(target=self.write_rows, name="fallback-log", daemon=True)
        self.thread.start()

    def add(self, row: dict) -> None:
        try:
            self.rows.put_nowait(row)
        except queue.Full:
            self.dropped("queue full")

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, close the shard and stop the thread."""
        try:
            self.rows.put(None, timeout=timeout_s)
        except queue.Full:
            self.dropped("queue full at shutdown")
        self.thread.join(timeout_s)

    def write_rows(self) -> None:
        while True:
            try:
                row = self.rows.get(timeout=1.0)
            except queue.Empty:
                row = {}  # nothing new: only the shard's age is looked at
            if row:
                self.append(row)
            if self.size and (row is None or self.size >= SHARD_BYTES or time.monotonic() - self.opened >= ROTATE_S):
                self.close_shard()
            if row is None:
                return

    def append(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        try:
            with self.active.open("ab") as f:
                f.write(line)
        except OSError as problem:  # a full disk, a folder gone: the row is lost, the replica goes on
            self.dropped(type(problem).__name__)
            return
        self.size, self.opened = self.size + len(line), self.opened or time.monotonic()

    def close_shard(self) -> None:
        """The hidden file becomes a shard, named by when it closed (names sort oldest first); the oldest shards
        beyond MAX_SHARDS go."""
        self.closed += 1
        try:
            os.replace(self.active, self.folder / f"shard-served-{time.time():.3f}-{self.writer}-{self.closed}.jsonl")
            for old in sorted(self.folder.glob("shard-served-*.jsonl"))[:-MAX_SHARDS]:
                old.unlink(missing_ok=True)
        except OSError as problem:
            logger.warning(f"fallback log {self.folder}: {type(problem).__name__}: {problem}")
            self.dropped(type(problem).__name__)
        self.size, self.opened = 0, 0.0
