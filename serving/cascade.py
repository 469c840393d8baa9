"""`stepwise cascade`: the served cascade, offline. The student labels a split; its least sure fraction f (by
margin) goes to the teacher, whose answers are real ones: the shipped completions of the split (PaLM-540B for
the built-in tasks) parsed by the task layer, or any `stepwise extract` output folder. Accuracy against f from 0
to 1, with what each f costs per 1k predictions, as a table, JSON and a PNG; the teacher calls are saved.

    stepwise cascade --model runs/demo/export --split test            # e-SNLI student vs PaLM-540B's test answers
    stepwise cascade --model EXPORT --teacher runs/teacher-test --teacher-cost runs/teacher-test
    stepwise cascade --model EXPORT --target-share 0.1     # calibrate the served margin on valid, into the export
    stepwise cascade --model EXPORT --compare-signals      # margin, consistency and both (--fallback-signal)

With a target (a share of predictions for the teacher, or an accuracy to reach), the margin threshold is chosen on
the validation split, as RouteLLM's `calibrate_threshold` does (the margin quantile below which the target share
falls), and written into the export folder's cascade_settings.json, which `stepwise serve --fallback-share` reads.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise import artifacts, progress, storage, tasks

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


def accuracy_asking(
    task: tasks.Task, examples: list[tasks.Example], labels: list[str], answers: dict[str, str], asked: set[int]
) -> float:
    """The cascade's accuracy when the examples `asked` go to the teacher (its unreadable answers leave the
    student's, as served)."""
    final = [answers.get(e.id, labels[i]) if i in asked else labels[i] for i, e in enumerate(examples)]
    return tasks.accuracy(task, final, [e.label for e in examples])


def curve(
    task: tasks.Task, examples: list[tasks.Example], labels: list[str], margins: list[float], answers: dict[str, str]
) -> list[dict[str, Any]]:
    """Accuracy when the least sure fraction f goes to the teacher, for each f in FRACTIONS."""
    order = sorted(range(len(examples)), key=lambda i: margins[i])
    rows = []
    for fraction in FRACTIONS:
        asked = set(order[: round(fraction * len(examples))])
        threshold = margins[order[len(asked) - 1]] if asked else None
        rows.append(
            {
                "fraction": fraction,
                "teacher_calls": len(asked),
                "margin_below": threshold,
                "accuracy": accuracy_asking(task, examples, labels, answers, asked),
            }
        )
    return rows


def signal_comparison(
    task: tasks.Task,
    examples: list[tasks.Example],
    labels: list[str],
    margins: list[float],
    reached: list[str],
    answers: dict[str, str],
) -> dict[str, Any]:
    """The served signals side by side (`stepwise serve --fallback-signal`), given the label each rationale reaches:
    consistency sends every prediction whose rationale disagrees with its label (one point: every input's rationale
    decoded); both decodes the rationales of the least sure fraction f only (the margin curve's f) and sends those
    that disagree, so at each f it makes fewer teacher calls than the margin alone."""
    disagree = {i for i, label in enumerate(labels) if reached[i] != label}
    order = sorted(range(len(examples)), key=lambda i: margins[i])
    both = []
    for fraction in FRACTIONS:
        asked = set(order[: round(fraction * len(examples))]) & disagree
        both.append(
            {
                "decoded": fraction,
                "teacher_calls": len(asked),
                "sent": len(asked) / len(examples),
                "accuracy": accuracy_asking(task, examples, labels, answers, asked),
            }
        )
    consistency = {
        "teacher_calls": len(disagree),
        "sent": len(disagree) / len(examples),
        "accuracy": accuracy_asking(task, examples, labels, answers, disagree),
    }
    return {"consistency": consistency, "both": both}


def threshold_for(margins: list[float], sent: int) -> float:
    """The margin below which the `sent` least sure predictions fall: halfway between the sent-th smallest margin and
    the next (0 sends none, a margin of 1.0, the surest there is, is never sent)."""
    ranked = sorted(margins)
    if sent <= 0:
        return 0.0
    if sent >= len(ranked):
        return 1.0
    return (ranked[sent - 1] + ranked[sent]) / 2


def at_threshold(
    task: tasks.Task,
    examples: list[tasks.Example],
    labels: list[str],
    margins: list[float],
    answers: dict[str, str],
    threshold: float,
) -> tuple[float, float]:
    """The share the fallback sends at `threshold` (margin strictly below it, as served) and the cascade's accuracy."""
    asked = {i for i, m in enumerate(margins) if m < threshold}
    return len(asked) / len(examples), accuracy_asking(task, examples, labels, answers, asked)


def sent_for_accuracy(
    task: tasks.Task,
    examples: list[tasks.Example],
    labels: list[str],
    margins: list[float],
    answers: dict[str, str],
    target: float,
) -> int:
    """The fewest least sure predictions whose answers by the teacher bring the cascade's accuracy to `target`; a
    ValueError naming the best reachable when none does."""
    order = sorted(range(len(examples)), key=lambda i: margins[i])
    student = [tasks.is_correct(task, labels[i], examples[i].label) for i in order]
    cascade = [tasks.is_correct(task, answers.get(examples[i].id, labels[i]), examples[i].label) for i in order]
    correct, best = sum(student), (sum(student), 0)
    for sent in range(len(order) + 1):
        if correct / len(order) >= target:
            return sent
        if sent < len(order):
            correct += cascade[sent] - student[sent]
            best = max(best, (correct, sent + 1), key=lambda b: b[0])
    raise ValueError(
        f"no share of teacher calls reaches accuracy {target} on this split: the best is {best[0] / len(order):.3f}, "
        f"sending {best[1] / len(order):.1%}"
    )


@dataclass(frozen=True)
class CalibrationOptions:
    """Pick the served fallback's margin for a target on a held-out split and write it into the export folder
    (cascade_settings.json, read by `stepwise serve --fallback-share`).

    Args:
        target_share: the share of predictions to send to the teacher, in (0, 1) (0: no calibration)
        target_accuracy: the cascade accuracy to reach with the fewest teacher calls, in (0, 1] (0: none)
        calibrate_on: the split the threshold is chosen on (never the test split, which stays held out)
        calibration_teacher: a `stepwise extract` folder with the teacher's answers for that split (default: the task's
            shipped completions); only the accuracy target uses them
        calibration_limit: only the first N examples of that split (0: all)
    """

    target_share: float = 0.0
    target_accuracy: float = 0.0
    calibrate_on: str = "valid"
    calibration_teacher: Path | None = None
    calibration_limit: int = 0

    def __post_init__(self) -> None:
        if self.target_share and self.target_accuracy:
            raise ValueError("give --target-share or --target-accuracy, not both")
        if not 0.0 <= self.target_share < 1.0:
            raise ValueError(f"--target-share is a share of predictions in (0, 1), got {self.target_share}")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"--target-accuracy is in (0, 1], got {self.target_accuracy}")
        if self.wanted and self.calibrate_on == "test":
            raise ValueError("--calibrate-on test: the threshold is chosen on another split, the test split checks it")

    @property
    def wanted(self) -> dict[str, float]:
        """What the threshold is calibrated for ({} when nothing is)."""
        if self.target_share:
            return {"share": self.target_share}
        return {"accuracy": self.target_accuracy} if self.target_accuracy else {}


def check_step_by_step(folder: str | Path, who: str, wanted: str) -> None:
    """ValueError naming the export unless it was trained step-by-step: the consistency signal scores the labels on
    the student's own rationale, which only such a student learnt to write."""
    trained = artifacts.read_train_config(folder)
    mode = trained["mode"] if trained else f"unknown, no {artifacts.TRAIN_CONFIG}"
    if mode != "step-by-step":
        raise ValueError(
            f"{who}: {folder} was not trained step-by-step (mode: {mode}), so it writes no rationale for {wanted} "
            "to check; the margin signal works for any export"
        )


def calibrated_margin(folder: str | Path, share: float, model_id: str = "") -> float:
    """The margin `stepwise serve --fallback-share SHARE` sends by: the export's calibrated threshold, refused (a
    ValueError saying which `stepwise cascade` to run) when the export has none, or one for another target, or one
    calibrated on another version of the export."""
    who = f"model {model_id!r}: {folder}" if model_id else str(folder)
    rerun = f"calibrate it with `stepwise cascade --target-share {share} --model {folder}`"
    settings = artifacts.read_cascade_settings(folder)
    if settings is None:
        raise ValueError(f"{who} has no {artifacts.CASCADE_SETTINGS} for --fallback-share: {rerun}")
    calibrated = settings["target"].get("share")
    if calibrated is None or not math.isclose(calibrated, share):
        target = ", ".join(f"{k} {v}" for k, v in settings["target"].items())
        raise ValueError(f"{who} was calibrated for target {target}, not share {share}: {rerun}")
    version = artifacts.read_export_config(folder)["version"]
    if settings["version"] != version:
        raise ValueError(f"{who} was calibrated on export version {settings['version']}, not {version}: {rerun}")
    return settings["threshold"]


def plot(
    rows: list[dict[str, Any]],
    reference: dict[str, float],
    cost: dict[str, float] | None,
    signals: dict[str, Any] | None,
    title: str,
    path: Path,
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
        label="cascade (least sure first)" if not signals else "margin (least sure first)",
    )
    if signals:
        both, alone = signals["both"], signals["consistency"]
        ax.plot(
            [r["sent"] for r in both],
            [r["accuracy"] for r in both],
            marker="s",
            color="tab:blue",
            label="both (rationales of the least sure, sent on disagreement)",
        )
        ax.plot(
            [alone["sent"]],
            [alone["accuracy"]],
            marker="*",
            markersize=12,
            linestyle="",
            color="tab:purple",
            label="consistency (every rationale, sent on disagreement)",
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


def rationale_check(
    runtime: Any, examples: list[tasks.Example], predictions: list[Any], batch_size: int
) -> tuple[list[str], float]:
    """The label each prediction's rationale reaches (what the served consistency signal computes) and the seconds
    it took: a rationale decoded, then the labels scored on it, per input."""
    from stepwise.export.runtime import rationale_labels

    reached, started = [], time.perf_counter()
    for start in progress.bar(
        range(0, len(examples), batch_size), desc=f"rationales on {runtime.task.name}", unit="batch"
    ):
        end = start + batch_size
        reached += rationale_labels(runtime, examples[start:end], predictions[start:end])
    return reached, time.perf_counter() - started


def label_split(
    runtime: Any, split: str, limit: int, batch_size: int, teacher: Path | None
) -> tuple[list[tasks.Example], list[Any], dict[str, str], float]:
    """A split's examples, the student's predictions of them, the teacher's answers and the student's seconds."""
    from stepwise.export.runtime import predict

    task = runtime.task
    examples = tasks.load_split(task, split)[: limit or None]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    answers = teacher_answers(task, split, examples, teacher)
    predictions, started = [], time.perf_counter()
    for start in progress.bar(
        range(0, len(examples), batch_size), desc=f"student on {task.name}/{split}", unit="batch"
    ):
        predictions += predict(runtime, examples[start : start + batch_size])
    return examples, predictions, answers, time.perf_counter() - started


def calibrate(
    runtime: Any, calibration: CalibrationOptions, batch_size: int, folder: str | Path
) -> artifacts.CascadeSettings:
    """The margin threshold for the calibration's target on its split, written into the export `folder` (the
    runtime's own, or the object-store prefix it was downloaded from)."""
    split = calibration.calibrate_on
    teacher = calibration.calibration_teacher
    examples, predictions, answers = label_split(runtime, split, calibration.calibration_limit, batch_size, teacher)[:3]
    labels, margins = [p.label for p in predictions], [p.margin for p in predictions]
    if calibration.target_share:
        sent = round(calibration.target_share * len(examples))
    else:
        sent = sent_for_accuracy(runtime.task, examples, labels, margins, answers, calibration.target_accuracy)
    threshold = threshold_for(margins, sent)
    share, accuracy = at_threshold(runtime.task, examples, labels, margins, answers, threshold)
    settings: artifacts.CascadeSettings = {
        "target": calibration.wanted,
        "threshold": threshold,
        "share": share,
        "accuracy": accuracy,
        "split": split,
        "examples": len(examples),
        "teacher": str(teacher) if teacher else f"shipped completions of {runtime.task.name}/{split}",
        "version": runtime.version,
    }
    written = artifacts.write_cascade_settings(folder, settings)
    print(
        f"[cascade] calibrated on {runtime.task.name}/{split} ({len(examples)} examples) for "
        f"{calibration.wanted}: margin below {threshold:.4f} sends {settings['share']:.1%} to the teacher, "
        f"accuracy {settings['accuracy']:.3f}; written to {written}",
        flush=True,
    )
    return settings


def main(
    model: str | Path,
    split: str = "test",
    teacher: Path | None = None,
    teacher_cost: Path | None = None,
    limit: int = 0,
    batch_size: int = 16,
    out: Path = Path("runs/cascade"),
    calibration: CalibrationOptions = CalibrationOptions(),
    compare_signals: bool = False,
) -> Path:
    """Accuracy against the share of predictions sent to the teacher, least sure first; table, JSON and PNG.

    Args:
        model: the student: an export folder (`stepwise export`), local or on an object store (s3://bucket/prefix;
            a calibration is then written back there)
        split: the task split to label (its gold labels score the cascade)
        teacher: a `stepwise extract` output folder with the teacher's answers for the split (default: the task's
            shipped completions, PaLM-540B for svamp/cqa/esnli)
        teacher_cost: an extraction folder whose manifest gives the teacher's time and tokens per record, for the cost
            per 1k predictions
        limit: only the first N examples of the split (0: all)
        batch_size: inputs the student labels together
        out: folder for cascade.json, cascade.md, cascade.png and teacher_calls.jsonl
        calibration: with a target, the served fallback's margin chosen on a held-out split first; the curve then
            says what that margin does on --split
        compare_signals: also decode every input's rationale and compare the served fallback signals (margin,
            consistency, both: `stepwise serve --fallback-signal`) and what the rationale check costs per input; an
            export trained step-by-step only
    """
    from stepwise.export.runtime import load_runtime

    location = storage.as_location(model)
    if storage.is_remote(location):
        storage.check_location(location, "--model", must_exist=True)
    runtime = load_runtime(storage.local_folder(location, "--model"))
    task = runtime.task
    if not task.closed_label_set:
        raise ValueError(
            f"task {task.name!r} has open labels: "
            "the cascade ranks by the margin between candidate labels, which needs a closed label set"
        )
    if compare_signals:
        check_step_by_step(runtime.export_dir, "--model", "--compare-signals")
    if calibration.wanted:
        calibrate(runtime, calibration, batch_size, location)
    examples, predictions, answers, student_seconds = label_split(runtime, split, limit, batch_size, teacher)
    labels, margins = [p.label for p in predictions], [p.margin for p in predictions]
    rows = curve(task, examples, labels, margins, answers)
    signals = None
    if compare_signals:
        reached, check_seconds = rationale_check(runtime, examples, predictions, batch_size)
        signals = signal_comparison(task, examples, labels, margins, reached, answers)
        signals["check_seconds_per_1k"] = round(1000 * check_seconds / len(examples), 2)
    golds = [e.label for e in examples]
    reference = {
        "student": rows[0]["accuracy"],
        "teacher": tasks.accuracy(task, [answers.get(e.id, "") for e in examples], golds),
    }
    settings = artifacts.read_cascade_settings(location)
    if settings:  # what the served margin does on this split
        share, accuracy = at_threshold(task, examples, labels, margins, answers, settings["threshold"])
        settings = {**settings, "on_split": {"split": split, "share": share, "accuracy": accuracy}}
    cost = cost_per_1k(teacher_cost)
    student_per_1k = 1000 * student_seconds / len(examples)
    for row in rows:
        row["seconds_per_1k"] = round(student_per_1k + row["fraction"] * cost["seconds"], 2) if cost else None
        row["teacher_tokens_per_1k"] = round(row["fraction"] * cost["tokens"]) if cost else None

    source = str(teacher) if teacher else f"shipped completions of {task.name}/{split}"
    result = {
        "model": str(location) if storage.is_remote(location) else str(Path(location).resolve()),
        "task": task.name,
        "split": split,
        "examples": len(examples),
        "teacher": source,
        "teacher_readable": len(answers) / len(examples),
        "reference": reference,
        "calibrated": settings,
        "student_seconds_per_1k": round(student_per_1k, 2),
        "teacher_per_1k": cost,
        "rows": rows,
        "signals": signals,
    }
    calls = [
        {"rank": rank, "id": examples[i].id, "margin": margins[i], "student": labels[i],
         "teacher": answers.get(examples[i].id), "gold": golds[i]}
        for rank, i in enumerate(sorted(range(len(examples)), key=lambda i: margins[i]))
    ]  # fmt: skip
    return write_results(Path(out), result, calls)


def markdown(result: dict[str, Any]) -> str:
    """The cascade's table, with the calibrated margin's line where the export has one."""
    split, reference, settings = result["split"], result["reference"], result["calibrated"]
    lines = [
        f"{result['task']}/{split}, {result['examples']} examples; "
        f"teacher: {result['teacher']} (readable for {result['teacher_readable']:.1%}); "
        f"student alone {reference['student']:.3f}, teacher alone {reference['teacher']:.3f}\n",
    ]
    if settings:
        target = ", ".join(f"{k} {v}" for k, v in settings["target"].items())
        lines.append(
            f"Calibrated margin {settings['threshold']:.4f} (target {target} on {settings['split']}, "
            f"{settings['examples']} examples: {settings['share']:.1%} sent, accuracy {settings['accuracy']:.3f}) "
            f"sends {settings['on_split']['share']:.1%} of {split}, accuracy {settings['on_split']['accuracy']:.3f}\n"
        )
    lines += [
        "| sent to the teacher | teacher calls | margins up to | accuracy | seconds per 1k | teacher tokens per 1k |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        margin = "-" if r["margin_below"] is None else f"{r['margin_below']:.3f}"
        lines.append(
            f"| {r['fraction']:.0%} | {r['teacher_calls']} | {margin} | {r['accuracy']:.3f} | "
            f"{r['seconds_per_1k'] or '-'} | {r['teacher_tokens_per_1k'] or '-'} |"
        )
    signals = result["signals"]
    if signals:
        alone, per_1k = signals["consistency"], result["student_seconds_per_1k"]
        lines += [
            f"\nThe fallback signals (`--fallback-signal`): the label path takes {per_1k} s per 1k inputs, the "
            "rationale check (decoding the rationale, scoring the labels on it) "
            f"{signals['check_seconds_per_1k']} s per 1k inputs it checks. consistency checks every input and "
            f"sends {alone['sent']:.1%} ({alone['teacher_calls']} calls), accuracy {alone['accuracy']:.3f}.\n",
            "| least sure (margin sends them; both checks their rationales) | margins up to | margin: accuracy "
            "| both: sent | both: accuracy |",
            "|---|---|---|---|---|",
        ]
        for r, b in zip(result["rows"], signals["both"], strict=True):
            margin = "-" if r["margin_below"] is None else f"{r['margin_below']:.3f}"
            lines.append(
                f"| {r['fraction']:.0%} | {margin} | {r['accuracy']:.3f} | {b['sent']:.1%} | {b['accuracy']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict[str, Any], calls: list[dict[str, Any]]) -> Path:
    """cascade.json, cascade.md, cascade.png and teacher_calls.jsonl (least sure first) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_atomic(out / "teacher_calls.jsonl", "".join(json.dumps(call) + "\n" for call in calls))
    artifacts.write_json(out / "cascade.json", result)
    table = markdown(result)
    artifacts.write_atomic(out / "cascade.md", table)
    title = f"{result['task']}/{result['split']}: student-first cascade, teacher = {result['teacher']}"
    plot(result["rows"], result["reference"], result["teacher_per_1k"], result["signals"], title, out / "cascade.png")
    print(table, end="", flush=True)
    return out
