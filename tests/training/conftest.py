"""Fixtures of the training tests: a real teacher's records (the shipped PaLM-540B outputs) in the extraction
output format; a small learnable task (the label is a deterministic function of the input) with rationales
in that format; running `stepwise` as a user would; the processes a run started."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stepwise import artifacts, tasks

ROOT = Path(__file__).resolve().parents[2]
# Four categories of eight words: an input is three words of its category and one of another, shuffled.
CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
    "animal": ["horse", "tiger", "zebra", "camel", "otter", "eagle", "whale", "mouse"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "silver", "black"],
    "tool": ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "ladder"],
}


@pytest.fixture(scope="session")
def esnli_rationales(tmp_path_factory) -> Path:
    from stepwise.extraction.run import main as extract

    return extract(task="esnli", out=tmp_path_factory.mktemp("esnli-rationales") / "extract", teacher="replay")


@pytest.fixture(scope="session")
def learnable_task(tmp_path_factory) -> Path:
    """A custom task (JSONL) whose label is the category most of its four words belong to: chance is 25%."""
    rng = random.Random(0)
    rows = []
    for split, count in (("train", 480), ("valid", 64), ("test", 64)):
        for i in range(count):
            label = rng.choice(list(CATEGORIES))
            other = rng.choice([c for c in CATEGORIES if c != label])
            words = rng.sample(CATEGORIES[label], 3) + [rng.choice(CATEGORIES[other])]
            rng.shuffle(words)
            rows.append({"id": f"words-{split}-{i:04d}", "split": split, "input": " ".join(words), "label": label})
    path = tmp_path_factory.mktemp("learnable") / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def learnable_rationales(learnable_task, tmp_path_factory) -> Path:
    """An extraction folder for the learnable task: a rationale naming the words of the winning category."""
    task = tasks.get_task(str(learnable_task))
    folder = tmp_path_factory.mktemp("learnable-rationales")
    records = []
    for example in tasks.load_split(task, "train"):
        members = [w for w in example.input.split() if w in CATEGORIES[example.label]]
        records.append({"id": example.id, "input": example.input, "label": example.label, "choices": None, "status": "ok", "reason": "",
                        "rationale": f"{', '.join(members)} are {example.label} words.", "teacher_label": example.label})
    artifacts.write_atomic(folder / "shard-words.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    artifacts.write_json(folder / artifacts.MANIFEST, {"records": len(records)})
    tasks.save_task(task, folder)
    return folder


def cli_env(**extra: str) -> dict[str, str]:
    """What a user's shell would hold, with Ray's token auth off (tests only) and one thread per process."""
    return dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", **extra)


def stepwise(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m stepwise ...` in a child process, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "stepwise", *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)
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
