"""The task layer against every shipped PaLM completion, hand-picked malformed ones, and the svamp evaluator."""

from __future__ import annotations

import json

import pytest

from stepwise import tasks

# Measured over all shipped completions (see `stepwise data`); the tests pin them within a small tolerance.
MEASURED = {
    ("svamp", "train"): (0.9565, 0.7418),
    ("svamp", "valid"): (0.9688, 0.7656),
    ("svamp", "test"): (0.9650, 0.7750),
    ("cqa", "train"): (0.9813, 0.7621),
    ("cqa", "valid"): (0.9817, 0.7258),
    ("cqa", "test"): (0.9869, 0.7879),
    ("esnli", "train"): (0.9999, 0.7340),
    ("esnli", "valid"): (1.0000, 0.7129),
    ("esnli", "test"): (1.0000, 0.7299),
}
SIZES = {("svamp", "train"): 736, ("svamp", "valid"): 64, ("svamp", "test"): 200, ("cqa", "test"): 1221, ("esnli", "test"): 9824}


@pytest.mark.parametrize("task_name,split", sorted(MEASURED))
def test_parser_over_all_shipped_completions(task_name, split):
    task = tasks.get_task(task_name)
    examples = tasks.load_split(task, split)
    parsed = [tasks.parse_completion(task, e.teacher_completion, e.choices) for e in examples]
    parse_rate = sum(p.status == "ok" for p in parsed) / len(parsed)
    teacher_accuracy = sum(tasks.is_correct(task, p.label, e.label) for p, e in zip(parsed, examples)) / len(examples)
    expected_rate, expected_accuracy = MEASURED[(task_name, split)]
    assert parse_rate == pytest.approx(expected_rate, abs=0.005)
    assert teacher_accuracy == pytest.approx(expected_accuracy, abs=0.005)
    for p in parsed:  # never a silent blank label: ok means a label and a rationale, malformed means a reason
        assert (p.status == "ok" and p.label and p.rationale) or (p.status == "malformed" and p.reason and not p.label)
    if (task_name, split) in SIZES:
        assert len(examples) == SIZES[(task_name, split)]


def test_splits_are_disjoint_deterministic_and_ten_percent():
    task = tasks.get_task("cqa")
    train, valid = tasks.load_split(task, "train"), tasks.load_split(task, "valid")
    assert not {e.id for e in train} & {e.id for e in valid}
    assert len(valid) / (len(train) + len(valid)) == pytest.approx(0.1, abs=0.01)
    assert [e.id for e in tasks.load_split(task, "valid")] == [e.id for e in valid]


def test_student_inputs_use_reference_prefixes_and_layouts():
    cqa = tasks.load_split(tasks.get_task("cqa"), "test")[0]
    assert tasks.label_input(cqa).startswith("predict: A beaver is know for building prowess")
    assert "\nAnswer Choices:\n(a) british columbia\n(b) body of water\n(c) wooded area" in cqa.input
    assert tasks.rationale_input(cqa).startswith("explain: ")
    nli = tasks.load_split(tasks.get_task("esnli"), "test")[0]
    assert nli.input.startswith("Premise: This church choir") and "\nHypothesis: The church has cracks" in nli.input
    assert nli.label == "neutral"


@pytest.mark.parametrize("task_name", ["svamp", "cqa", "esnli"])
def test_few_shot_prompt_has_ten_exemplars_the_parser_reads(task_name):
    task = tasks.get_task(task_name)
    shots = tasks.exemplars(task, tasks.load_split(task, "train"))
    assert len(shots) == 10
    for shot in shots:  # each exemplar's answer part parses back to a valid label
        answer_part = shot.split("\nA:", 1)[-1] if task.answer_style != "label" else shot.split("Reasonings:", 1)[1]
        assert tasks.parse_completion(task, answer_part, _choices_of(shot)).status == "ok"
    example = tasks.load_split(task, "test")[0]
    prompt = tasks.few_shot_prompt(task, shots, example)
    assert prompt.startswith(shots[0]) and prompt.endswith("A:" if task.answer_style != "label" else "Reasonings:")


def _choices_of(shot: str) -> list[str] | None:
    choices = [line[4:] for line in shot.splitlines() if len(line) > 4 and line[0] == "(" and line[2] == ")"]
    return choices or None


def test_esnli_exemplars_are_balanced_over_labels():
    task = tasks.get_task("esnli")
    shots = tasks.exemplars(task, tasks.load_split(task, "train"))
    counts = {label: sum(s.endswith(f"Answer: {label}") for s in shots) for label in task.labels}
    assert max(counts.values()) - min(counts.values()) <= 1


CHOICES = ["british columbia", "body of water", "wooded area", "pay debts", "zoo"]


@pytest.mark.parametrize(
    "task_name,completion,choices,label",
    [
        ("cqa", "Beavers live near trees. So the answer is (c) wooded area.\n\nQ: next one", CHOICES, "wooded area"),
        ("cqa", "Beavers live near trees. So the answer is (c) wooded areas.", CHOICES, "wooded area"),  # the letter wins
        ("cqa", "Beavers live near trees. So the answer is zoo.", CHOICES, "zoo"),
        ("esnli", "A man is a person.\nAnswer: entailment\n\nPremise: run-on", None, "entailment"),
        ("esnli", "A man is a person.\nAnswer: Contradiction.", None, "contradiction"),
        ("esnli", "Not implied.\nAnswer: neutral\n\nPremise", None, "neutral"),
        ("svamp", "He had 5 and got 3 more. The answer is (5 + 3).\n\nQ: There are 15 trees", None, "(5 + 3)"),
    ],
)
def test_parser_reads_good_completions(task_name, completion, choices, label):
    parsed = tasks.parse_completion(tasks.get_task(task_name), completion, choices)
    assert (parsed.status, parsed.label) == ("ok", label)
    assert "Q:" not in parsed.rationale and "Premise" not in parsed.rationale


@pytest.mark.parametrize(
    "task_name,completion,choices,reason",
    [
        ("cqa", "", CHOICES, "empty completion"),
        ("cqa", None, CHOICES, "empty completion"),
        ("cqa", "Beavers live near trees. The answer must be wood", CHOICES, "no answer sentence"),
        ("cqa", "Hmm. So the answer is either (b) body of water or (c) wooded area.", CHOICES, "none of the choices"),
        ("cqa", "Hmm. So the answer is (q) moon.", CHOICES, "none of the choices"),
        ("cqa", "So the answer is (c) wooded area.", CHOICES, "without a rationale"),
        ("esnli", "A man is a person.\nAnswer: maybe", None, "not one of"),
        ("esnli", "A toddler is a child. A child is a person", None, "no answer sentence"),
        ("svamp", "So Steven has 18 - 26", None, "no answer sentence"),
        ("svamp", "He splits them. The answer is (10 / 0).", None, "not a computable expression"),
        ("svamp", "He counts. The answer is (x + 3).", None, "not a computable expression"),
        ("svamp", "He counts. The answer is (__import__('os')).", None, "not a computable expression"),
    ],
)
def test_parser_reports_malformed_completions_with_reason(task_name, completion, choices, reason):
    parsed = tasks.parse_completion(tasks.get_task(task_name), completion, choices)
    assert parsed.status == "malformed" and parsed.label == ""
    assert reason in parsed.reason


@pytest.mark.parametrize(
    "expression,value",
    [
        ("( 10.0 * 45.0 )", 450.0),
        ("(10 - (3 + 6))", 1.0),
        ("84 / 2", 42.0),
        ("-3 + +4", 1.0),
        ("2 ** 10", 1024.0),
        ("7 // 2", 3.0),
        ("1,000 + 1", 1001.0),
        ("6 × 7", 42.0),
        ("8 ÷ 2", 4.0),
        ("(((2)))", 2.0),
    ],
)
def test_svamp_evaluator_computes_arithmetic(expression, value):
    assert tasks.evaluate_equation(expression) == pytest.approx(value)


@pytest.mark.parametrize(
    "garbage",
    ["1 / 0", "5 % 0", "", "   ", "x + 1", "abs(-1)", "__import__('os').system('true')", "2 ** 100000", "9 ** 9 ** 9",
     "(1 +", "1e400 * 1e400", "True + 1", "[1, 2]", "'a' * 3", "(-8) ** 0.5", "1" * 300],
)
def test_svamp_evaluator_scores_garbage_as_none_without_raising(garbage):
    assert tasks.evaluate_equation(garbage) is None


def test_svamp_accuracy_compares_by_value():
    task = tasks.get_task("svamp")
    assert tasks.accuracy(task, ["(10 * 45)", "10 / 0", "nonsense", "(45 * 10)"], ["( 10.0 * 45.0 )"] * 4) == 0.5


def test_accuracy_normalises_labels_and_checks_lengths():
    task = tasks.get_task("esnli")
    assert tasks.accuracy(task, ["Entailment.", " neutral "], ["entailment", "neutral"]) == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        tasks.accuracy(task, ["a", "b"], ["a"])


def test_custom_jsonl_task_with_choices_holds_out_validation(tmp_path):
    rows = [{"input": f"Which is number {i}?", "label": str(i % 3), "choices": ["0", "1", "2"], "rationale": f"It is {i % 3}."} for i in range(200)]
    rows += [{"input": "Test question?", "label": "1", "choices": ["0", "1", "2"], "split": "test"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = tasks.get_task(str(path))
    assert task.answer_style == "choice" and task.name == "mine"
    train, valid, test = (tasks.load_split(task, s) for s in tasks.SPLITS)
    assert len(train) + len(valid) == 200 and 5 <= len(valid) <= 40 and len(test) == 1
    assert train[0].input.startswith("Which is number") and "Answer Choices:" in train[0].input
    shots = tasks.exemplars(task, train)
    assert len(shots) == 10 and shots[0].endswith(f"So the answer is ({'abc'[int(train[0].label)]}) {train[0].label}.")
    assert tasks.load_task(_saved(task, tmp_path)) == task


def _saved(task, folder):
    tasks.save_task(task, folder / "model")
    return folder / "model"


def test_custom_csv_folder_task_free_labels(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("input,label\nWhat is 2+2?,four\nCapital of France?,Paris\n")
    (tmp_path / "data" / "test.csv").write_text("input,label\nWhat is 1+1?,two\n")
    task = tasks.get_task(str(tmp_path / "data"))
    assert task.answer_style == "free"
    assert [e.label for e in tasks.load_split(task, "test")] == ["two"]
    parsed = tasks.parse_completion(task, "Paris is the capital. So the answer is Paris.\nQ: more")
    assert (parsed.status, parsed.label) == ("ok", "Paris")


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"input": "q"}\n', "missing or empty 'label'"),
        ('{"input": "", "label": "a"}\n', "missing or empty 'input'"),
        ('{"input": "q", "label": "d", "choices": ["a", "b"]}\n', "is not one of its choices"),
    ],
)
def test_custom_task_bad_rows_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        task = tasks.get_task(str(path))
        tasks.load_split(task, "train")


def test_unknown_task_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.get_task("nope")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        tasks.load_split(tasks.get_task("cqa"), "dev")
