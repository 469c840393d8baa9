"""Task data: the built-in tasks with their shipped datasets, custom tasks from a user's files, and the splits of
both (a custom dataset's label set inferred when it declares none).

Built-in tasks read `../shared/datasets` (the paper's SVAMP, CommonsenseQA and e-SNLI with the PaLM-540B
completions its authors released); a custom task reads a user's JSONL, CSV or Parquet file, a folder of split
files, or a Hugging Face `datasets` folder (`save_to_disk`), with an optional task file beside it.

A custom dataset's columns:
    input         the student's input text, or several columns joined by the task file's `input_template`
    label         the gold answer
    choices       optional: the answer choices of a multiple-choice row (a list, or `a|b|c` in CSV)
    rationale     optional: a human or pre-made rationale (`stepwise extract --teacher dataset`)
    completion    optional: a teacher's raw chain-of-thought text (`stepwise extract --teacher replay`)
    split         optional: train, valid (or validation) or test; rows without one are train
    id            optional: a stable id (else the row's position)

The task file (`<data stem>.task.json` or `.task.toml` beside a file; `task.json` or `task.toml` inside a
folder) may set `name`, `labels`, `input_template` (e.g. "Premise: {premise}\nHypothesis: {hypothesis}"),
`answer_style` and `exemplar_count`.

Closed label sets: a custom task without `choices` has one when the task file or `--labels` declares it, or
when its train labels take at most 32 distinct values and each appears at least twice (normalised text);
otherwise its answers are free text (`answer_style = "free"` in the task file turns inference off). A task
with a label set has answer_style "label": the parser rejects any other label, structured output is
constrained to the set, and the student scores the set instead of generating a label.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from stepwise import ROOT, storage
from stepwise.scoring import normalize
from stepwise.task_model import (
    ANSWER_STYLES,
    LETTERS,
    NLI_LABELS,
    NLI_TEMPLATE,
    SPLITS,
    AnswerStyle,
    Example,
    Task,
    cell_text,
    cqa_input,
    format_input,
    nli_input,
    template_fields,
)

VALID_FRACTION = 0.1  # the paper holds out 10% of train for validation where a task has none
# A custom task's label set is inferred when its train labels take at most this many distinct values...
INFERRED_LABELS_MAX = 32
# ...and each of them appears at least this often (a label seen once is more likely a free answer).
INFERRED_LABEL_MIN_COUNT = 2
TASK_FILE_KEYS = ("name", "labels", "input_template", "answer_style", "exemplar_count")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_ALIASES = {"validation": "valid"}  # Hugging Face's name for the validation split


# ---------------------------------------------------------------- tasks and splits


def datasets_dir() -> Path:
    return Path(os.environ.get("STEPWISE_DATASETS", ROOT.parent / "shared" / "datasets"))


BUILTIN = {
    "svamp": Task("svamp", "equation"),
    "cqa": Task("cqa", "choice"),
    "esnli": Task("esnli", "label", labels=list(NLI_LABELS), input_template=NLI_TEMPLATE),
}
# Shipped files per task: our split -> (file split, teacher batch size). esnli ships no train split,
# so its valid file is cut into train and valid, as the paper's authors trained on what they had.
SHIPPED = {
    "svamp": {"train": ("train", 500), "test": ("test", 500)},
    "cqa": {"train": ("train", 1000), "test": ("test", 1000)},
    "esnli": {"train": ("valid", 5500), "test": ("test", 5500)},
}


def get_task(name_or_path: str, labels: list[str] | None = None) -> Task:
    """A built-in task by name, or a custom task from a data file or folder (see the module docstring),
    configured by its task file and `labels` (which overrides the task file's)."""
    if name_or_path in BUILTIN:
        # Its own label set given back is no conflict: a training run's train_config.json records it.
        if labels and labels != BUILTIN[name_or_path].labels:
            own = ", ".join(BUILTIN[name_or_path].labels) or "none"
            raise ValueError(f"--labels is for custom tasks: {name_or_path} has its own ({own})")
        return BUILTIN[name_or_path]
    given = storage.as_location(name_or_path.removeprefix("custom:"))
    if storage.is_remote(given):  # read from a local copy; the task stays named by its location (resume compares it)
        storage.check_location(given, "--task", must_exist=True)
    path = source_path(str(given)) if storage.is_remote(given) else Path(given)
    if not path.exists():
        raise ValueError(f"unknown task {name_or_path!r}: not one of {sorted(BUILTIN)} and no such file or folder")
    settings = read_task_file(path)
    if labels:
        settings["labels"] = _checked_labels(labels, "--labels")
    table = _custom_table(path)
    if not table["train"]:
        found = ", ".join(f"{split} {len(rows)}" for split, rows in table.items())
        raise ValueError(f"custom task {path}: no train rows ({found}); rows without a 'split' column are train")
    has_choices = any(row.get("choices") for rows in table.values() for row in rows)
    train_labels = [cell_text(row.get("label")) for row in table["train"]]
    style, label_set = _answer_style(path, settings, has_choices, train_labels)
    name, exemplar_count = settings.get("name") or path.stem, settings.get("exemplar_count", 10)
    source = str(given) if storage.is_remote(given) else str(path.resolve())
    return Task(name, style, label_set, source, exemplar_count, settings.get("input_template", ""))


def source_path(source: str) -> Path:
    """A custom task's data on this machine: its file or folder, or the local copy of one on an object store."""
    return storage.mirror(source) if storage.is_remote(source) else Path(source)


def in_valid_split(example_id: str) -> bool:
    """Deterministic 10% hold-out by a hash of the stable id (independent of row order)."""
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < VALID_FRACTION


def load_split(task: Task, split: str) -> list[Example]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    if task.source:
        return _load_custom(task, split)
    file_split = "train" if split == "valid" else split
    examples = _load_shipped(task, file_split)
    if split == "test":
        return examples
    return [e for e in examples if in_valid_split(e.id) == (split == "valid")]


# ---------------------------------------------------------------- the shipped datasets


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as problem:
                raise ValueError(f"{path}:{number}: not a JSON object ({problem.msg}); expected one per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _teacher_completions(task: str, file_split: str, batch: int, count: int) -> list[str | None]:
    completions: list[str | None] = []
    for k in range(math.ceil(count / batch)):
        path = datasets_dir() / task / "llm" / f"{file_split}_CoT_{k}.json"
        completions += json.loads(path.read_text()) if path.exists() else [None] * batch
    return completions[:count]


def _load_shipped(task: Task, our_split: str) -> list[Example]:
    file_split, batch = SHIPPED[task.name][our_split]
    path = datasets_dir() / task.name / f"{task.name}_{file_split}.json"
    if not path.exists():
        raise FileNotFoundError(f"dataset file missing: {path} (set STEPWISE_DATASETS to the datasets folder)")
    rows = _read_jsonl(path)
    completions = _teacher_completions(task.name, file_split, batch, len(rows))
    examples = []
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        example_id = row.get("id") or f"{task.name}-{file_split}-{i:06d}"
        if task.name == "svamp":
            examples.append(Example(example_id, row["input"], row["label"], teacher_completion=completion))
        elif task.name == "cqa":
            examples.append(
                Example(
                    example_id,
                    cqa_input(row["question"], row["choices"]),
                    row["answer"],
                    row["choices"],
                    row.get("abstractive_explanation"),
                    completion,
                )
            )
        else:
            examples.append(
                Example(
                    example_id,
                    nli_input(row["premise"], row["hypothesis"]),
                    NLI_LABELS[int(row["label"])],
                    rationale=row.get("explanation_1"),
                    teacher_completion=completion,
                )
            )
    return examples


# ---------------------------------------------------------------- custom tasks: task file and label set


def task_file_paths(path: Path) -> list[Path]:
    """Where a custom dataset's task file may be: beside a file (`data.task.json` for `data.jsonl`), or inside a
    folder."""
    if path.is_dir():
        return [path / "task.json", path / "task.toml"]
    return [path.with_suffix(".task.json"), path.with_suffix(".task.toml")]


def read_task_file(path: Path) -> dict[str, Any]:
    """The settings of a custom dataset's task file ({} when it has none), checked key by key."""
    found = [p for p in task_file_paths(path) if p.exists()]
    if not found:
        return {}
    if len(found) > 1:
        raise ValueError(f"custom task {path}: two task files ({found[0].name} and {found[1].name}); keep one")
    file = found[0]
    try:
        if file.suffix == ".toml":
            import tomllib

            settings = tomllib.loads(file.read_text())
        else:
            settings = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as problem:  # JSON's and TOML's decode errors are ValueErrors
        raise ValueError(f"task file {file} is not valid {file.suffix[1:].upper()}: {problem}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"task file {file}: expected a JSON object of settings ({', '.join(TASK_FILE_KEYS)})")
    unknown = sorted(set(settings) - set(TASK_FILE_KEYS))
    if unknown:
        raise ValueError(f"task file {file}: unknown key {unknown[0]!r}; the keys are {', '.join(TASK_FILE_KEYS)}")
    try:
        if "labels" in settings:
            settings["labels"] = _checked_labels(settings["labels"], "labels")
        if "input_template" in settings:
            if not isinstance(settings["input_template"], str):
                raise ValueError('input_template must be text such as "Premise: {premise}\\nHypothesis: {hypothesis}"')
            template_fields(settings["input_template"])
        if "answer_style" in settings and settings["answer_style"] not in ANSWER_STYLES:
            raise ValueError(f"answer_style {settings['answer_style']!r} is not one of {', '.join(ANSWER_STYLES)}")
        if "name" in settings and not (isinstance(settings["name"], str) and settings["name"].strip()):
            raise ValueError("name must be non-empty text")
        count = settings.get("exemplar_count", 0)
        if type(count) is not int or count < 0:
            raise ValueError(f"exemplar_count must be a whole number >= 0, got {count!r}")
    except ValueError as problem:
        raise ValueError(f"task file {file}: {problem}") from None
    return settings


def _checked_labels(labels: Any, where: str) -> list[str]:
    """A declared label set: at least two distinct, non-empty, one-line labels (compared normalised)."""
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{where} must be a list of label texts, got {labels!r}")
    cleaned = [label.strip() for label in labels]
    bad = [label for label in cleaned if not normalize(label) or "\n" in label]
    if bad:
        raise ValueError(f"{where}: label {bad[0]!r} is empty or spans several lines")
    repeated = [label for label, count in Counter(map(normalize, cleaned)).items() if count > 1]
    if repeated:
        raise ValueError(f"{where}: label {repeated[0]!r} is listed twice (labels compare lower-cased, no final '.')")
    if len(cleaned) < 2:
        raise ValueError(f"{where}: a label set needs at least two labels, got {cleaned}")
    return cleaned


def infer_label_set(labels: list[str]) -> list[str]:
    """The closed label set that a custom task's train labels imply, or [] for free answers: at most
    INFERRED_LABELS_MAX distinct labels, each seen at least INFERRED_LABEL_MIN_COUNT times, at least two of them,
    all on one line. Labels compare normalised; each is spelled as it first appears; the set is sorted."""
    given = [label for label in labels if normalize(label)]
    counts = Counter(map(normalize, given))
    if not 2 <= len(counts) <= INFERRED_LABELS_MAX or min(counts.values()) < INFERRED_LABEL_MIN_COUNT:
        return []
    if any("\n" in label for label in given):  # a label must fit the "Answer: <label>" line
        return []
    spelling: dict[str, str] = {}
    for label in given:
        spelling.setdefault(normalize(label), label)
    return sorted(spelling.values())


def _answer_style(path: Path, settings: dict, has_choices: bool, train_labels: list[str]) -> tuple[AnswerStyle, list]:
    declared, labels = settings.get("answer_style"), settings.get("labels")
    where = f"custom task {path}"
    if has_choices:
        if labels or declared not in (None, "choice"):
            raise ValueError(
                f"{where}: rows have 'choices', so each row's answer is one of its choices; "
                "drop labels/answer_style from the task file"
            )
        return "choice", []
    if declared == "choice":
        raise ValueError(f"{where}: answer_style 'choice' needs a 'choices' column")
    if labels:
        if declared not in (None, "label"):
            raise ValueError(f"{where}: a label set makes answer_style 'label', not {declared!r}")
        return "label", labels
    if declared == "label":
        raise ValueError(f"{where}: answer_style 'label' needs labels: list them in the task file or pass --labels")
    if declared is not None:
        return declared, []
    inferred = infer_label_set(train_labels)
    return ("label", inferred) if inferred else ("free", [])


# ---------------------------------------------------------------- custom tasks: rows


def _custom_table(path: Path) -> dict[str, list[dict]]:
    """A custom dataset's raw rows per split, each with `_row` (its position, for error messages): a Hugging Face
    datasets folder, a folder of <split>.<jsonl|json|csv|parquet> files, or one file whose optional `split` column
    says where each row goes."""
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _hf_table(path)
    if path.is_dir():
        table: dict[str, list[dict]] = {}
        for split in SPLITS:
            names = [split, *[alias for alias, target in SPLIT_ALIASES.items() if target == split]]
            files = [path / f"{name}{suffix}" for name in names for suffix in TABLE_SUFFIXES]
            files = [file for file in files if file.exists()]
            if len(files) > 1:
                found = ", ".join(f.name for f in files)
                raise ValueError(f"custom task folder {path}: several {split} files ({found}); keep one")
            table[split] = [dict(row, _row=i) for i, row in enumerate(_read_table(files[0]))] if files else []
        if not any(table.values()):
            raise ValueError(
                f"custom task folder {path}: no train/valid/test files ({'/'.join(TABLE_SUFFIXES)}), "
                "and not a Hugging Face datasets folder"
            )
        return table
    return _split_by_column(path, _read_table(path))


def _split_by_column(where: Path, rows: list[dict]) -> dict[str, list[dict]]:
    table: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for i, row in enumerate(rows):
        given = cell_text(row.get("split")) or "train"
        split = SPLIT_ALIASES.get(given, given)
        if split not in table:
            raise ValueError(
                f"custom task {where}, row {i + 1}: split {given!r} is not one of train, valid (validation), test"
            )
        table[split].append(dict(row, _row=i))
    return table


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".json" and path.read_text().lstrip().startswith("["):  # a JSON array of rows
        rows = json.loads(path.read_text())
        if not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: expected a JSON array of objects (one per row)")
        return rows
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{path}: reading Parquet needs pyarrow, which this environment lacks (pip install pyarrow)"
            ) from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"custom task {path}: expected a .jsonl, .json, .csv or .parquet file, or a folder")


def _hf_table(path: Path) -> dict[str, list[dict]]:
    """Rows of a Hugging Face `datasets` folder written by `save_to_disk` (a DatasetDict: one split per entry;
    a Dataset: rows with an optional `split` column). Class-label columns come back as their names."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path} is a Hugging Face datasets folder: reading it needs the `datasets` package, which "
            "this environment lacks (pip install datasets), or export it to JSONL or Parquet"
        ) from None

    def rows_of(dataset: Any) -> list[dict]:
        features = dataset.features.items()
        names = {column: feature.names for column, feature in features if isinstance(feature, datasets.ClassLabel)}
        rows = dataset.to_list()
        for row in rows:
            for column, labels in names.items():  # -1 marks an unlabelled row
                value = row[column]
                row[column] = labels[value] if isinstance(value, int) and 0 <= value < len(labels) else None
        return rows

    loaded = datasets.load_from_disk(str(path))
    if not isinstance(loaded, datasets.DatasetDict):
        return _split_by_column(path, rows_of(loaded))
    table: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for name, dataset in loaded.items():
        split = SPLIT_ALIASES.get(name, name)
        if split not in table:
            raise ValueError(f"custom task {path}: split {name!r} is not one of train, valid (validation), test")
        table[split] = [dict(row, _row=i) for i, row in enumerate(rows_of(dataset))]
    return table


def _custom_example(task: Task, row: dict, split: str) -> Example:
    where = f"custom task {task.source}, {split} row {row['_row'] + 1}"
    try:
        text = format_input(task, row)
    except ValueError as problem:
        columns = ", ".join(repr(c) for c in row if c != "_row")
        task_file = task_file_paths(source_path(task.source))[0].name
        hint = "" if task.input_template else f", or join your columns with an input_template in {task_file}"
        raise ValueError(f"{where}: {problem}; the row has {columns}: fill the field{hint}") from None
    label = cell_text(row.get("label"))
    if not label:
        raise ValueError(f"{where}: missing or empty 'label': every row needs its gold answer")
    choices = row.get("choices") or None
    if isinstance(choices, str):  # CSV: choices separated by |
        choices = [c.strip() for c in choices.split("|") if c.strip()]
    if choices is not None:
        if not isinstance(choices, list):
            raise ValueError(f"{where}: 'choices' must be a list of texts (or 'a | b' in a CSV), got {choices!r}")
        if len(choices) > len(LETTERS):  # each choice is shown with a letter, (a) to (z)
            raise ValueError(f"{where}: {len(choices)} choices; at most {len(LETTERS)} (one per letter a-z)")
        choices = [cell_text(c) for c in choices]
        if label not in choices:
            raise ValueError(f"{where}: label {label!r} is not one of its choices {choices}")
    if task.labels:
        known = [name for name in task.labels if normalize(name) == normalize(label)]
        if not known:
            task_file = task_file_paths(source_path(task.source))[0].name
            raise ValueError(
                f"{where}: label {label!r} is not one of the task's labels {'/'.join(task.labels)}: "
                f"fix the row, or declare the whole set (labels in {task_file}, or --labels)"
            )
        label = known[0]
    example_id = cell_text(row.get("id")) or f"{task.name}-{split}-{row['_row']:06d}"
    text = cqa_input(text, choices) if choices else text
    rationale, completion = (
        cell_text(row.get("rationale")) or None,
        cell_text(row.get("completion"), strip=False) or None,
    )
    return Example(example_id, text, label, choices, rationale, completion)


def _load_custom(task: Task, split: str) -> list[Example]:
    table = _custom_table(source_path(task.source))
    rows = {s: [_custom_example(task, r, s) for r in table[s]] for s in SPLITS}
    if rows["valid"] or split == "test":  # a missing test split stays empty; training then reports valid
        return rows[split]
    # No valid rows given: hold out 10% of train, as for the built-in tasks.
    return [e for e in rows["train"] if in_valid_split(e.id) == (split == "valid")]
