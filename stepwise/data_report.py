"""`stepwise data`: what a task's data and the teacher outputs that come with it look like, per split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from stepwise import artifacts, tasks

SHOWN_LABELS = 8  # the most common labels printed per split


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def word_percentiles(texts: list[str]) -> list[int]:
    words = [len(text.split()) for text in texts]
    return [percentile(words, q) for q in (0.1, 0.5, 0.9)]


def label_counts(task: tasks.Task, examples: list[tasks.Example]) -> Counter:
    """Gold labels by count; for a multiple-choice task by the answer's position, (a), (b), ..."""
    if task.answer_style == "choice":
        return Counter(
            f"({tasks.LETTERS[e.choices.index(e.label)]})" for e in examples if e.choices and e.label in e.choices
        )
    return Counter(e.label for e in examples)


def split_stats(task: tasks.Task, split: str) -> dict:
    examples = tasks.load_split(task, split)
    with_teacher = [e for e in examples if e.teacher_completion is not None]
    parsed = [tasks.parse_completion(task, e.teacher_completion, e.choices) for e in with_teacher]
    ok = [p for p in parsed if p.status == "ok"]
    correct = sum(
        tasks.is_correct(task, p.label, e.label) for p, e in zip(parsed, with_teacher, strict=True) if p.status == "ok"
    )
    reasons = Counter(p.reason.split(":")[0] for p in parsed if p.status != "ok")
    rationales = [e.rationale for e in examples if e.rationale]
    labels = label_counts(task, examples)
    return {
        "split": split,
        "examples": len(examples),
        "labels": dict(labels.most_common()),
        "teacher_outputs": len(with_teacher),
        "parse_rate": len(ok) / len(with_teacher) if with_teacher else None,
        "teacher_accuracy": correct / len(with_teacher) if with_teacher else None,
        "rationale_words_p10_p50_p90": word_percentiles([p.rationale for p in ok]),
        "malformed_reasons": dict(reasons.most_common(3)),
        "dataset_rationales": len(rationales),
        "dataset_rationale_words_p10_p50_p90": word_percentiles(rationales),
    }


def main(task: str, labels: list[str] | None = None, json_out: Path | None = None) -> Path | None:
    """Per split: sizes, the label distribution, the parse rate and accuracy against gold of the teacher
    completions that come with the data, and the lengths of their rationales and of the data's own ones.

    Args:
        task: svamp, cqa, esnli, or a custom dataset (JSONL/CSV/Parquet file, folder of split files, or a Hugging
            Face datasets folder).
        labels: a custom task's closed label set (overrides its task file's and the inferred one).
        json_out: also write the numbers to this JSON file.
    """
    task_def = tasks.get_task(task, labels)
    rows = [split_stats(task_def, split) for split in tasks.SPLITS]
    label_set = f"; labels {'/'.join(task_def.labels)}" if task_def.labels else ""
    print(
        f"task {task_def.name} ({task_def.answer_style} answers{label_set}); "
        "teacher accuracy counts malformed completions as wrong"
    )
    header = (
        f"{'split':<6} {'examples':>8} {'teacher':>8} {'parsed':>7} {'accuracy':>8}  {'teacher rationale words':<23} "
        f"{'data rationales':>15}  {'their words':<11}  top malformed reasons"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = "-" if r["parse_rate"] is None else f"{r['parse_rate']:.2%}"
        acc = "-" if r["teacher_accuracy"] is None else f"{r['teacher_accuracy']:.2%}"
        lengths = "/".join(map(str, r["rationale_words_p10_p50_p90"])) if r["teacher_outputs"] else "-"
        given = "/".join(map(str, r["dataset_rationale_words_p10_p50_p90"])) if r["dataset_rationales"] else "-"
        reasons = "; ".join(f"{k} x{v}" for k, v in r["malformed_reasons"].items())
        print(
            f"{r['split']:<6} {r['examples']:>8} {r['teacher_outputs']:>8} {rate:>7} {acc:>8}  {lengths:<23} "
            f"{r['dataset_rationales']:>15}  {given:<11}  {reasons}"
        )
    print("labels (gold, most common first):")
    for r in rows:
        shown = ", ".join(
            f"{label} {n} ({n / r['examples']:.0%})" for label, n in list(r["labels"].items())[:SHOWN_LABELS]
        )
        more = f", ... ({len(r['labels'])} distinct)" if len(r["labels"]) > SHOWN_LABELS else ""
        print(f"  {r['split']:<6} {shown or '-'}{more}")
    if json_out:
        artifacts.write_json(
            json_out,
            {
                "task": task_def.name,
                "answer_style": task_def.answer_style,
                "label_set": task_def.labels,
                "splits": rows,
            },
        )
    return json_out
