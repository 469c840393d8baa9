"""Record building: majority vote, failure records, the structured-output regex, and atomic writes."""

from __future__ import annotations

import re

import pytest

from stepwise import tasks
from stepwise.extraction import records, shards, teachers

CQA = tasks.get_task("cqa")
EXAMPLE = tasks.Example(
    "q1", tasks.cqa_input("Where is a bed?", ["sea", "bedroom", "moon"]), "bedroom", ["sea", "bedroom", "moon"]
)


def test_majority_vote_picks_the_most_common_label_and_its_rationale():
    completions = [
        "Beds are in seas. So the answer is (a) sea.",
        "People sleep in bedrooms. So the answer is (b) bedroom.",
        "no answer here",
        "A bedroom holds a bed. So the answer is (b) bedroom.\n\nQ: next",
    ]
    record = records.make_record(CQA, EXAMPLE, teachers.Generation(completions, 10, 40), {"backend": "vllm"})
    assert record["teacher_label"] == "bedroom" and record["rationale"] == "People sleep in bedrooms."
    assert record["votes"] == {"sea": 1, "bedroom": 2} and record["status"] == "ok" and record["correct"]


def test_equal_equations_vote_together():
    svamp = tasks.get_task("svamp")
    example = tasks.Example("s1", "6 apples?", "( 2.0 * 3.0 )")
    completions = [
        "x. The answer is (2 * 3).",
        "y. The answer is (3 * 2).",
        "z. The answer is (5).",
        "w. The answer is (5).",
    ]
    parsed, votes = records.vote(svamp, example, completions)
    assert parsed.label == "(2 * 3)" and sorted(votes.values()) == [2, 2]


def test_no_parseable_sample_is_malformed_with_the_reason():
    record = records.make_record(CQA, EXAMPLE, teachers.Generation(["rambling"]), {"backend": "vllm"})
    assert record["status"] == "malformed" and "no answer sentence" in record["reason"] and not record["correct"]


def test_a_teacher_error_is_recorded_not_raised():
    failed = teachers.Generation(error="server error after 2 retries: ConnectError")
    record = records.make_record(CQA, EXAMPLE, failed, {"backend": "openai"})
    assert record["status"] == "error" and record["reason"].startswith("server error") and record["completions"] == []
    counts = shards.count_records([record, dict(record, status="ok", reason="", correct=True)])
    assert counts["failure_reasons"] == {"server error after 2 retries": 1} and counts["parse_rate"] == 0.5


@pytest.mark.parametrize("task_name", ["svamp", "cqa", "esnli"])
def test_structured_regex_accepts_most_teacher_answers_and_all_it_accepts_parse(task_name):
    task = tasks.get_task(task_name)
    candidates = accepted = 0
    for example in tasks.load_split(task, "train")[:400]:
        parsed = tasks.parse_completion(task, example.teacher_completion, example.choices)
        if parsed.status != "ok" or "\n" in parsed.rationale or len(parsed.rationale) > 300:
            continue
        # the teacher's completion as the regex shapes it: one rationale line, then the answer sentence
        joiner = "" if task.answer_style == "label" else " "
        completion = f" {parsed.rationale}{joiner}{tasks.answer_sentence(task, parsed.label, example.choices)}"
        candidates += 1
        if re.fullmatch(teachers.answer_regex(task, example), completion):
            accepted += 1
            reparsed = tasks.parse_completion(task, completion, example.choices)
            assert (reparsed.status, reparsed.label) == ("ok", parsed.label)
    # svamp's regex keeps to expressions the evaluator can always compute (no unary minus, one nesting level)
    assert candidates > 100 and accepted / candidates >= (0.9 if task_name == "svamp" else 1.0)


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = shards.write_shard(tmp_path, [{"id": "a"}, {"id": "b"}])
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    assert shards.write_shard(tmp_path, [{"id": "a"}, {"id": "b"}]) == path  # same chunk, same shard
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
