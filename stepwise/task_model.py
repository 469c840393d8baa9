"""The task model: a task, its examples and a parsed teacher answer, and how an example's named fields become its
input text. The other task modules (task_data, prompts, scoring) build on it; standard library only."""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SPLITS = ("train", "valid", "test")
NLI_LABELS = ["entailment", "neutral", "contradiction"]
NLI_TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}"
LETTERS = "abcdefghijklmnopqrstuvwxyz"

AnswerStyle = Literal["equation", "choice", "label", "free"]
ANSWER_STYLES = ("equation", "choice", "label", "free")


@dataclass
class Task:
    """Everything a stage needs to know about a task; saved as JSON next to every artifact."""

    name: str
    answer_style: AnswerStyle  # how the answer sentence looks and how labels are compared
    labels: list[str] = field(default_factory=list)  # the closed label set of a `label` task
    source: str = ""  # a data file or folder for a custom task
    exemplar_count: int = 10
    input_template: str = ""  # how named fields become the input text ("": one field, `input`); see format_input

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @property
    def closed_label_set(self) -> bool:
        """Labels come from a known list (per task or per example), so they can be scored, not generated."""
        return self.answer_style in ("choice", "label")


@dataclass
class Example:
    id: str
    input: str  # the task input as text: question (+ answer choices), or premise + hypothesis
    label: str  # gold label, normalised to the task's label text
    choices: list[str] | None = None
    rationale: str | None = None  # a human or user-given rationale, when the data has one
    teacher_completion: str | None = None  # the shipped PaLM completion, for replay


@dataclass
class Parsed:
    rationale: str
    label: str
    status: Literal["ok", "malformed"]
    reason: str = ""


def input_fingerprint(example: Example) -> str:
    """A short hash of the text a teacher saw of an example (its input and choices). Extraction keeps it in
    every record; a resumed extraction redoes, and training skips, a record whose example has changed since."""
    text = "\x1f".join([example.input, *(example.choices or [])])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- input text


def cqa_input(question: str, choices: list[str]) -> str:
    lines = [question, "Answer Choices:"] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def nli_input(premise: str, hypothesis: str) -> str:
    return NLI_TEMPLATE.format(premise=premise, hypothesis=hypothesis)


def input_fields(task: Task) -> list[str]:
    """The named fields one input is made of: those of the task's input template, or just `input`."""
    return template_fields(task.input_template) if task.input_template else ["input"]


def format_input(task: Task, fields: Mapping[str, Any]) -> str:
    """The input text from named fields (a data row, or a request's JSON object): the task's input template
    filled in, or the `input` field as it is. Fields the task does not use are ignored. Raises ValueError
    naming the first field that is missing or empty."""
    names = input_fields(task)
    values = {name: cell_text(fields.get(name), strip=False) for name in names}
    for name in names:
        if not values[name].strip():
            uses = f" (task {task.name}'s input is built from {', '.join(map(repr, names))})"
            raise ValueError(f"missing or empty field {name!r}{uses if task.input_template else ''}")
    return task.input_template.format_map(values) if task.input_template else values["input"]


def template_fields(template: str) -> list[str]:
    """The field names of an input template, in order; only plain `{name}` placeholders are allowed."""
    names: list[str] = []
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as problem:
        raise ValueError(f"input_template {template!r}: {problem} (write a literal brace as {{{{ or }}}})") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            written = name + ("!" + conversion if conversion else "") + (":" + spec if spec else "")
            raise ValueError(f"input_template {template!r}: placeholder {{{written}}} is not a plain {{column}} name")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"input_template {template!r} names no field: write the columns as {{column}}")
    return names


def cell_text(value: Any, strip: bool = True) -> str:
    """A cell as text: "" for a missing cell (None); numbers and labels such as 0 become "0", not ""."""
    text = "" if value is None else str(value)
    return text.strip() if strip else text
