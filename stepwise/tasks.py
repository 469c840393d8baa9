"""The task layer: how an example becomes model input, how a teacher completion becomes
(rationale, label), and how a prediction is scored. Standard library only, so it imports under
both environments (the teacher's vLLM one and the student's ONNX one).

Built-in tasks read `../shared/datasets` (the paper's SVAMP, CommonsenseQA and e-SNLI with the PaLM-540B
completions its authors released); a custom task reads a user's JSONL or CSV.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import operator
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from stepwise import artifacts

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "valid", "test")
VALID_FRACTION = 0.1  # the paper holds out 10% of train for validation where a task has none
LABEL_PREFIX = "predict: "
RATIONALE_PREFIX = "explain: "
NLI_LABELS = ["entailment", "neutral", "contradiction"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"

AnswerStyle = Literal["equation", "choice", "label", "free"]


@dataclass
class Task:
    """Everything a stage needs to know about a task; saved as JSON next to every artifact."""

    name: str
    answer_style: AnswerStyle  # how the answer sentence looks and how labels are compared
    labels: list[str] = field(default_factory=list)  # the closed label set of a `label` task
    source: str = ""  # a data file or folder for a custom task
    exemplar_count: int = 10

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


# ---------------------------------------------------------------- loading


def datasets_dir() -> Path:
    return Path(os.environ.get("STEPWISE_DATASETS", ROOT.parent / "shared" / "datasets"))


BUILTIN = {
    "svamp": Task("svamp", "equation"),
    "cqa": Task("cqa", "choice"),
    "esnli": Task("esnli", "label", labels=list(NLI_LABELS)),
}
# Shipped files per task: our split -> (file split, teacher batch size). esnli ships no train split,
# so its valid file is cut into train and valid, as the paper's authors trained on what they had.
SHIPPED = {
    "svamp": {"train": ("train", 500), "test": ("test", 500)},
    "cqa": {"train": ("train", 1000), "test": ("test", 1000)},
    "esnli": {"train": ("valid", 5500), "test": ("test", 5500)},
}


def get_task(name_or_path: str) -> Task:
    """A built-in task by name, or a custom task from a JSONL/CSV file or a folder of split files."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path.removeprefix("custom:"))
    if not path.exists():
        raise ValueError(f"unknown task {name_or_path!r}: not one of {sorted(BUILTIN)} and no such file or folder")
    rows = [row for split in SPLITS for row in _custom_rows(path, split)]
    if not rows:
        raise ValueError(f"custom task {path}: no rows found")
    style: AnswerStyle = "choice" if any(r.get("choices") for r in rows) else "free"
    return Task(path.stem, style, source=str(path.resolve()))


def save_task(task: Task, folder: Path) -> None:
    """task.json, written into every model, export and extraction folder."""
    artifacts.write_atomic(Path(folder) / artifacts.TASK, task.to_json())


def load_task(folder: Path) -> Task:
    return Task(**artifacts.read_json(Path(folder) / artifacts.TASK, "not a stepwise model, export or extraction folder"))


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


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


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
    for i, (row, completion) in enumerate(zip(rows, completions)):
        example_id = row.get("id") or f"{task.name}-{file_split}-{i:06d}"
        if task.name == "svamp":
            examples.append(Example(example_id, row["input"], row["label"], teacher_completion=completion))
        elif task.name == "cqa":
            examples.append(Example(example_id, cqa_input(row["question"], row["choices"]), row["answer"], row["choices"], row.get("abstractive_explanation"), completion))
        else:
            examples.append(Example(example_id, nli_input(row["premise"], row["hypothesis"]), NLI_LABELS[int(row["label"])], rationale=row.get("explanation_1"), teacher_completion=completion))
    return examples


def cqa_input(question: str, choices: list[str]) -> str:
    lines = [question, "Answer Choices:"] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def nli_input(premise: str, hypothesis: str) -> str:
    return f"Premise: {premise}\nHypothesis: {hypothesis}"


def _custom_rows(path: Path, split: str) -> list[dict]:
    """Rows of a custom dataset for one split: a folder holds <split>.jsonl/.csv; a single file
    holds rows with an optional `split` column (rows without one are train)."""
    if path.is_dir():
        files = [path / f"{split}.{ext}" for ext in ("jsonl", "json", "csv")]
        return [dict(r, _row=i) for f in files if f.exists() for i, r in enumerate(_read_table(f))]
    rows = [dict(r, _row=i) for i, r in enumerate(_read_table(path))]
    return [r for r in rows if (r.get("split") or "train") == split]


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    raise ValueError(f"custom task {path}: expected a .jsonl or .csv file")


def _custom_example(task: Task, row: dict, split_name: str) -> Example:
    where = f"custom task {task.source}, {split_name} row {row['_row'] + 1}"
    for column in ("input", "label"):
        if not str(row.get(column) or "").strip():
            raise ValueError(f"{where}: missing or empty {column!r}")
    choices = row.get("choices") or None
    if isinstance(choices, str):  # CSV: choices separated by |
        choices = [c.strip() for c in choices.split("|") if c.strip()]
    label = str(row["label"]).strip()
    if choices and label not in choices:
        raise ValueError(f"{where}: label {label!r} is not one of its choices {choices}")
    example_id = str(row.get("id") or f"{task.name}-{split_name}-{row['_row']:06d}")
    text = cqa_input(str(row["input"]), choices) if choices else str(row["input"])
    return Example(example_id, text, label, choices, row.get("rationale") or None)


def _load_custom(task: Task, split: str) -> list[Example]:
    path = Path(task.source)
    rows = {s: [_custom_example(task, r, s) for r in _custom_rows(path, s)] for s in SPLITS}
    if rows["valid"] or split == "test":  # a missing test split stays empty; training then reports valid
        return rows[split]
    # No valid rows given: hold out 10% of train, as for the built-in tasks.
    return [e for e in rows["train"] if in_valid_split(e.id) == (split == "valid")]


# ---------------------------------------------------------------- student inputs


def label_input(example: Example) -> str:
    return LABEL_PREFIX + example.input


def rationale_input(example: Example) -> str:
    return RATIONALE_PREFIX + example.input


# ---------------------------------------------------------------- teacher prompts and parsing


def _question_block(task: Task, example: Example) -> str:
    """The exemplar/question layout the PaLM prompts used (visible in the shipped run-ons)."""
    if task.answer_style == "label":
        return f"{example.input}\nReasonings:"
    return f"Q: {example.input}\nA:"


def answer_sentence(task: Task, label: str, choices: list[str] | None = None) -> str:
    if task.answer_style == "equation":
        return f"The answer is {label}."  # equations carry their own parentheses: "(84 / 2)"
    if task.answer_style == "label":
        return f"\nAnswer: {label}"
    if choices:
        return f"So the answer is ({LETTERS[choices.index(label)]}) {label}."
    return f"So the answer is {label}."


def stop_strings(task: Task) -> list[str]:
    """Where a completion runs on into the next few-shot example; also the engine's stop strings."""
    return ["\n\nPremise:", "\nPremise:"] if task.answer_style == "label" else ["\n\nQ:", "\nQ:"]


def exemplars(task: Task, pool: list[Example]) -> list[str]:
    """Few-shot chain-of-thought exemplars: the first examples of `pool` (the train split) whose
    rationale is known good, taken round-robin over labels for a closed label set."""
    by_label: dict[str, list[str]] = {}
    for example in pool:
        key = example.label if task.labels else ""
        if len(by_label.get(key, [])) >= task.exemplar_count:
            continue
        if example.teacher_completion is not None:
            parsed = parse_completion(task, example.teacher_completion, example.choices)
            if parsed.status != "ok" or not is_correct(task, parsed.label, example.label) or len(parsed.rationale) > 400:
                continue
            rationale, label = parsed.rationale, parsed.label  # the teacher's own wording of a correct answer
        elif example.rationale:
            rationale, label = example.rationale.strip(), example.label
        else:
            continue
        joiner = "" if task.answer_style == "label" else " "
        shot = f"{_question_block(task, example)} {rationale}{joiner}{answer_sentence(task, label, example.choices)}"
        by_label.setdefault(key, []).append(shot)
    picked: list[str] = []
    for i in range(task.exemplar_count):
        picked += [shots[i] for shots in by_label.values() if i < len(shots)]
    return picked[: task.exemplar_count]


def few_shot_prompt(task: Task, shots: list[str], example: Example) -> str:
    """The teacher prompt: a shared few-shot prefix (cached by the engine) and the example's question."""
    return "\n\n".join(shots + [_question_block(task, example)])


_ANSWER_PATTERNS = {
    "equation": re.compile(r"The answer is\s*(.+?)\s*\.?\s*$", re.S),
    "choice": re.compile(r"So the answer is\s*(?:\(([a-z])\))?\s*(.*?)\s*\.?\s*$", re.S | re.I),
    "free": re.compile(r"So the answer is\s*(.+?)\s*\.?\s*$", re.S | re.I),
    "label": re.compile(r"Answer:[ \t]*([^\n]*)", re.S),  # the label is the rest of that line
}
_ANSWER_SPLITS = {"equation": "The answer is", "choice": "So the answer is", "free": "So the answer is", "label": "Answer:"}


def cut_run_on(task: Task, completion: str) -> str:
    for stop in stop_strings(task):
        completion = completion.split(stop)[0]
    return completion.strip()


def parse_completion(task: Task, completion: str | None, choices: list[str] | None = None) -> Parsed:
    """(rationale, label, status) from a raw teacher completion. Never raises; a completion that
    yields no valid label is `malformed` with the reason, never a silent blank label."""
    if completion is None or not completion.strip():
        return Parsed("", "", "malformed", "empty completion")
    text = cut_run_on(task, completion)
    marker = _ANSWER_SPLITS[task.answer_style]
    at = text.rfind(marker)
    if at < 0:
        return Parsed(text, "", "malformed", f"no answer sentence: expected {marker!r}")
    rationale, answer = text[:at].strip(), text[at:]
    match = _ANSWER_PATTERNS[task.answer_style].match(answer)
    if not match:
        return Parsed(rationale, "", "malformed", f"unreadable answer sentence: {answer[:80]!r}")
    if not rationale:
        return Parsed("", "", "malformed", "answer without a rationale")
    if task.answer_style == "equation":
        expression = match.group(1).strip()
        if evaluate_equation(expression) is None:
            return Parsed(rationale, "", "malformed", f"answer is not a computable expression: {expression[:80]!r}")
        return Parsed(rationale, expression, "ok")
    if task.answer_style == "choice":
        letter, text_answer = match.group(1), match.group(2).strip()
        if choices and letter and LETTERS.index(letter.lower()) < len(choices):
            return Parsed(rationale, choices[LETTERS.index(letter.lower())], "ok")
        if choices:
            found = [c for c in choices if normalize(c) == normalize(text_answer)]
            if found:
                return Parsed(rationale, found[0], "ok")
            return Parsed(rationale, "", "malformed", f"answer is none of the choices: {text_answer[:60]!r}")
        return Parsed(rationale, text_answer, "ok") if text_answer else Parsed(rationale, "", "malformed", "empty answer")
    if task.answer_style == "label":
        label = normalize(match.group(1))
        if label not in task.labels:
            return Parsed(rationale, "", "malformed", f"label is not one of {'/'.join(task.labels)}: {match.group(1)[:40]!r}")
        return Parsed(rationale, label, "ok")
    label = match.group(1).strip()
    return Parsed(rationale, label, "ok") if label else Parsed(rationale, "", "malformed", "empty answer")


# ---------------------------------------------------------------- metrics


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().strip(".").split())


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate_equation(expression: str) -> float | None:
    """Value of an arithmetic expression, or None for anything that is not one (names, calls,
    division by zero, overflow). Parses with `ast`, never `eval`."""
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace(",", "").replace("$", "").strip()
    if not text or len(text) > 200:
        return None
    try:
        return _evaluate(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise OverflowError("exponent too large")
        result = _OPERATORS[type(node.op)](left, right)
        if isinstance(result, complex) or not math.isfinite(result):
            raise ValueError("not a real number")
        return result
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def is_correct(task: Task, prediction: str, gold: str) -> bool:
    if task.answer_style == "equation":
        predicted, expected = evaluate_equation(prediction), evaluate_equation(gold)
        return predicted is not None and expected is not None and math.isclose(predicted, expected, rel_tol=1e-4, abs_tol=1e-4)
    return normalize(prediction) == normalize(gold)


def accuracy(task: Task, predictions: list[str], golds: list[str]) -> float:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        return 0.0
    return sum(is_correct(task, p, g) for p, g in zip(predictions, golds)) / len(golds)
