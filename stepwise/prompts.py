"""Prompts and parsing: the student's two inputs (label, rationale), the teacher's few-shot chain-of-thought prompts,
and a teacher completion read back as (rationale, label), or as malformed with the reason."""

from __future__ import annotations

import re

from stepwise.scoring import evaluate_equation, is_correct, normalize
from stepwise.task_model import LETTERS, Example, Parsed, Task

LABEL_PREFIX = "predict: "
RATIONALE_PREFIX = "explain: "


# ---------------------------------------------------------------- student inputs


def label_input(example: Example) -> str:
    return LABEL_PREFIX + example.input


def rationale_input(example: Example) -> str:
    return RATIONALE_PREFIX + example.input


def reasoned_label_input(example: Example, rationale: str) -> str:
    """The label input with a rationale after it: what the served consistency signal scores the labels on, to read
    the label a rationale reaches (the student's rationales end without an answer sentence, like the teacher's
    rationales it learnt them from)."""
    return f"{label_input(example)}\nRationale: {rationale}"


# ---------------------------------------------------------------- teacher prompts


def _nli_layout(task: Task) -> bool:
    """The built-in e-SNLI keeps the layout of the PaLM prompts its shipped completions came from (the input,
    then "Reasonings:"); every other task, custom label tasks included, asks "Q: <input>" / "A:"."""
    return task.answer_style == "label" and not task.source


def _question_block(task: Task, example: Example) -> str:
    """The exemplar/question layout of the prompts (the PaLM ones, visible in the shipped run-ons)."""
    if _nli_layout(task):
        return f"{example.input}\nReasonings:"
    return f"Q: {example.input}\nA:"


def answer_sentence(task: Task, label: str, choices: list[str] | None = None) -> str:
    if task.answer_style == "equation":
        return f"The answer is {label}."  # equations carry their own parentheses: "(84 / 2)"
    if task.answer_style == "label":  # a line of its own: "A: <rationale>\nAnswer: <label>"
        return f"\nAnswer: {label}"
    if choices:
        return f"So the answer is ({LETTERS[choices.index(label)]}) {label}."
    return f"So the answer is {label}."


def stop_strings(task: Task) -> list[str]:
    """Where a completion runs on into the next few-shot example; also the engine's stop strings."""
    return ["\n\nPremise:", "\nPremise:"] if _nli_layout(task) else ["\n\nQ:", "\nQ:"]


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
            if (
                parsed.status != "ok"
                or not is_correct(task, parsed.label, example.label)
                or len(parsed.rationale) > 400
            ):
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


# ---------------------------------------------------------------- parsing


_ANSWER_PATTERNS = {
    "equation": re.compile(r"The answer is\s*(.+?)\s*\.?\s*$", re.S),
    "choice": re.compile(r"So the answer is\s*(?:\(([a-z])\))?\s*(.*?)\s*\.?\s*$", re.S | re.I),
    "free": re.compile(r"So the answer is\s*(.+?)\s*\.?\s*$", re.S | re.I),
}
_ANSWER_SPLITS = {"equation": "The answer is", "choice": "So the answer is", "free": "So the answer is"}
# A label task's answer: "Answer: <label>" (the prompts' form) or "So the answer is <label>." (a common
# chain-of-thought ending), the label being the rest of that line.
_LABEL_ANSWER = re.compile(r"(?:Answer:|So the answer is)[ \t]*([^\n]*)")


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
    if task.answer_style == "label":
        return _parse_label(task, text)
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
        return (
            Parsed(rationale, text_answer, "ok") if text_answer else Parsed(rationale, "", "malformed", "empty answer")
        )
    label = match.group(1).strip()
    return Parsed(rationale, label, "ok") if label else Parsed(rationale, "", "malformed", "empty answer")


def _parse_label(task: Task, text: str) -> Parsed:
    """A label task's completion: the rationale, then the first answer line; whatever follows it is a run-on
    into another example (a custom task's completions may come from a prompt whose stop strings are unknown)."""
    match = _LABEL_ANSWER.search(text)
    if not match:
        return Parsed(text, "", "malformed", "no answer sentence: expected 'Answer: <label>'")
    rationale, said = text[: match.start()].strip(), match.group(1).strip()
    if not rationale:
        return Parsed("", "", "malformed", "answer without a rationale")
    found = [label for label in task.labels if normalize(label) == normalize(said)]
    if not found:
        return Parsed(rationale, "", "malformed", f"label is not one of {'/'.join(task.labels)}: {said[:40]!r}")
    return Parsed(rationale, found[0], "ok")
