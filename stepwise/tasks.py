"""The task layer, one import for every stage: how an example becomes model input, how a teacher completion becomes
(rationale, label), and how a prediction is scored. Standard library only, so it imports under both environments
(the teacher's vLLM one and the student's ONNX one).

Callers write `from stepwise import tasks; tasks.X`; the parts behind it, by concern:
    task_model   Task, Example, Parsed, and an example's input text from its named fields (imported by the others)
    task_data    the built-in tasks and custom datasets: files, Parquet, Hugging Face folders, task files, label sets
    prompts      the student's inputs, the teacher's few-shot prompts, and a completion parsed into (rationale, label)
    scoring      labels compared normalised, equations by value, accuracy
Here: the task written into every artifact folder (task.json) and read back.
"""

from __future__ import annotations

from pathlib import Path

from stepwise import artifacts, storage
from stepwise.prompts import (
    LABEL_PREFIX,
    RATIONALE_PREFIX,
    answer_sentence,
    exemplars,
    few_shot_prompt,
    label_input,
    parse_completion,
    rationale_input,
    reasoned_label_input,
    stop_strings,
)
from stepwise.scoring import accuracy, evaluate_equation, is_correct, normalize
from stepwise.task_data import get_task, load_split
from stepwise.task_model import (
    LETTERS,
    NLI_LABELS,
    NLI_TEMPLATE,
    SPLITS,
    Example,
    Parsed,
    Task,
    cqa_input,
    format_input,
    input_fields,
    input_fingerprint,
    nli_input,
)

# What the stages use, from one place.
__all__ = [
    "Example",
    "LABEL_PREFIX",
    "LETTERS",
    "NLI_LABELS",
    "NLI_TEMPLATE",
    "Parsed",
    "RATIONALE_PREFIX",
    "SPLITS",
    "Task",
    "accuracy",
    "answer_sentence",
    "cqa_input",
    "evaluate_equation",
    "exemplars",
    "few_shot_prompt",
    "format_input",
    "get_task",
    "input_fields",
    "input_fingerprint",
    "is_correct",
    "label_input",
    "load_split",
    "load_task",
    "nli_input",
    "normalize",
    "parse_completion",
    "rationale_input",
    "reasoned_label_input",
    "save_task",
    "stop_strings",
]


def save_task(task: Task, folder: str | Path) -> None:
    """task.json, written into every model, export and extraction folder (local or on an object store)."""
    artifacts.write_atomic(storage.join(folder, artifacts.TASK), task.to_json())


def load_task(folder: str | Path) -> Task:
    path = storage.join(folder, artifacts.TASK)
    data = artifacts.read_json(path, "not a stepwise model, export or extraction folder")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the task's settings (an object)")
    keys = list(Task.__dataclass_fields__)
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (written by another stepwise version?); the keys are "
                         f"{', '.join(keys)}")  # fmt: skip
    missing = [k for k in ("name", "answer_style") if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return Task(**data)
