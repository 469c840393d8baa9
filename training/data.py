"""Training data: the extraction stage's records joined to the task's train split, a fixed-seed data
fraction, and the (input, label, rationale) triples the student learns from.

The extraction output folder is the contract: JSONL shards (or Parquet, when pyarrow is installed) plus
manifest.json and task.json, one record per input with id, input, label, choices, rationale,
teacher_label, status ("ok", or why not), reason and fingerprint (of the input it was made from). It is
read through `stepwise.artifacts`, the contract both environments share.

Several sources (`--rationales A B`: two extractions, or an extraction and the teacher answers a server logged)
merge by id, the first source's usable record winning; each record keeps its `source`. A record of an input
outside the task's splits (a served input, say) is a training example of its own, once per input fingerprint, and
never when its input is a validation or test input.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stepwise import artifacts, storage, tasks

RECORD_FIELDS = ("id", "status")  # the minimum a record needs to be joined and filtered


@dataclass
class StudentExample:
    input: str  # the task input text; the student sees it with the predict:/explain: prefixes
    label: str  # the label it learns (gold or the teacher's)
    rationale: str | None  # the teacher's rationale (step-by-step only)
    source: str = ""  # the --rationales folder its teacher record came from ("": the task's own data)


def records_by_id(folder: str | Path) -> dict[str, dict]:
    """An extraction folder's records by id (`artifacts.read_records`). Where a rerun left two records for one
    id, an ok one wins."""
    records: dict[str, dict] = {}
    for row in artifacts.read_records(folder):
        missing = [name for name in RECORD_FIELDS if name not in row]
        if missing:
            raise ValueError(
                f"rationales folder {folder}: a record lacks {', '.join(missing)}: {json.dumps(row)[:120]}"
            )
        previous = records.get(str(row["id"]))
        if previous is None or previous["status"] != "ok":
            records[str(row["id"])] = row
    if not records:
        raise ValueError(f"rationales folder {folder} holds no records (*.jsonl or *.parquet shards)")
    return records


def usable(record: dict) -> bool:
    return record["status"] == "ok"


def records_by_source(sources: list[str | Path]) -> dict[str, dict]:
    """The records of several sources by id, each with its `source`: for an id more than one holds, the first
    source's ok record (or the first record, when none is ok)."""
    merged: dict[str, dict] = {}
    for source in sources:
        for record_id, record in records_by_id(source).items():
            previous = merged.get(record_id)
            if previous is None or (not usable(previous) and usable(record)):
                merged[record_id] = record | {"source": str(source)}
    return merged


def check_task_matches(folder: str | Path, task: tasks.Task) -> None:
    """Refuse rationales extracted for another task, or for the same data read another way (another label set,
    answer style or input template: e.g. --labels given to one stage only). The folder's task.json says which."""
    if not storage.exists(storage.join(folder, artifacts.TASK)):
        return
    extracted_for = tasks.load_task(folder)
    if extracted_for.name != task.name:
        raise ValueError(f"rationales in {folder} were extracted for task {extracted_for.name!r}, not {task.name!r}")
    compared = ("answer_style", "labels", "input_template") if task.source else ()  # a built-in task never differs
    for name in compared:
        theirs, ours = getattr(extracted_for, name), getattr(task, name)
        if theirs != ours:
            raise ValueError(
                f"rationales in {folder} were extracted with {name} {theirs!r}, this task has {ours!r}: "
                "give both stages the same task file or --labels"
            )


def check_extraction_finished(folder: str | Path, allow_incomplete: bool) -> None:
    """Refuse an extraction that is still being written or stopped before its end (the student would learn from
    part of the data without a word), unless --allow-incomplete; then say how much of it there is."""
    # On an object store there is no lock to ask (stepwise.extraction.run.hold_output): the manifest's `complete`
    # says whether the extraction finished
    holder = "" if storage.is_remote(folder) else artifacts.lock_holder(Path(folder) / artifacts.EXTRACT_LOCK)
    manifest = artifacts.read_manifest(folder) if storage.exists(storage.join(folder, artifacts.MANIFEST)) else None
    if holder:
        problem = f"rationales folder {folder} is being written by `stepwise extract` now ({holder})"
    elif manifest is not None and not manifest["complete"]:
        problem = (
            f"rationales folder {folder} is an unfinished extraction ({manifest['counts'].get('records', 0)} of "
            f"{manifest['expected_records']} records); rerun the same `stepwise extract` to finish it"
        )
    else:
        return
    if not allow_incomplete:
        raise ValueError(f"{problem}; or pass --allow-incomplete to train on the records it holds so far")
    print(f"[train] WARNING: {problem}; training on the records it holds so far (--allow-incomplete)", flush=True)


def data_fraction(examples: list, fraction: float, seed: int) -> list:
    """A fixed-seed random subset of `fraction` of the examples, in their original order. For one seed the
    subsets are nested: the 0.25 subset is inside the 0.5 one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data fraction must be in (0, 1], got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[: max(1, round(len(examples) * fraction))]) if examples else []
    return [examples[i] for i in keep]


def input_changed(record: dict, example: tasks.Example) -> bool:
    """The record was made from another input than the example now has (the data was edited since extraction).
    Records of older versions carry no fingerprint: their input text is compared instead."""
    if "fingerprint" in record:
        return record["fingerprint"] != tasks.input_fingerprint(example)
    return record.get("input") is not None and record["input"] != example.input


def training_examples(
    task: tasks.Task,
    records: dict[str, dict] | None,
    needs_teacher_label: bool,
    needs_rationale: bool,
    fraction: float,
    seed: int,
) -> tuple[list[StudentExample], dict]:
    """The train split's fraction, with the teacher's label and/or rationale joined by id where the mode
    needs them. Inputs the teacher failed on (status not ok), never saw, or saw in another version (the data
    changed since: `skipped_input_changed`) are skipped and counted."""
    train = tasks.load_split(task, "train")
    selected = data_fraction(train, fraction, seed)
    counts: Counter = Counter(train_split=len(train), selected=len(selected))
    if (needs_teacher_label or needs_rationale) and records is None:
        raise ValueError("this mode learns from the teacher: pass --rationales (an extraction output folder)")
    others = other_inputs(task, records or {}, {e.id for e in train}, needs_teacher_label, needs_rationale, counts)
    if records is not None and not any(e.id in records for e in train) and not others:
        raise ValueError(
            f"none of the {len(records)} records' ids are in task {task.name!r}'s train split: "
            "wrong --task or --rationales?"
        )
    examples = []
    for example in selected:
        record = records.get(example.id) if records is not None else None
        if needs_teacher_label or needs_rationale:
            if record is None:
                counts["skipped_no_record"] += 1
                continue
            if (
                record["status"] != "ok"
                or (needs_rationale and not record.get("rationale"))
                or (needs_teacher_label and not record.get("teacher_label"))
            ):
                counts["skipped_not_ok"] += 1
                continue
            if input_changed(record, example):  # its rationale explains another input: never train on it
                counts["skipped_input_changed"] += 1
                continue
        label = record["teacher_label"] if needs_teacher_label else example.label
        rationale = record["rationale"] if needs_rationale else None
        examples.append(StudentExample(example.input, label, rationale, record.get("source", "") if record else ""))
    examples += others
    counts["used"] = len(examples)
    if not examples:
        raise ValueError(f"no usable training examples for task {task.name!r} ({dict(counts)})")
    return examples, dict(counts)


def other_inputs(
    task: tasks.Task,
    records: dict[str, dict],
    train_ids: set[str],
    needs_teacher_label: bool,
    needs_rationale: bool,
    counts: Counter,
) -> list[StudentExample]:
    """Examples from records of inputs outside the task's splits (a server's logged teacher answers): usable for
    the mode (a teacher label or a gold one, a rationale where needed), one per input fingerprint; none of a
    validation or test input (the student would be selected and scored on what it trained on), nor of a train
    input (the split's own example stands for it)."""
    held_out = {tasks.input_fingerprint(e) for split in ("valid", "test") for e in tasks.load_split(task, split)}
    seen = {tasks.input_fingerprint(e) for e in tasks.load_split(task, "train")}
    examples = []
    for record in records.values():
        if str(record["id"]) in train_ids or not record.get("input"):
            continue
        fingerprint = record.get("fingerprint", "")
        label = record.get("teacher_label") if needs_teacher_label else record.get("label")
        if fingerprint in held_out:
            counts["skipped_held_out_input"] += 1
        elif fingerprint in seen or not fingerprint:  # a train input, or one already taken
            counts["skipped_duplicate_input" if fingerprint else "skipped_no_fingerprint"] += 1
        elif not usable(record) or not label or (needs_rationale and not record.get("rationale")):
            counts["skipped_not_ok"] += 1
        else:
            seen.add(fingerprint)
            rationale = record["rationale"] if needs_rationale else None
            examples.append(StudentExample(record["input"], label, rationale, record.get("source", "")))
    if examples:
        counts["other_inputs"] = len(examples)
    return examples
