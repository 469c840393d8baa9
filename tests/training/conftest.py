"""Fixtures of the training tests: a real teacher's records (the shipped PaLM-540B outputs) in the extraction
output format; a small learnable task (the label is a deterministic function of the input) with rationales
in that format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from training_helpers import CATEGORIES

from stepwise import artifacts, tasks


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
