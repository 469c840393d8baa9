"""From teacher output to records: parse each completion (majority vote over samples), one record per input.
Shared by the single-process loop (`run`) and the Ray actors (`ray_job`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from stepwise import tasks
from stepwise.extraction import shards, teachers

# Where a record's rationale came from, by teacher backend: generated now by an LLM, a teacher's raw text given
# with the data (the `completion` column, or the shipped PaLM outputs), or the data's own `rationale` column.
RATIONALE_SOURCES = {"vllm": "teacher", "openai": "teacher", "replay": "completion", "dataset": "dataset"}


def vote(task: tasks.Task, example: tasks.Example, completions: list[str]) -> tuple[tasks.Parsed, dict[str, int]]:
    """Parse every sample; with several, the most common parsed label wins (self-consistency) and the
    first rationale that reached it is kept."""
    parsed = [tasks.parse_completion(task, c, example.choices) for c in completions]
    ok = [p for p in parsed if p.status == "ok"]
    if not ok:
        return parsed[0], {}

    def key(label: str) -> str:  # equal answers written differently count as one ("2*3" and "3 * 2")
        value = tasks.evaluate_equation(label) if task.answer_style == "equation" else None
        return f"{value:.6g}" if value is not None else tasks.normalize(label)

    votes = Counter(key(p.label) for p in ok)
    winner = votes.most_common(1)[0][0]
    return next(p for p in ok if key(p.label) == winner), dict(votes)


def make_record(task: tasks.Task, example: tasks.Example, generation: teachers.Generation, teacher_meta: dict) -> dict:
    if generation.error:
        parsed, votes, status = tasks.Parsed("", "", "malformed", generation.error), {}, "error"
    elif generation.given is not None:
        parsed, votes, status = generation.given, {}, generation.given.status
    else:
        parsed, votes = vote(task, example, generation.completions)
        status = parsed.status
    correct = tasks.is_correct(task, parsed.label, example.label) if status == "ok" and example.label else False
    return {
        "id": example.id,
        "input": example.input,
        "label": example.label,
        "choices": example.choices,
        "completions": generation.completions,
        "rationale": parsed.rationale,
        "teacher_label": parsed.label,
        "status": status,
        "reason": parsed.reason,
        "correct": correct,
        "votes": votes,
        "tokens_in": generation.tokens_in,
        "tokens_out": generation.tokens_out,
        "teacher": teacher_meta,
        "rationale_source": RATIONALE_SOURCES[teacher_meta["backend"]],
        "fingerprint": tasks.input_fingerprint(example),
    }


def generate_records(
    task: tasks.Task,
    generate: teachers.Teacher,
    shots: list[str],
    examples: Iterable[tasks.Example],
    teacher_meta: dict,
) -> Iterator[dict]:
    """Records as the teacher finishes them; prompts are built lazily, as the backend pulls work."""
    work = ((e, tasks.few_shot_prompt(task, shots, e)) for e in examples)
    for example, generation in generate(work):
        yield make_record(task, example, generation, teacher_meta)


def process_chunk(
    task: tasks.Task,
    generate: teachers.Teacher,
    shots: list[str],
    chunk: list[tasks.Example],
    teacher_meta: dict,
    out: Path,
    shard_format: str,
) -> list[dict]:
    """One chunk through the teacher into one shard (what each Ray actor does per batch)."""
    records = list(generate_records(task, generate, shots, chunk, teacher_meta))
    shards.write_shard(out, records, shard_format)
    return records


def tally(record: dict) -> dict:
    """The part of a record the counts need (kept in memory for the whole job)."""
    kept = {k: record[k] for k in ("id", "status", "reason", "label", "correct", "tokens_in", "tokens_out")}
    return kept | {"rationale_source": record.get("rationale_source", "")}  # absent from records of older versions
