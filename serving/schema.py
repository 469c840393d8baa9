"""The HTTP API's contract: request and response models, the error body and its status codes, and how a
request input becomes a task example.

The request model is built per app from its limits and models, so /openapi.json states what the server
enforces (non-empty text, most items, most characters, the allowed fields and model ids) and a request the
schema accepts is one the server accepts, for the model it names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, create_model

from stepwise import tasks
from stepwise.serving.settings import LimitOptions

MODEL_HEADER = "serve_multiplexed_model_id"  # Serve routes a request to a replica that has this model loaded
# Some character that is not blank: whitespace as JSON Schema (ECMA-262), pydantic (Rust's regex) and Python's
# str.strip all understand it (they differ on \x1c-\x1f, \x85 and \ufeff). A pattern also makes pydantic refuse
# text that is not valid Unicode (a lone surrogate such as \ud800).
NOT_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong, naming the field")


class PredictionOut(BaseModel):
    label: str
    probability: float | None = Field(
        None, description="the student's probability of the label, normalised over the candidates (closed label sets)"
    )
    margin: float | None = Field(
        None, description="the student's label probability minus the runner-up's (closed label sets): how sure it is"
    )
    scores: dict[str, float] | None = Field(
        None, description='every candidate\'s probability, with "scores": true (closed label sets)'
    )
    log_prob: float | None = Field(None, description="the generated label's sequence log-probability (open labels)")
    rationale: str | None = Field(None, description='with "explain": true, or the teacher\'s when it answered')
    source: Literal["student", "teacher"] = Field(
        "student", description="who answered: the teacher when the student's margin was below the fallback's threshold"
    )
    fallback_error: str | None = Field(None, description="why the teacher's answer was not used (the student's stands)")
    fallback_signal: Literal["margin", "consistency", "both"] | None = Field(
        None,
        description="what sent the prediction to the teacher: its margin, its rationale reaching another label "
        "(consistency), or both",
    )


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[PredictionOut]


class ModelInfo(BaseModel):
    id: str
    task: str
    answer_style: str
    labels: list[str]
    version: str = Field(description="the export's version (every replica loads every model before it answers)")


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]


ERRORS = {
    400: "the body is not valid JSON",
    404: "unknown model id (see /v1/models), or unknown path",
    413: "the body, an input, a choice or the number of inputs is over the server's limits",
    422: (
        "the body does not have the request's shape: missing or unknown fields, empty or invalid text, "
        "choices where the model's labels are fixed"
    ),
    500: "decoding failed for this request's inputs (other requests in its batch are unaffected)",
    503: "overloaded: retry after the Retry-After header's seconds (answered by Serve's proxy)",
    504: "still decoding after the server's request timeout",
}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in ERRORS.items()
}


# ---------------------------------------------------------------- the request, built per app


def fields_tag(fields: list[str]) -> str:
    return "fields_" + "_".join(fields)


def input_shape(item: Any, field_sets: list[list[str]]) -> str:
    """Which input form a request item is (the union's discriminator, returning the tag of a model below): an
    object is the task-field form whose fields it shares most, unless it names `question` or `input`."""
    if not isinstance(item, dict):
        return "string"  # a string, or anything else: validated (and refused) as one
    if "question" in item:
        return "question_choices"
    if "input" in item or not field_sets:
        return "input_object"
    return fields_tag(max(field_sets, key=lambda fields: len(set(fields) & set(item))))


def predict_request_model(limits: LimitOptions, served: dict[str, tasks.Task]) -> type[BaseModel]:
    """The POST /v1/predict body for an app serving these models (id -> task) under `limits`: a string (the
    formatted input), an object of a task's input fields (e.g. premise and hypothesis), {input} (with choices
    for a multiple-choice model) or {question, choices}; or a list of them."""
    text = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_input_chars, pattern=NOT_BLANK)]
    choice = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_choice_chars, pattern=NOT_BLANK)]
    choices = Annotated[list[choice], Field(min_length=1, max_length=limits.max_choices)]
    strict = ConfigDict(extra="forbid")
    field_sets = list(
        {tuple(tasks.input_fields(t)): None for t in served.values() if tasks.input_fields(t) != ["input"]}
    )
    shapes: list[Any] = [Annotated[text, Tag("string")]]
    for fields in field_sets:
        model = create_model("".join(f.title() for f in fields), __config__=strict, **{f: (text, ...) for f in fields})
        shapes.append(Annotated[model, Tag(fields_tag(list(fields)))])
    if any(t.answer_style == "choice" for t in served.values()):
        plain = create_model("TextInput", __config__=strict, input=(text, ...), choices=(choices | None, None))
        question = create_model("QuestionChoices", __config__=strict, question=(text, ...), choices=(choices, ...))
        shapes += [Annotated[plain, Tag("input_object")], Annotated[question, Tag("question_choices")]]
    else:
        shapes.append(Annotated[create_model("TextInput", __config__=strict, input=(text, ...)), Tag("input_object")])
    sets = [list(fields) for fields in field_sets]
    item = Annotated[Union[tuple(shapes)], Discriminator(lambda value: input_shape(value, sets))]
    many = Annotated[list[item], Field(min_length=1, max_length=limits.max_items)]
    inputs = Annotated[
        Union[Annotated[item, Tag("one")], Annotated[many, Tag("many")]],
        Discriminator(lambda v: "many" if isinstance(v, list) else "one"),
    ]
    model_ids = Literal[tuple(served)] | None  # type: ignore[valid-type]
    forms = ", ".join(["text"] + ["{" + ", ".join(fields) + "}" for fields in sets] + ["{input[, choices]}"])
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"inputs": example_input(next(iter(served.values())))}]}
        ),
        inputs=(inputs, Field(description=f"one input or a list: {forms}")),
        model=(
            model_ids,
            Field(
                None,
                description=f"model id (see /v1/models), or the {MODEL_HEADER} header; "
                "may be left out when one model is served",
            ),
        ),
        explain=(bool, Field(False, strict=True, description="also generate each input's rationale (slower)")),
        scores=(bool, Field(False, strict=True, description="also return every candidate label's probability")),
    )


def example_input(task: tasks.Task) -> Any:
    """A schema-valid input for the docs' example request."""
    fields = tasks.input_fields(task)
    if task.answer_style == "choice":
        return {"question": "Where do people keep books?", "choices": ["library", "oven", "lake"]}
    if fields == ["premise", "hypothesis"]:
        return {"premise": "A man plays a guitar.", "hypothesis": "A person makes music."}
    return {field: "some text" for field in fields}


# ---------------------------------------------------------------- validation errors as one message


TAGS = {"string", "input_object", "question_choices", "one", "many"}


def describe_problems(problems: list[dict[str, Any]], limits: LimitOptions) -> tuple[int, str]:
    """Pydantic's errors as (status, one readable message naming the fields): 400 for a body that is not JSON,
    404 for an unknown model, 413 for what is over a limit, else 422."""
    invalid_json = next((p for p in problems if p["type"] == "json_invalid"), None)
    if invalid_json:
        return (
            400,
            f"malformed JSON: {invalid_json.get('ctx', {}).get('error', 'cannot parse the body')} "
            f"(at character {invalid_json['loc'][-1]})",
        )
    statuses, messages = [], []
    for problem in problems:
        status, message = describe(problem, limits)
        statuses.append(status)
        messages.append(message)
    status = 404 if 404 in statuses else 413 if 413 in statuses else 422
    return status, "; ".join(dict.fromkeys(m for s, m in zip(statuses, messages, strict=True) if s == status))


def describe(problem: dict[str, Any], limits: LimitOptions) -> tuple[int, str]:
    path = [
        str(part)
        for part in problem["loc"][1:]
        if isinstance(part, int) or not (part in TAGS or part.startswith("fields_"))
    ]
    field, kind, value = ".".join(path), problem["type"], problem.get("input")
    if not field:
        return 422, "body: expected a JSON object with 'inputs'" + (
            " (the request has no body)" if kind == "missing" else ""
        )
    if path[0] in ("model", MODEL_HEADER) and kind == "literal_error":
        return 404, f"model {value!r} is not served; models: {problem['ctx']['expected']}"
    in_choices = "choices" in path[:-1] or path[-1] == "choices"
    if kind == "string_too_long":
        limit = "max_choice_chars" if in_choices else "max_input_chars"
        return 413, f"{field}: {len(value)} characters, more than {limit}={getattr(limits, limit)}"
    if kind == "too_long":
        limit = "max_choices" if in_choices else "max_items"
        return 413, f"{field}: {len(value)} items, more than {limit}={getattr(limits, limit)}"
    if kind == "missing":
        return 422, f"{field}: required field missing"
    if kind == "extra_forbidden":
        return 422, f"{field}: unknown field"
    if kind == "string_unicode":
        return 422, f"{field}: not valid Unicode text (a lone surrogate such as \\ud800?)"
    if kind in ("string_pattern_mismatch", "string_too_short"):
        return 422, f"{field}: empty input"
    if kind == "too_short":
        return 422, f"{field}: empty list"
    if kind == "union_tag_invalid":
        keys = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
        return (
            422,
            f"{field}: an object with {keys} is not an input form these models take "
            f"({problem['ctx']['expected_tags']})",
        )
    if kind == "string_type" and (path == ["inputs"] or (len(path) == 2 and path[1].isdigit())):
        return 422, f"{field}: expected a string, an object or a list of them, got {type(value).__name__}"
    return 422, f"{field}: {problem['msg']}"


# ---------------------------------------------------------------- from request input to a task example


def to_example(item: Any, task: tasks.Task, where: str) -> tasks.Example:
    """A validated request item as the task example the student sees, or a 422 naming what does not fit
    this model (the shapes themselves were checked by the request model)."""
    choices = getattr(item, "choices", None)
    if isinstance(item, str):
        text = item
    elif hasattr(item, "question") or hasattr(item, "input"):
        text = getattr(item, "question", None) or item.input
    else:
        try:
            text = tasks.format_input(task, item.model_dump())
        except ValueError as problem:
            raise HTTPException(422, f"{where}: {problem}") from None
    if task.answer_style == "choice" and not choices:
        raise HTTPException(422, f"{where}: this model answers multiple-choice questions ({task.name}): give 'choices'")
    if task.answer_style != "choice" and choices:
        raise HTTPException(
            422,
            f"{where}.choices: this model's labels are fixed "
            f"({task.name}: {', '.join(task.labels) or 'free text'}); drop 'choices'",
        )
    return tasks.Example(id=where, input=tasks.cqa_input(text, choices) if choices else text, label="", choices=choices)
