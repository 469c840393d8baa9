"""`stepwise data`: what a task's data and its shipped teacher outputs look like, per split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from stepwise import tasks


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def split_stats(task: tasks.Task, split: str) -> dict:
    examples = tasks.load_split(task, split)
    with_teacher = [e for e in examples if e.teacher_completion is not None]
    parsed = [tasks.parse_completion(task, e.teacher_completion, e.choices) for e in with_teacher]
    ok = [p for p in parsed if p.status == "ok"]
    correct = sum(tasks.is_correct(task, p.label, e.label) for p, e in zip(parsed, with_teacher) if p.status == "ok")
    words = [len(p.rationale.split()) for p in ok]
    reasons = Counter(p.reason.split(":")[0] for p in parsed if p.status != "ok")
    return {
        "split": split,
        "examples": len(examples),
        "teacher_outputs": len(with_teacher),
        "parse_rate": len(ok) / len(with_teacher) if with_teacher else None,
        "teacher_accuracy": correct / len(with_teacher) if with_teacher else None,
        "rationale_words_p10_p50_p90": [percentile(words, q) for q in (0.1, 0.5, 0.9)],
        "malformed_reasons": dict(reasons.most_common(3)),
    }


def main(task: str, json_out: Path | None = None) -> None:
    """Sizes, teacher parse rate, teacher accuracy against gold and rationale lengths, per split.

    Args:
        task: svamp, cqa, esnli, or the path of a custom JSONL/CSV dataset.
        json_out: also write the numbers to this JSON file.
    """
    spec = tasks.get_task(task)
    rows = [split_stats(spec, split) for split in tasks.SPLITS]
    print(f"task {spec.name} ({spec.answer_style} answers); teacher accuracy counts malformed completions as wrong")
    header = f"{'split':<6} {'examples':>8} {'teacher':>8} {'parsed':>7} {'accuracy':>8}  rationale words p10/p50/p90  top malformed reasons"
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = "-" if r["parse_rate"] is None else f"{r['parse_rate']:.2%}"
        acc = "-" if r["teacher_accuracy"] is None else f"{r['teacher_accuracy']:.2%}"
        lengths = "/".join(map(str, r["rationale_words_p10_p50_p90"]))
        reasons = "; ".join(f"{k} x{v}" for k, v in r["malformed_reasons"].items())
        print(f"{r['split']:<6} {r['examples']:>8} {r['teacher_outputs']:>8} {rate:>7} {acc:>8}  {lengths:<28} {reasons}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"task": spec.name, "splits": rows}, indent=2))
