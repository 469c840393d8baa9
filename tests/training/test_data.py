"""The training data: reading extraction folders, joining records to the train split, data fractions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepwise import artifacts, tasks
from stepwise.training.data import (
    check_extraction_finished,
    check_task_matches,
    data_fraction,
    records_by_id,
    records_by_source,
    training_examples,
)

ESNLI = tasks.get_task("esnli")


def test_data_fraction_is_fixed_by_the_seed_and_nested():
    items = list(range(1000))
    quarter = data_fraction(items, 0.25, seed=3)
    assert quarter == data_fraction(items, 0.25, seed=3)
    assert quarter != data_fraction(items, 0.25, seed=4)
    assert len(quarter) == 250 and quarter == sorted(quarter)
    assert set(data_fraction(items, 0.125, seed=3)) <= set(quarter) <= set(data_fraction(items, 0.5, seed=3))
    assert data_fraction(items, 1.0, seed=3) == items
    with pytest.raises(ValueError, match="data fraction"):
        data_fraction(items, 0.0, seed=0)


def _write_folder(folder, records):
    folder.mkdir()
    (folder / "shard-a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    artifacts.write_json(folder / "manifest.json", artifacts.whole_manifest(len(records), {}))
    tasks.save_task(ESNLI, folder)
    return folder


def test_reader_skips_records_the_teacher_failed_on(tmp_path):
    train = tasks.load_split(ESNLI, "train")[:6]
    records = [
        {
            "id": e.id,
            "input": e.input,
            "label": e.label,
            "choices": None,
            "rationale": f"because {i}",
            "teacher_label": "neutral",
            "status": "ok",
            "reason": "",
        }
        for i, e in enumerate(train[:4])
    ]
    records.append(
        {
            "id": train[4].id,
            "input": train[4].input,
            "label": train[4].label,
            "choices": None,
            "rationale": "",
            "teacher_label": "",
            "status": "malformed",
            "reason": "no answer sentence",
        }
    )
    folder = _write_folder(tmp_path / "rationales", records)  # train[5] has no record at all
    by_id = records_by_id(folder)
    assert set(by_id) == {e.id for e in train[:5]}  # manifest.json and task.json are not shards

    examples, counts = training_examples(
        ESNLI, by_id, needs_teacher_label=False, needs_rationale=True, fraction=1.0, seed=0
    )
    assert (
        counts["used"] == 4
        and counts["skipped_not_ok"] == 1
        and counts["skipped_no_record"] == counts["train_split"] - 5
    )
    assert [e.rationale for e in examples] == [f"because {i}" for i in range(4)]
    assert [e.label for e in examples] == [e.label for e in train[:4]]  # gold labels

    distilled, _ = training_examples(
        ESNLI, by_id, needs_teacher_label=True, needs_rationale=False, fraction=1.0, seed=0
    )
    assert [e.label for e in distilled] == ["neutral"] * 4 and all(e.rationale is None for e in distilled)

    gold_only, gold_counts = training_examples(
        ESNLI, None, needs_teacher_label=False, needs_rationale=False, fraction=1.0, seed=0
    )
    assert gold_counts["used"] == gold_counts["train_split"]  # standard fine-tuning needs no teacher at all


def test_bad_rationale_folders_are_named_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        records_by_id(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{}")
    (bad / "shard-x.jsonl").write_text('{"id": "a", "status": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"shard-x.jsonl:2"):
        records_by_id(bad)
    with pytest.raises(ValueError, match="pass --rationales"):
        training_examples(ESNLI, None, needs_teacher_label=False, needs_rationale=True, fraction=1.0, seed=0)
    other = _write_folder(tmp_path / "other", [{"id": "svamp-train-000001", "status": "ok"}])
    with pytest.raises(ValueError, match="wrong --task or --rationales"):
        training_examples(
            ESNLI, records_by_id(other), needs_teacher_label=False, needs_rationale=True, fraction=1.0, seed=0
        )


def test_rationales_of_another_task_are_refused(tmp_path):
    folder = tmp_path / "svamp-rationales"
    tasks.save_task(tasks.get_task("svamp"), folder)
    with pytest.raises(ValueError, match="extracted for task 'svamp'"):
        check_task_matches(folder, ESNLI)


def _records_for(task, examples):
    return [
        {
            "id": e.id,
            "input": e.input,
            "label": e.label,
            "choices": None,
            "rationale": f"why {e.id}",
            "teacher_label": e.label,
            "status": "ok",
            "reason": "",
            "fingerprint": tasks.input_fingerprint(e),
        }
        for e in examples
    ]


def rationales_folder(folder: Path, task: tasks.Task) -> Path:
    """An extraction folder for `task`: a record per train example, the manifest, the task."""
    folder.mkdir()
    (folder / "shard-a.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _records_for(task, tasks.load_split(task, "train")))
    )
    artifacts.write_json(folder / "manifest.json", artifacts.whole_manifest(len(tasks.load_split(task, "train")), {}))
    tasks.save_task(task, folder)
    return folder


def test_records_of_an_edited_input_are_skipped_and_counted_never_trained_on(tmp_path, custom_nli_rows):
    path = tmp_path / "nli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in custom_nli_rows))
    task = tasks.get_task(str(path))
    folder = rationales_folder(tmp_path / "rationales", task)
    edited_id = custom_nli_rows[5]["id"]
    path.write_text(
        "".join(
            json.dumps(dict(r, input="Premise: changed\nHypothesis: since") if r["id"] == edited_id else r) + "\n"
            for r in custom_nli_rows
        )
    )

    check_task_matches(folder, task)
    examples, counts = training_examples(
        task, records_by_id(folder), needs_teacher_label=False, needs_rationale=True, fraction=1.0, seed=0
    )
    assert counts["skipped_input_changed"] == 1 and counts["used"] == counts["train_split"] - 1
    assert f"why {edited_id}" not in {e.rationale for e in examples} and "Premise: changed\nHypothesis: since" not in {
        e.input for e in examples
    }


def test_rationales_of_the_same_data_read_with_other_labels_are_refused(tmp_path, custom_nli_rows):
    path = tmp_path / "nli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in custom_nli_rows))
    folder = tmp_path / "rationales"
    tasks.save_task(tasks.get_task(str(path)), folder)  # inferred: contradiction/entailment/neutral
    differs = r"extracted with labels \['contradiction', 'entailment', 'neutral'\], this task has \['entailment', "
    with pytest.raises(ValueError, match=differs):
        check_task_matches(folder, tasks.get_task(str(path), labels=["entailment", "neutral", "contradiction"]))


def test_train_takes_the_label_set_extract_was_given(tmp_path, custom_nli_rows):
    """`stepwise extract --labels X` then `stepwise train --labels X`: the same task, so the rationales are accepted
    and the student's task (task.json, the label path, export, serving) carries the declared order."""
    from stepwise.training import train

    path = tmp_path / "nli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in custom_nli_rows))
    declared = ["entailment", "neutral", "contradiction"]
    task = tasks.get_task(str(path), labels=declared)
    folder = rationales_folder(tmp_path / "rationales", task)
    with pytest.raises(ValueError, match="give both stages the same task file or --labels"):
        train.setup(str(path), tmp_path / "no", folder, "tiny", "standard-finetune", 1.0, 0, 500, train.DataOptions(),
                    train.OptimOptions(), train.EvalOptions(), train.ComputeOptions(), False)  # fmt: skip
    plan = train.setup(str(path), tmp_path / "student", folder, "tiny", "standard-finetune", 1.0, 0, 500,
                       train.DataOptions(), train.OptimOptions(), train.EvalOptions(), train.ComputeOptions(), False,
                       labels=declared)  # fmt: skip
    assert plan is not None and plan.task.labels == declared
    assert json.loads((tmp_path / "student" / "train_config.json").read_text())["labels"] == declared


def test_an_unfinished_or_running_extraction_is_refused_unless_allowed(tmp_path, capsys):
    folder = rationales_folder(tmp_path / "rationales", ESNLI)
    check_extraction_finished(folder, allow_incomplete=False)  # complete, nobody writing: fine
    unfinished = artifacts.whole_manifest(40, {}) | {"complete": False, "expected_records": 100}
    artifacts.write_json(folder / "manifest.json", unfinished)
    with pytest.raises(ValueError, match=r"unfinished extraction \(40 of 100 records\).*--allow-incomplete"):
        check_extraction_finished(folder, allow_incomplete=False)
    check_extraction_finished(folder, allow_incomplete=True)
    assert "training on the records it holds so far" in capsys.readouterr().out
    artifacts.write_json(folder / "manifest.json", artifacts.whole_manifest(100, {}))
    with artifacts.folder_lock(folder / artifacts.EXTRACT_LOCK, "extract", folder):  # a run writing it now
        with pytest.raises(ValueError, match=r"being written by `stepwise extract` now \(pid \d+\)"):
            check_extraction_finished(folder, allow_incomplete=False)
    check_extraction_finished(folder, allow_incomplete=False)  # the lock went with its holder


def test_a_second_train_on_one_out_is_refused_and_overwrite_keeps_the_lock(tmp_path):
    from stepwise.training import train

    out = tmp_path / "student"
    with artifacts.folder_lock(out / artifacts.TRAIN_LOCK, "train", out):  # a run writing it now
        with pytest.raises(ValueError, match=f"{out} is being written by another `stepwise train`"):
            train.main(task="esnli", out=out, mode="standard-finetune")
    (out / artifacts.TRAIN_CONFIG).write_text("{}")  # an earlier run's folder, replaced with --overwrite
    plan = train.setup("esnli", out, None, "tiny", "standard-finetune", 0.01, 0, 500, train.DataOptions(),
                       train.OptimOptions(), train.EvalOptions(), train.ComputeOptions(), True)  # fmt: skip
    assert plan is not None and (out / artifacts.TRAIN_LOCK).exists()


def test_several_sources_merge_by_id_and_served_inputs_become_examples_once(tmp_path):
    """An extraction that failed on some inputs, a second one that has them, and a server's log of teacher answers:
    one record per id (the first usable one), each example naming its source; a served input outside the splits
    is an example once however often it was logged, and a served validation input never is."""
    train, valid = tasks.load_split(ESNLI, "train")[:4], tasks.load_split(ESNLI, "valid")[:1]
    first_records = _records_for(ESNLI, train)
    first_records[1] |= {"status": "malformed", "rationale": "", "teacher_label": ""}
    first = _write_folder(tmp_path / "first", first_records)
    second = _write_folder(tmp_path / "second", [r | {"rationale": "again"} for r in _records_for(ESNLI, train[:2])])
    served = tasks.Example("served-1", "Premise: A cat sleeps.\nHypothesis: An animal rests.", "", None, None, "")
    logged = {
        "id": served.id,
        "input": served.input,
        "label": "",
        "choices": None,
        "rationale": "cats rest",
        "teacher_label": "entailment",
        "status": "ok",
        "reason": "",
        "fingerprint": tasks.input_fingerprint(served),
    }
    held_out = _records_for(ESNLI, valid)[0] | {"id": "served-2"}
    log = _write_folder(tmp_path / "log", [logged, logged | {"id": "served-1b"}, held_out])  # fmt: skip

    records = records_by_source([first, second, log])
    assert records[train[0].id]["source"] == str(first) and records[train[1].id]["source"] == str(second)
    examples, counts = training_examples(ESNLI, records, needs_teacher_label=True, needs_rationale=True,
                                         fraction=1.0, seed=0)  # fmt: skip
    assert [(e.input, e.rationale, e.source) for e in examples] == [
        (train[0].input, f"why {train[0].id}", str(first)),
        (train[1].input, "again", str(second)),
        (train[2].input, f"why {train[2].id}", str(first)),
        (train[3].input, f"why {train[3].id}", str(first)),
        (served.input, "cats rest", str(log)),
    ]
    assert counts["other_inputs"] == 1 and counts["skipped_duplicate_input"] == 1
    assert counts["skipped_held_out_input"] == 1 and counts["used"] == 5
    gold, gold_counts = training_examples(ESNLI, records, needs_teacher_label=False, needs_rationale=True,
                                          fraction=1.0, seed=0)  # fmt: skip
    assert served.input not in {e.input for e in gold}  # no gold label for a served input
