"""`stepwise cascade`: the offline cascade curve of the tiny e-SNLI student against real teacher answers (the shipped
PaLM-540B test completions, a `stepwise extract` folder, and the tiny teacher on a vLLM server for the cost)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stepwise import artifacts, cli, tasks
from stepwise.export.runtime import load_runtime, predict, rationale_labels
from stepwise.extraction import run as extraction
from stepwise.extraction.teachers import ClientOptions, SamplingOptions
from stepwise.serving import cascade

ESNLI = tasks.get_task("esnli")
LIMIT = 60


@pytest.fixture(scope="module")
def student(trained_export_dir) -> dict[str, list]:
    """The student's labels and margins on the first LIMIT test examples, computed here."""
    examples = tasks.load_split(ESNLI, "test")[:LIMIT]
    predictions = predict(load_runtime(trained_export_dir, threads=1), examples)
    return {"examples": examples, "labels": [p.label for p in predictions], "margins": [p.margin for p in predictions]}


def read_calls(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "teacher_calls.jsonl").read_text().splitlines()]


def test_the_curve_against_the_shipped_palm_answers(trained_export_dir, student, tmp_path):
    out = cascade.main(model=trained_export_dir, split="test", limit=LIMIT, out=tmp_path / "cascade")
    assert {p.name for p in out.iterdir()} == {"cascade.json", "cascade.md", "cascade.png", "teacher_calls.jsonl"}
    result = json.loads((out / "cascade.json").read_text())
    rows, examples, golds = result["rows"], student["examples"], [e.label for e in student["examples"]]
    palm = [tasks.parse_completion(ESNLI, e.teacher_completion, e.choices) for e in examples]
    assert result["examples"] == LIMIT and result["teacher_readable"] == sum(p.status == "ok" for p in palm) / LIMIT
    assert [r["fraction"] for r in rows] == cascade.FRACTIONS
    # f = 0 is the student alone; f = 1 is PaLM's answer wherever it is readable (the student's elsewhere, as served).
    assert rows[0]["teacher_calls"] == 0 and rows[0]["accuracy"] == tasks.accuracy(ESNLI, student["labels"], golds)
    final = [p.label if p.status == "ok" else label for p, label in zip(palm, student["labels"], strict=True)]
    assert rows[-1]["teacher_calls"] == LIMIT and rows[-1]["accuracy"] == tasks.accuracy(ESNLI, final, golds)
    assert result["reference"]["teacher"] == tasks.accuracy(ESNLI, [p.label for p in palm], golds)
    calls = [r["teacher_calls"] for r in rows]
    assert calls == sorted(calls) and len(set(calls)) == len(calls)
    # Least sure first: each step adds the next examples by margin, and its accuracy changes by their switches alone.
    margins = [r["margin_below"] for r in rows[1:]]
    assert margins == sorted(margins)
    saved = read_calls(out)
    assert [c["id"] for c in saved] == [
        examples[i].id for i in sorted(range(LIMIT), key=lambda i: student["margins"][i])
    ]
    assert [c["margin"] for c in saved] == sorted(c["margin"] for c in saved)
    assert [c["margin"] for c in saved] == pytest.approx(sorted(student["margins"]), abs=1e-6)
    assert {c["id"]: c["teacher"] for c in saved} == {
        e.id: p.label if p.status == "ok" else None for e, p in zip(examples, palm, strict=True)
    }
    assert result["teacher_per_1k"] is None and rows[-1]["seconds_per_1k"] is None  # no --teacher-cost
    assert "| 100% | 60 |" in (out / "cascade.md").read_text()


def test_an_extraction_folder_as_the_teacher(trained_export_dir, student, tmp_path):
    # The replay teacher on the first 40 test examples: the same PaLM answers, but only for those 40.
    teacher = extraction.main(task="esnli", split="test", teacher="replay", limit=40, out=tmp_path / "teacher")
    out = cascade.main(model=trained_export_dir, split="test", teacher=teacher, limit=LIMIT, out=tmp_path / "cascade")
    result = json.loads((out / "cascade.json").read_text())
    records = {r["id"]: r for r in artifacts.read_records(teacher)}
    answers = {i: r["teacher_label"] for i, r in records.items() if r["status"] == "ok"}
    assert result["teacher"] == str(teacher) and result["teacher_readable"] == len(answers) / LIMIT
    final = [answers.get(e.id, label) for e, label in zip(student["examples"], student["labels"], strict=True)]
    assert result["rows"][-1]["accuracy"] == tasks.accuracy(ESNLI, final, [e.label for e in student["examples"]])
    assert sum(c["teacher"] is not None for c in read_calls(out)) == len(answers)
    # A replay run generated nothing, so it has no cost to report.
    with pytest.raises(ValueError, match="records no teacher generation"):
        cascade.main(
            model=trained_export_dir,
            split="test",
            teacher=teacher,
            teacher_cost=teacher,
            limit=LIMIT,
            out=tmp_path / "cost",
        )
    # Answers for another split are refused, not silently matched to nothing.
    valid = extraction.main(task="esnli", split="valid", teacher="replay", limit=5, out=tmp_path / "valid")
    with pytest.raises(ValueError, match="answers for esnli/valid, not esnli/test"):
        cascade.main(model=trained_export_dir, split="test", teacher=valid, limit=LIMIT, out=tmp_path / "wrong")


def test_open_labels_are_refused(trained_export_dir, tmp_path, monkeypatch, capsys):
    # The same student folder relabelled as SVAMP, whose answers are equations: generated, so there is no margin.
    svamp = Path(shutil.copytree(trained_export_dir, tmp_path / "svamp-export"))
    tasks.save_task(tasks.get_task("svamp"), svamp)
    monkeypatch.setenv("STEPWISE_INPROCESS", "1")
    with pytest.raises(SystemExit) as refused:
        cli.main(["cascade", "--model", str(svamp), "--limit", "5", "--out", str(tmp_path / "out")])
    assert str(refused.value) == (
        "stepwise cascade: error: task 'svamp' has open labels: the cascade ranks by the margin between "
        "candidate labels, which needs a closed label set"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cost_per_1k_from_a_real_teacher_run(trained_export_dir, teacher_url, tmp_path):
    # The tiny teacher on vLLM answers 16 test inputs through `stepwise extract --teacher openai`; its manifest's time
    # and tokens price the teacher's share of every point of the curve.
    teacher = extraction.main(
        task="esnli",
        split="test",
        teacher="openai",
        model="tiny",
        limit=16,
        out=tmp_path / "teacher",
        sampling=SamplingOptions(max_tokens=48),
        client=ClientOptions(base_url=teacher_url, concurrency=4, retries=1),
    )
    out = cascade.main(
        model=trained_export_dir,
        split="test",
        teacher=teacher,
        teacher_cost=teacher,
        limit=16,
        out=tmp_path / "cascade",
    )
    result = json.loads((out / "cascade.json").read_text())
    run = artifacts.read_manifest(teacher)["last_run"]
    per_1k = result["teacher_per_1k"]
    assert per_1k["seconds"] == pytest.approx(1000 * run["generation_s"] / 16)
    assert per_1k["tokens"] == pytest.approx(1000 * (run["this_run"]["tokens_in"] + run["this_run"]["tokens_out"]) / 16)
    assert per_1k["tokens"] > 1000 * 300  # the few-shot prompt alone is hundreds of tokens
    for row in result["rows"]:
        assert row["seconds_per_1k"] == pytest.approx(
            result["student_seconds_per_1k"] + row["fraction"] * per_1k["seconds"], abs=0.011
        )
        assert row["teacher_tokens_per_1k"] == round(row["fraction"] * per_1k["tokens"])


def test_the_fallback_signals_compared_on_a_step_by_step_student(step_by_step_export_dir, tmp_path):
    runtime = load_runtime(step_by_step_export_dir, threads=1)
    examples = tasks.load_split(ESNLI, "test")[:LIMIT]
    predictions = predict(runtime, examples)
    # The label the rationale reaches is the same from a rationale the caller asked for (explain) as from one decoded
    # for the check alone, which is not kept.
    reached = rationale_labels(runtime, examples, predictions)
    assert reached == rationale_labels(runtime, examples, predict(runtime, examples, explain=True))
    assert all(p.rationale is None for p in predictions)
    disagree = {i for i, p in enumerate(predictions) if reached[i] != p.label}
    assert 0 < len(disagree) < LIMIT

    out = cascade.main(model=step_by_step_export_dir, split="test", limit=LIMIT, out=tmp_path, compare_signals=True)
    result = json.loads((out / "cascade.json").read_text())
    signals, rows = result["signals"], result["rows"]
    assert signals["consistency"]["teacher_calls"] == len(disagree) and signals["check_seconds_per_1k"] > 0
    both = signals["both"]
    assert [b["decoded"] for b in both] == cascade.FRACTIONS and both[0]["teacher_calls"] == 0
    # both sends the disagreeing part of what the margin alone sends, and all of them once every rationale is checked.
    assert all(b["teacher_calls"] <= r["teacher_calls"] for b, r in zip(both, rows, strict=True))
    assert both[-1]["teacher_calls"] == len(disagree) and both[-1]["accuracy"] == signals["consistency"]["accuracy"]
    assert "consistency checks every input and sends" in (out / "cascade.md").read_text()


def test_comparing_signals_needs_a_step_by_step_export(trained_export_dir, tmp_path):
    with pytest.raises(ValueError, match=r"not trained step-by-step \(mode: standard-finetune\)"):
        cascade.main(model=trained_export_dir, split="test", limit=LIMIT, out=tmp_path, compare_signals=True)
