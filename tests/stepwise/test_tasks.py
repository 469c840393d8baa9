"""The task layer against every shipped PaLM completion, hand-picked malformed ones, and the svamp evaluator."""

from __future__ import annotations

import json
import sys

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
SIZES = {
    ("svamp", "train"): 736,
    ("svamp", "valid"): 64,
    ("svamp", "test"): 200,
    ("cqa", "test"): 1221,
    ("esnli", "test"): 9824,
}


@pytest.mark.parametrize("task_name,split", sorted(MEASURED))
def test_parser_over_all_shipped_completions(task_name, split):
    task = tasks.get_task(task_name)
    examples = tasks.load_split(task, split)
    parsed = [tasks.parse_completion(task, e.teacher_completion, e.choices) for e in examples]
    parse_rate = sum(p.status == "ok" for p in parsed) / len(parsed)
    teacher_accuracy = sum(
        tasks.is_correct(task, p.label, e.label) for p, e in zip(parsed, examples, strict=True)
    ) / len(examples)
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
        (
            "cqa",
            "Beavers live near trees. So the answer is (c) wooded areas.",
            CHOICES,
            "wooded area",
        ),  # the letter wins
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
    [
        "1 / 0",
        "5 % 0",
        "",
        "   ",
        "x + 1",
        "abs(-1)",
        "__import__('os').system('true')",
        "2 ** 100000",
        "9 ** 9 ** 9",
        "(1 +",
        "1e400 * 1e400",
        "True + 1",
        "[1, 2]",
        "'a' * 3",
        "(-8) ** 0.5",
        "1" * 300,
    ],
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
    rows = [
        {
            "input": f"Which is number {i}?",
            "label": str(i % 3),
            "choices": ["0", "1", "2"],
            "rationale": f"It is {i % 3}.",
        }
        for i in range(200)
    ]
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
        ('{"input": "", "label": "a"}\n', "missing or empty field 'input'"),
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


# ---------------------------------------------------------------- your own data (custom_nli_rows: tests/conftest.py)


def write_jsonl(path, rows, drop=()):
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k not in drop}) + "\n" for row in rows))
    return path


def test_a_few_repeated_labels_become_a_closed_label_set(tmp_path, custom_nli_rows):
    path = write_jsonl(tmp_path / "nli.jsonl", custom_nli_rows, drop=("premise", "hypothesis"))
    task = tasks.get_task(str(path))
    assert (task.name, task.answer_style, task.labels) == ("nli", "label", ["contradiction", "entailment", "neutral"])
    assert task.closed_label_set and tasks.input_fields(task) == ["input"]
    train = tasks.load_split(task, "train")
    assert {e.label for e in train} == set(task.labels) and train[0].input == custom_nli_rows[0]["input"]
    assert (
        train[0].teacher_completion == custom_nli_rows[0]["completion"]
        and train[0].rationale == custom_nli_rows[0]["rationale"]
    )
    # a custom label task asks Q:/A: and answers on a line of its own; the prompt stops at the next "Q:"
    shots = tasks.exemplars(task, train)
    assert len(shots) == 10 and all(
        s.startswith("Q: Premise: ") and s.rsplit("\n", 1)[1] in [f"Answer: {x}" for x in task.labels] for s in shots
    )
    assert tasks.few_shot_prompt(task, shots, train[0]).endswith(f"Q: {train[0].input}\nA:")
    assert tasks.stop_strings(task) == ["\n\nQ:", "\nQ:"]
    for shot in shots:  # every exemplar parses back to its own label
        parsed = tasks.parse_completion(task, shot.split("\nA:", 1)[1])
        assert parsed.status == "ok" and shot.endswith(f"Answer: {parsed.label}")


@pytest.mark.parametrize(
    "completion,status,label_or_reason",
    [
        # the first answer wins: what follows it runs on into another example
        ("A man is a person.\nAnswer: Entailment.\n\nPremise: run-on\nAnswer: neutral", "ok", "entailment"),
        ("Nothing says so. So the answer is neutral.\n\nQ: next", "ok", "neutral"),
        ("A man.\nAnswer: maybe", "malformed", "label is not one of contradiction/entailment/neutral: 'maybe'"),
        ("A man is a person.", "malformed", "no answer sentence"),
    ],
)
def test_a_label_outside_the_set_is_malformed_with_the_reason(
    tmp_path, custom_nli_rows, completion, status, label_or_reason
):
    task = tasks.get_task(str(write_jsonl(tmp_path / "nli.jsonl", custom_nli_rows)))
    parsed = tasks.parse_completion(task, completion)
    assert parsed.status == status
    assert (parsed.label if status == "ok" else parsed.reason).startswith(label_or_reason)


def test_the_task_file_declares_labels_and_joins_input_fields(tmp_path, custom_nli_rows):
    path = write_jsonl(tmp_path / "nli.jsonl", custom_nli_rows, drop=("input",))
    labels = ["entailment", "neutral", "contradiction"]
    settings = {"name": "my-nli", "labels": labels, "input_template": "Premise: {premise}\nHypothesis: {hypothesis}"}
    (tmp_path / "nli.task.json").write_text(json.dumps(settings))
    task = tasks.get_task(str(path))
    assert (task.name, task.answer_style, task.labels) == ("my-nli", "label", labels)
    assert tasks.input_fields(task) == ["premise", "hypothesis"]
    assert [e.input for e in tasks.load_split(task, "test")] == [
        r["input"] for r in custom_nli_rows if r["split"] == "test"
    ]
    assert tasks.format_input(task, {"hypothesis": "b", "premise": "a", "extra": 1}) == "Premise: a\nHypothesis: b"
    with pytest.raises(
        ValueError,
        match=r"missing or empty field 'hypothesis' \(task my-nli's input is built from 'premise', 'hypothesis'\)",
    ):
        tasks.format_input(task, {"premise": "a", "hypothesis": " "})
    # the task travels with every artifact: labels and template included
    assert tasks.load_task(_saved(task, tmp_path)) == task
    # --labels overrides the task file; a gold label outside it names the row and what to do
    relabelled = tasks.get_task(str(path), labels=["entailment", "not entailment"])
    outside = r"train row \d+: label '(neutral|contradiction)' is not one of the task's labels"
    with pytest.raises(ValueError, match=f"{outside} entailment/not entailment.*--labels"):
        tasks.load_split(relabelled, "train")


def test_a_toml_task_file_and_a_folder_of_csv_splits(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.csv").write_text(
        "title,body,label\n" + "".join(f"T{i},body {i},{'Positive' if i % 2 else 'negative'}\n" for i in range(20))
    )
    (folder / "test.csv").write_text("title,body,label\nT,b,positive\n")
    (folder / "task.toml").write_text('input_template = "Title: {title}\\nBody: {body}"\nexemplar_count = 4\n')
    task = tasks.get_task(str(folder))
    assert (task.answer_style, task.labels, task.exemplar_count) == ("label", ["Positive", "negative"], 4)
    test = tasks.load_split(task, "test")
    assert [(e.input, e.label) for e in test] == [("Title: T\nBody: b", "Positive")]  # the set's spelling


@pytest.mark.parametrize(
    "labels,style",
    [
        ([f"l{i % 32}" for i in range(64)], "label"),  # 32 distinct labels, each twice
        ([f"l{i % 33}" for i in range(66)], "free"),  # 33 distinct labels
        (["yes", "no", "no", "maybe"] * 2 + ["never"], "free"),  # one label seen once
        (["yes"] * 10, "free"),  # one label is no set
    ],
)
def test_the_label_set_inference_rule(tmp_path, labels, style):
    path = write_jsonl(tmp_path / "data.jsonl", [{"input": f"q{i}", "label": label} for i, label in enumerate(labels)])
    assert tasks.get_task(str(path)).answer_style == style


def test_answer_style_free_in_the_task_file_turns_inference_off(tmp_path, custom_nli_rows):
    path = write_jsonl(tmp_path / "nli.jsonl", custom_nli_rows)
    (tmp_path / "nli.task.json").write_text('{"answer_style": "free"}')
    task = tasks.get_task(str(path))
    assert (task.answer_style, task.labels, task.closed_label_set) == ("free", [], False)


@pytest.mark.parametrize(
    "task_file,rows,message",
    [
        (
            '{"labels": ["a", "b"], "colour": 1}',
            None,
            r"nli.task.json: unknown key 'colour'; the keys are name, labels",
        ),
        ('{"labels": ["a", "b"],}', None, r"nli.task.json is not valid JSON"),
        ('{"labels": ["a"]}', None, "a label set needs at least two labels"),
        ('{"labels": ["Yes", "yes."]}', None, "label 'yes' is listed twice"),
        (
            '{"input_template": "{premise!r} and {0}"}',
            None,
            r"placeholder \{premise!r\} is not a plain \{column\} name",
        ),
        ('{"input_template": "Premise: {premise"}', None, "input_template 'Premise: {premise'"),
        ('{"answer_style": "label"}', None, "answer_style 'label' needs labels"),
        (
            '{"input_template": "P: {premise}\\nH: {hypo}"}',
            None,
            r"train row 1: missing or empty field 'hypo'.*the row has 'id', 'premise'",
        ),
        (
            None,
            [{"input": "q", "label": "a", "split": "training"}],
            r"row 1: split 'training' is not one of train, valid \(validation\), test",
        ),
        (None, [{"input": "q", "label": "a", "split": "test"}], "no train rows"),
        (
            None,
            [{"premise": "p", "label": "a"}],
            r"missing or empty field 'input'.*or join your columns with an input_template in nli.task.json",
        ),
    ],
)
def test_bad_custom_data_gets_a_one_line_error_naming_the_file_and_row(
    tmp_path, custom_nli_rows, task_file, rows, message
):
    path = write_jsonl(tmp_path / "nli.jsonl", rows or custom_nli_rows, drop=("input",))
    if task_file:
        (tmp_path / "nli.task.json").write_text(task_file)
    with pytest.raises(ValueError, match=message) as raised:
        tasks.load_split(tasks.get_task(str(path)), "train")
    assert "\n" not in str(raised.value).replace("\\n", "")


def test_a_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"input": "q", "label": "a"}\n{"input": "q2", "label": \n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not a JSON object"):
        tasks.get_task(str(path))


def test_parquet_and_hugging_face_folders_read_like_jsonl(tmp_path, custom_nli_rows):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    reference = tasks.get_task(str(write_jsonl(tmp_path / "nli.jsonl", custom_nli_rows)))
    pq.write_table(pyarrow.Table.from_pylist(custom_nli_rows), tmp_path / "nli.parquet")
    from_parquet = tasks.get_task(str(tmp_path / "nli.parquet"))
    assert (from_parquet.answer_style, from_parquet.labels) == (reference.answer_style, reference.labels)
    for split in tasks.SPLITS:
        assert tasks.load_split(from_parquet, split) == tasks.load_split(reference, split)

    datasets = pytest.importorskip("datasets")
    # a DatasetDict (one folder per split, "validation" named the Hugging Face way) with a class-label column
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "input": datasets.Value("string"),
            "rationale": datasets.Value("string"),
            "completion": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    columns = list(features)
    by_split = {
        name: [{c: r[c] for c in columns} for r in custom_nli_rows if r["split"] == split]
        for name, split in (("train", "train"), ("validation", "test"))
    }
    datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows, features=features) for name, rows in by_split.items()}
    ).save_to_disk(str(tmp_path / "hf"))
    from_hf = tasks.get_task(str(tmp_path / "hf"))
    assert (from_hf.name, from_hf.answer_style, from_hf.labels) == ("hf", "label", reference.labels)
    assert (
        tasks.load_split(from_hf, "valid") == tasks.load_split(reference, "test")
        and tasks.load_split(from_hf, "test") == []
    )
    # a single Dataset keeps its split column
    datasets.Dataset.from_list(custom_nli_rows).save_to_disk(str(tmp_path / "one"))
    assert tasks.load_split(tasks.get_task(str(tmp_path / "one")), "test") == tasks.load_split(reference, "test")


@pytest.mark.parametrize("package", ["pyarrow.parquet", "datasets"])
def test_a_missing_optional_reader_is_a_clear_error(tmp_path, monkeypatch, package):
    if package == "datasets":
        path = tmp_path / "hf"
        path.mkdir()
        (path / "dataset_dict.json").write_text('{"splits": ["train"]}')
        message = r"hf is a Hugging Face datasets folder: reading it needs the `datasets` package.*pip install datasets"
    else:
        path = tmp_path / "data.parquet"
        path.write_bytes(b"PAR1")
        message = r"data.parquet: reading Parquet needs pyarrow.*pip install pyarrow"
    monkeypatch.setitem(sys.modules, package, None)  # as in an environment without it: importing it fails
    with pytest.raises(ValueError, match=message):
        tasks.get_task(str(path))


def test_the_fingerprint_follows_the_input_and_choices():
    fingerprint = tasks.input_fingerprint
    example = tasks.Example("a", "Where is a bed?", "bedroom", ["sea", "bedroom"])
    # the label and what came with the example (rationale, completion) are not the input
    same = tasks.Example("a", "Where is a bed?", "sea", ["sea", "bedroom"], rationale="x", teacher_completion="y")
    assert fingerprint(example) == fingerprint(same)
    assert fingerprint(example) != fingerprint(tasks.Example("a", "Where is a bed? ", "bedroom", ["sea", "bedroom"]))
    assert fingerprint(example) != fingerprint(tasks.Example("a", "Where is a bed?", "bedroom", ["sea", "moon"]))


@pytest.mark.parametrize(
    "choices,message",
    [
        (7, r"'choices' must be a list of texts .* got 7"),
        ({"a": "yes"}, r"'choices' must be a list of texts"),
        ([f"choice {i}" for i in range(27)], r"27 choices; at most 26 \(one per letter a-z\)"),
    ],
)
def test_choices_that_are_not_a_list_or_too_many_are_named(tmp_path, choices, message):
    label = choices[0] if isinstance(choices, list) else "yes"
    path = write_jsonl(tmp_path / "mc.jsonl", [{"input": "q", "label": label, "choices": choices}])
    with pytest.raises(ValueError, match=rf"mc.jsonl, train row 1: {message}"):
        tasks.load_split(tasks.get_task(str(path)), "train")


@pytest.mark.parametrize(
    "content,message",
    [
        ('["esnli"]', "holds a JSON list, not the task's settings"),
        ('{"name": "esnli", "answer_style": "label", "prompt": "x"}', "unknown key 'prompt'"),
        ('{"name": "esnli"}', "lacks answer_style"),
    ],
)
def test_a_bad_task_json_in_a_folder_is_named(tmp_path, content, message):
    (tmp_path / "task.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        tasks.load_task(tmp_path)


def test_a_built_in_task_takes_back_its_own_label_set_and_refuses_another():
    esnli = tasks.get_task("esnli")
    assert tasks.get_task("esnli", list(esnli.labels)) == esnli  # as a finished run's train_config.json records it
    with pytest.raises(ValueError, match=r"--labels is for custom tasks: esnli has its own \(entailment"):
        tasks.get_task("esnli", ["yes", "no"])
