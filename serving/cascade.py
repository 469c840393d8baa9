"""`stepwise cascade`: the served cascade, offline. The student labels a split; its least sure fraction f (by
margin) goes to the teacher, whose answers are real ones: the shipped completions of the split (PaLM-540B for
the built-in tasks) parsed by the task layer, or any `stepwise extract` output folder. Accuracy against f from 0
to 1, with what each f costs per 1k predictions, as a table, JSON and a PNG; the teacher calls are saved.

    stepwise cascade --model runs/demo/export --split test            # e-SNLI student vs PaLM-540B's test answers
    stepwise cascade --model EXPORT --teacher runs/teacher-test --teacher-cost runs/teacher-test
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from stepwise import artifacts, progress, tasks

FRACTIONS = [round(i / 20, 2) for i in range(21)]


def teacher_answers(
    task: tasks.Task, split: str, examples: list[tasks.Example], teacher: Path | None
) -> dict[str, str]:
    """id -> the teacher's parsed label, for the examples it answered readably (a malformed answer is left out:
    as served, the student's answer then stands)."""
    if teacher is None:
        if not any(e.teacher_completion for e in examples):
            raise ValueError(
                f"task {task.name!r} ships no teacher completions for this split: "
                "pass --teacher (a `stepwise extract` output folder)"
            )
        parsed = {
            e.id: tasks.parse_completion(task, e.teacher_completion, e.choices)
            for e in examples
            if e.teacher_completion
        }
        return {i: p.label for i, p in parsed.items() if p.status == "ok"}
    records = artifacts.read_records(teacher)
    config = artifacts.read_manifest(teacher)["config"]
    made_for = (config.get("task", {}).get("name"), config.get("split"))
    if made_for != (task.name, split):
        raise ValueError(
            f"{teacher} holds the teacher's answers for {made_for[0]}/{made_for[1]}, not {task.name}/{split}"
        )
    return {str(r["id"]): r["teacher_label"] for r in records if r["status"] == "ok"}


def cost_per_1k(teacher_cost: Path | None) -> dict[str, float] | None:
    """The teacher's generation seconds and tokens (prompt + generated) per 1k predictions, from the last run recorded
    in an extraction folder's manifest (the records it generated, not those an earlier run left)."""
    if teacher_cost is None:
        return None
    run = artifacts.read_manifest(teacher_cost)["last_run"] or {}
    records, generated = run.get("records_this_run", 0), run.get("this_run", {})
    if not records or not run.get("generation_s") or not generated.get("tokens_in"):
        raise ValueError(
            f"{teacher_cost}: its manifest records no teacher generation (time and tokens) in its last run: "
            "give the folder of a `stepwise extract --teacher vllm|openai` run that generated records "
            "(replay and dataset teachers cost nothing to measure)"
        )
    return {
        "seconds": 1000 * run["generation_s"] / records,
        "tokens": 1000 * (generated["tokens_in"] + generated["tokens_out"]) / records,
    }


def curve(
    task: tasks.Task, examples: list[tasks.Example], labels: list[str], margins: list[float], answers: dict[str, str]
) -> list[dict[str, Any]]:
    """Accuracy when the least sure fraction f goes to the teacher, for each f in FRACTIONS."""
    order = sorted(range(len(examples)), key=lambda i: margins[i])
    rows = []
    for fraction in FRACTIONS:
        asked = set(order[: round(fraction * len(examples))])
        final = [answers.get(examples[i].id, labels[i]) if i in asked else labels[i] for i in range(len(examples))]
        threshold = margins[order[len(asked) - 1]] if asked else None
        rows.append(
            {
                "fraction": fraction,
                "teacher_calls": len(asked),
                "margin_below": threshold,
                "accuracy": tasks.accuracy(task, final, [e.label for e in examples]),
            }
        )
    return rows


def plot(
    rows: list[dict[str, Any]], reference: dict[str, float], cost: dict[str, float] | None, title: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        [r["fraction"] for r in rows],
        [r["accuracy"] for r in rows],
        marker="o",
        color="tab:green",
        label="cascade (least sure first)",
    )
    ax.axhline(reference["student"], color="tab:gray", linestyle=":", label=f"student alone {reference['student']:.3f}")
    ax.axhline(
        reference["teacher"],
        color="tab:red",
        linestyle="--",
        label=f"teacher alone {reference['teacher']:.3f} (unreadable = wrong)",
    )
    ax.set_xlabel("share of predictions sent to the teacher")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    if cost:
        top = ax.secondary_xaxis("top", functions=(lambda f: f * cost["seconds"], lambda s: s / cost["seconds"]))
        top.set_xlabel("teacher seconds per 1k predictions")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    model: Path,
    split: str = "test",
    teacher: Path | None = None,
    teacher_cost: Path | None = None,
    limit: int = 0,
    batch_size: int = 16,
    out: Path = Path("runs/cascade"),
) -> Path:
    """Accuracy against the share of predictions sent to the teacher, least sure first; table, JSON and PNG.

    Args:
        model: the student: an export folder (`stepwise export`)
        split: the task split to label (its gold labels score the cascade)
        teacher: a `stepwise extract` output folder with the teacher's answers for the split (default: the task's
            shipped completions, PaLM-540B for svamp/cqa/esnli)
        teacher_cost: an extraction folder whose manifest gives the teacher's time and tokens per record, for the cost
            per 1k predictions
        limit: only the first N examples of the split (0: all)
        batch_size: inputs the student labels together
        out: folder for cascade.json, cascade.md, cascade.png and teacher_calls.jsonl
    """
    from stepwise.export.runtime import load_runtime, predict

    runtime = load_runtime(Path(model))
    task = runtime.task
    if not task.closed_label_set:
        raise ValueError(
            f"task {task.name!r} has open labels: "
            "the cascade ranks by the margin between candidate labels, which needs a closed label set"
        )
    examples = tasks.load_split(task, split)[: limit or None]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    answers = teacher_answers(task, split, examples, teacher)
    predictions, started = [], time.perf_counter()
    for start in progress.bar(
        range(0, len(examples), batch_size), desc=f"student on {task.name}/{split}", unit="batch"
    ):
        predictions += predict(runtime, examples[start : start + batch_size])
    student_seconds = time.perf_counter() - started
    labels, margins = [p.label for p in predictions], [p.margin for p in predictions]
    rows = curve(task, examples, labels, margins, answers)
    golds = [e.label for e in examples]
    reference = {
        "student": rows[0]["accuracy"],
        "teacher": tasks.accuracy(task, [answers.get(e.id, "") for e in examples], golds),
    }
    cost = cost_per_1k(teacher_cost)
    student_per_1k = 1000 * student_seconds / len(examples)
    for row in rows:
        row["seconds_per_1k"] = round(student_per_1k + row["fraction"] * cost["seconds"], 2) if cost else None
        row["teacher_tokens_per_1k"] = round(row["fraction"] * cost["tokens"]) if cost else None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = str(teacher) if teacher else f"shipped completions of {task.name}/{split}"
    calls = sorted(range(len(examples)), key=lambda i: margins[i])
    artifacts.write_atomic(
        out / "teacher_calls.jsonl",
        "".join(
            json.dumps(
                {
                    "rank": rank,
                    "id": examples[i].id,
                    "margin": margins[i],
                    "student": labels[i],
                    "teacher": answers.get(examples[i].id),
                    "gold": golds[i],
                }
            )
            + "\n"
            for rank, i in enumerate(calls)
        ),
    )
    result = {
        "model": str(Path(model).resolve()),
        "task": task.name,
        "split": split,
        "examples": len(examples),
        "teacher": source,
        "teacher_readable": len(answers) / len(examples),
        "reference": reference,
        "student_seconds_per_1k": round(student_per_1k, 2),
        "teacher_per_1k": cost,
        "rows": rows,
    }
    artifacts.write_json(out / "cascade.json", result)
    lines = [
        f"{task.name}/{split}, {len(examples)} examples; "
        f"teacher: {source} (readable for {len(answers) / len(examples):.1%}); "
        f"student alone {reference['student']:.3f}, teacher alone {reference['teacher']:.3f}\n",
        "| sent to the teacher | teacher calls | margins up to | accuracy | seconds per 1k | teacher tokens per 1k |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        margin = "-" if r["margin_below"] is None else f"{r['margin_below']:.3f}"
        lines.append(
            f"| {r['fraction']:.0%} | {r['teacher_calls']} | {margin} | {r['accuracy']:.3f} | "
            f"{r['seconds_per_1k'] or '-'} | {r['teacher_tokens_per_1k'] or '-'} |"
        )
    artifacts.write_atomic(out / "cascade.md", "\n".join(lines) + "\n")
    plot(rows, reference, cost, f"{task.name}/{split}: student-first cascade, teacher = {source}", out / "cascade.png")
    print("\n".join(lines), flush=True)
    return out
