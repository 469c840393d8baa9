"""The served fallback: predictions the student is unsure of go to a real teacher (the tiny random teacher on a vLLM
OpenAI server on loopback); a dead, silent or misbehaving teacher never costs a request more than the fallback's
budget, and never a 5xx: the student's answer stands, marked with the reason; after a failure the teacher is skipped
for a cooldown.

One Ray + Serve for the module, three applications of the tiny exported e-SNLI student: one whose fallback is the
vLLM teacher at a margin that sends some of the test inputs (4 to 8 of 12), one whose teacher URL is a closed port, one
whose teacher accepts connections and never answers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import pytest

from stepwise import artifacts, tasks
from stepwise.export.runtime import Prediction, load_runtime, predict, rationale_labels
from stepwise.extraction.teachers import answer_regex
from stepwise.serving import app, fallback, lifecycle
from stepwise.serving.settings import FallbackOptions, ScalingOptions, ServeArgs
from stepwise.training.data import records_by_source, training_examples

from helpers import free_port
from serving_helpers import metric_samples, premise_hypothesis, wait_for_metric

ESNLI = tasks.get_task("esnli")
SMALL = ScalingOptions(replica_cpus=0.25)
TEACHER_TOKENS = 320  # room for the structured answer's longest form: a 300-character rationale line, then the label


# ---------------------------------------------------------------- a teacher that misbehaves (plain HTTP, no Ray)


class Misbehaving(BaseHTTPRequestHandler):
    """What a broken OpenAI-compatible server might answer, chosen by the base URL's first path segment."""

    ANSWERS = {
        "not-json": (200, "hello"),
        "no-choices": (200, json.dumps({"object": "text_completion"})),
        "empty-choices": (200, json.dumps({"choices": []})),
        "no-answer": (
            200,
            json.dumps({"choices": [{"index": 0, "text": " The sky is blue because of Rayleigh scattering."}]}),
        ),
        "wrong-label": (200, json.dumps({"choices": [{"index": 0, "text": " A man is a person.\nAnswer: maybe"}]})),
        "refused": (400, json.dumps({"error": "unknown model"})),
        "too-long": (400, json.dumps({"error": "this prompt has 9000 tokens, the context 2048"})),
        "wants-key": (401, ""),
        "overloaded": (503, json.dumps({"error": "overloaded while serving a prompt about a dog"})),
    }

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        status, body = self.ANSWERS[self.path.strip("/").split("/")[0]]
        if self.path.startswith("/wants-key/"):
            authorized = self.headers.get("authorization") == "Bearer sekrit"
            status, body = (200, self.ANSWERS["wrong-label"][1]) if authorized else (401, '{"error": "no key"}')
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def misbehaving_teacher() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


STUDENT = Prediction("neutral", None, 0.40, 0.05, {"entailment": 0.35, "neutral": 0.40, "contradiction": 0.25})


@pytest.mark.parametrize(
    "path, reason",
    [
        ("not-json", "teacher failed: not a completion response (JSONDecodeError"),
        ("no-choices", "teacher failed: not a completion response (KeyError"),
        ("empty-choices", "teacher's answer unreadable: empty completion"),
        ("no-answer", "teacher's answer unreadable: no answer sentence"),
        ("wrong-label", "teacher's answer unreadable: label is not one of entailment/neutral/contradiction: 'maybe'"),
        ("refused", "teacher failed: server error: HTTP 400"),
    ],
)
def test_a_teacher_that_misbehaves_leaves_the_students_answer(misbehaving_teacher, path, reason):
    settings = FallbackOptions(
        fallback=f"{misbehaving_teacher}/{path}",
        fallback_margin=0.5,
        fallback_model="m",
        fallback_retries=0,
        fallback_timeout_s=5,
    )
    example = tasks.load_split(ESNLI, "test")[0]

    async def ask() -> fallback.Outcome:
        return await fallback.ask(fallback.prepare(settings, ESNLI), example, STUDENT)

    outcome = asyncio.run(ask())
    assert outcome.source == "student" and outcome.prediction == STUDENT
    assert outcome.error.startswith(reason), outcome.error


def test_a_failed_teacher_is_skipped_for_the_cooldown_then_asked_again(misbehaving_teacher):
    settings = FallbackOptions(
        fallback=f"{misbehaving_teacher}/overloaded",
        fallback_margin=0.5,
        fallback_model="m",
        fallback_retries=0,
        fallback_cooldown_s=0.5,
    )
    example = tasks.load_split(ESNLI, "test")[0]

    async def ask_three_times() -> list[fallback.Outcome]:
        teacher = fallback.prepare(settings, ESNLI)
        first, second = await fallback.ask(teacher, example, STUDENT), await fallback.ask(teacher, example, STUDENT)
        await asyncio.sleep(0.6)
        return [first, second, await fallback.ask(teacher, example, STUDENT)]

    first, second, third = asyncio.run(ask_three_times())
    assert (
        first.error.startswith("teacher failed: server error after 0 retries: HTTP 503") and third.error == first.error
    )
    # The others are told the teacher is failing, never what the request that saw it was told.
    assert second.error.startswith("teacher skipped for 0.") and second.error.endswith("it was failing (HTTP 503)")
    assert "dog" not in second.error
    assert second.seconds == 0 and {o.source for o in (first, second, third)} == {"student"}


@pytest.mark.parametrize("path", ["refused", "too-long"])
def test_a_request_the_teacher_refuses_fails_alone_and_starts_no_cooldown(misbehaving_teacher, path):
    """A 4xx is about the request (an input over the teacher's context): one client must not turn the fallback off for
    the rest."""
    settings = FallbackOptions(
        fallback=f"{misbehaving_teacher}/{path}", fallback_margin=0.5, fallback_model="m", fallback_cooldown_s=60
    )
    example = tasks.load_split(ESNLI, "test")[0]

    async def ask_twice() -> list[fallback.Outcome]:
        teacher = fallback.prepare(settings, ESNLI)
        return [await fallback.ask(teacher, example, STUDENT) for _ in range(2)]

    assert [o.error[:38] for o in asyncio.run(ask_twice())] == ["teacher failed: server error: HTTP 400"] * 2


def test_the_teachers_key_comes_from_the_environment_never_a_flag(misbehaving_teacher, monkeypatch):
    settings = FallbackOptions(fallback=f"{misbehaving_teacher}/wants-key", fallback_margin=0.5, fallback_model="m")
    example = tasks.load_split(ESNLI, "test")[0]

    def ask() -> fallback.Outcome:
        return asyncio.run(fallback.ask(fallback.prepare(settings, ESNLI), example, STUDENT))

    assert ask().error.startswith("teacher failed: server error: HTTP 401")
    monkeypatch.setenv("STEPWISE_TEACHER_API_KEY", "sekrit")
    assert ask().error.startswith("teacher's answer unreadable: label is not one of")  # it got in, and answered


def test_an_unreadable_answer_starts_no_cooldown(misbehaving_teacher):
    example = tasks.load_split(ESNLI, "test")[0]
    # Unreadable answers say nothing about the teacher being down: they never start a cooldown.
    unreadable = FallbackOptions(
        fallback=f"{misbehaving_teacher}/no-answer", fallback_margin=0.5, fallback_model="m", fallback_cooldown_s=60
    )

    async def ask_twice() -> list[fallback.Outcome]:
        teacher = fallback.prepare(unreadable, ESNLI)
        return [await fallback.ask(teacher, example, STUDENT) for _ in range(2)]

    assert [o.error[:28] for o in asyncio.run(ask_twice())] == ["teacher's answer unreadable:"] * 2


def test_unreadable_few_shot_data_is_refused_before_serving(trained_export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPWISE_DATASETS", str(tmp_path / "nowhere"))
    cascade = FallbackOptions(fallback="http://127.0.0.1:9", fallback_margin=0.5, fallback_model="m")
    with pytest.raises(
        ValueError,
        match="few-shot prompt from the train split of task 'esnli', which cannot be read here: dataset file missing",
    ):
        app.build_app(ServeArgs(models={"esnli": str(trained_export_dir)}, fallback=cascade))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"fallback": "127.0.0.1:8000", "fallback_model": "m"}, "must be an http"),
        ({"fallback": "http://127.0.0.1:8000"}, "needs --fallback-model"),
        ({"fallback_margin": 1.5}, r"in \[0, 1\]"),
        ({"fallback_timeout_s": 0}, "must be positive"),
        ({"fallback_concurrency": 0}, "at least 1"),
        ({"fallback_cooldown_s": -1}, "at least 0"),
        ({"fallback_signal": "votes"}, "is one of margin, consistency, both"),
        ({"fallback_signal": "consistency", "fallback_margin": 0.2}, "takes no margin"),
        ({"fallback": "http://t", "fallback_model": "m", "fallback_signal": "both"}, "give --fallback-margin"),
    ],
)
def test_bad_fallback_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        FallbackOptions(**fields)


def test_the_consistency_signal_is_refused_for_an_export_not_trained_step_by_step(trained_export_dir):
    settings = FallbackOptions(fallback="http://127.0.0.1:9", fallback_model="m", fallback_signal="consistency")
    with pytest.raises(ValueError, match="'esnli': .* was not trained step-by-step \\(mode: standard-finetune\\)"):
        app.build_app(ServeArgs(models={"esnli": str(trained_export_dir)}, scaling=SMALL, fallback=settings))


def test_the_fallback_budget_bounds_every_attempt_and_backoff():
    assert FallbackOptions().budget_s == 0.0  # no teacher, no wait
    # 2 attempts of 2 s, one backoff of at most 1.5 x 0.5 s, a second of slack
    assert FallbackOptions(
        fallback="http://t", fallback_model="m", fallback_timeout_s=2, fallback_retries=1
    ).budget_s == pytest.approx(5.75)


# ---------------------------------------------------------------- the served cascade (Ray Serve, a real vLLM teacher)


@pytest.fixture(scope="module")
def offline(trained_export_dir) -> SimpleNamespace:
    """The student's own answers to 12 e-SNLI test inputs, one at a time (as single requests are decoded), and a
    margin threshold that sends 4 to 8 of them to the teacher (at the widest gap, clear of float noise)."""
    runtime = load_runtime(trained_export_dir, threads=1)
    examples = tasks.load_split(ESNLI, "test")[:12]
    predictions = [predict(runtime, [example])[0] for example in examples]
    margins = sorted(p.margin for p in predictions)
    below = max(range(4, 9), key=lambda k: margins[k] - margins[k - 1])
    assert margins[below] - margins[below - 1] > 1e-3, margins
    return SimpleNamespace(
        examples=examples,
        predictions=predictions,
        threshold=(margins[below - 1] + margins[below]) / 2,
        sent=below,
        rationales=[p.rationale for p in predict(runtime, examples, explain=True)],
    )


@pytest.fixture(scope="module")
def silent_teacher() -> str:
    """A server that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


DEAD = FallbackOptions(
    fallback=f"http://127.0.0.1:{free_port()}",
    fallback_margin=1.0,
    fallback_model="tiny",
    fallback_timeout_s=2,
    fallback_retries=1,
)


@pytest.fixture(scope="module")
def served(trained_export_dir, teacher_url, silent_teacher, offline, tmp_path_factory) -> SimpleNamespace:
    from ray import serve

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    run = tmp_path_factory.mktemp("serve-cascade")
    metrics_port = free_port()
    models = {"esnli": str(trained_export_dir)}
    teacher = FallbackOptions(
        fallback=teacher_url,
        fallback_margin=offline.threshold,
        fallback_model="tiny",
        fallback_max_tokens=TEACHER_TOKENS,
        fallback_timeout_s=120,
        fallback_retries=0,
    )
    url = lifecycle.start(
        ServeArgs(models=models, scaling=SMALL, fallback=teacher),
        port=free_port(),
        run_dir=run,
        metrics_port=metrics_port,
    )
    serve.run(app.build_app(ServeArgs(models=models, scaling=SMALL, fallback=DEAD)), name="dead", route_prefix="/dead")
    silent = FallbackOptions(
        fallback=silent_teacher,
        fallback_margin=1.0,
        fallback_model="tiny",
        fallback_timeout_s=1,
        fallback_retries=1,
        fallback_concurrency=1,
        fallback_cooldown_s=0,
    )
    serve.run(
        app.build_app(ServeArgs(models=models, scaling=SMALL, fallback=silent)), name="silent", route_prefix="/silent"
    )
    logged = dataclasses.replace(teacher, fallback_margin=1.0, fallback_log=str(run / "fallback-log"))
    serve.run(
        app.build_app(ServeArgs(models=models, scaling=SMALL, fallback=logged)), name="logged", route_prefix="/logged"
    )
    yield SimpleNamespace(
        url=url, metrics=f"http://127.0.0.1:{metrics_port}/metrics", silent=silent, log=run / "fallback-log"
    )
    lifecycle.stop()


def teacher_says(teacher_url: str, example: tasks.Example) -> tasks.Parsed:
    """The teacher's greedy answer to `example`, asked directly: the task's few-shot prompt, constrained to its answer
    form."""
    prompt = tasks.few_shot_prompt(ESNLI, tasks.exemplars(ESNLI, tasks.load_split(ESNLI, "train")), example)
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": TEACHER_TOKENS,
        "temperature": 0,
        "stop": tasks.stop_strings(ESNLI),
        "structured_outputs": {"regex": answer_regex(ESNLI, example)},
    }
    completion = httpx.post(f"{teacher_url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    return tasks.parse_completion(ESNLI, completion)


@pytest.mark.slow
def test_unsure_predictions_are_answered_by_the_teacher(served, offline, teacher_url):
    sent = 0
    for example, student in zip(offline.examples, offline.predictions, strict=True):
        body = httpx.post(f"{served.url}/v1/predict", json={"inputs": premise_hypothesis(example)}, timeout=180).json()
        [answer] = body["predictions"]
        # The student's scores stay: they are why it asked (or not).
        assert answer["margin"] == pytest.approx(student.margin, abs=1e-5)
        if student.margin >= offline.threshold:
            assert answer == {
                "label": student.label,
                "probability": pytest.approx(student.probability, abs=1e-5),
                "margin": answer["margin"],
                "log_prob": pytest.approx(student.log_prob, abs=1e-4),
                "source": "student",
            }
            continue
        sent += 1
        assert answer["source"] == "teacher" and "fallback_error" not in answer, answer
        # The random teacher's answer is readable only thanks to the structured output; it is the one the teacher
        # gives the task's few-shot prompt (asked directly, greedy), parsed, with its rationale.
        direct = teacher_says(teacher_url, example)
        assert direct.status == "ok", direct.reason
        assert answer["label"] == direct.label and answer["label"] in tasks.NLI_LABELS
        assert answer["rationale"] == direct.rationale and answer["rationale"].strip()
        assert answer["probability"] == pytest.approx(student.scores[direct.label], abs=1e-5)
    assert sent == offline.sent


@pytest.mark.slow
def test_a_list_with_explain_and_scores_mixes_both_sources(served, offline):
    inputs = [premise_hypothesis(e) for e in offline.examples]
    body = httpx.post(
        f"{served.url}/v1/predict", json={"inputs": inputs, "explain": True, "scores": True}, timeout=300
    ).json()
    sources = [p["source"] for p in body["predictions"]]
    assert sources == ["teacher" if p.margin < offline.threshold else "student" for p in offline.predictions]
    for answer, student, rationale in zip(body["predictions"], offline.predictions, offline.rationales, strict=True):
        assert answer["scores"] == pytest.approx(student.scores, abs=1e-5)
        assert answer["probability"] == pytest.approx(student.scores[answer["label"]], abs=1e-5)
        if answer["source"] == "student":
            assert answer["label"] == student.label and answer["rationale"] == rationale
        else:  # the teacher's rationale replaces the student's
            assert (
                answer["label"] in tasks.NLI_LABELS and answer["rationale"].strip() and answer["rationale"] != rationale
            )


@pytest.mark.slow
def test_a_dead_teacher_leaves_the_students_answers_flowing(served, offline):
    examples = offline.examples

    async def burst() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(
                    client.post("/dead/v1/predict", json={"inputs": [e.input, examples[-1 - i].input]})
                    for i, e in enumerate(examples)
                )
            )
            return responses, time.perf_counter() - started

    responses, seconds = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(examples), [
        r.text for r in responses if r.status_code != 200
    ]
    errors = []
    for i, response in enumerate(responses):
        for answer, student in zip(
            response.json()["predictions"], [offline.predictions[i], offline.predictions[-1 - i]], strict=True
        ):
            assert answer["source"] == "student" and answer["label"] == student.label
            errors.append(answer["fallback_error"])
    # The first ones in flight (8 at a time) fail: refused connections, a retry after a backoff of at most 0.75 s; the
    # rest find the teacher cooling down and are answered at once.
    tried = [e for e in errors if e.startswith("teacher failed: server error after 1 retries: ConnectError")]
    skipped = [e for e in errors if e.startswith("teacher skipped for ") and e.endswith("(ConnectError)")]
    assert tried and skipped and len(tried) + len(skipped) == 24, errors
    assert seconds < DEAD.budget_s + 5, seconds
    started = time.perf_counter()
    [answer] = httpx.post(f"{served.url}/dead/v1/predict", json={"inputs": examples[0].input}, timeout=60).json()[
        "predictions"
    ]
    assert answer["fallback_error"].startswith("teacher skipped for ") and time.perf_counter() - started < 0.5


@pytest.mark.slow
def test_a_silent_teacher_costs_at_most_the_fallback_budget(served, offline):
    # One teacher request in flight at a time (fallback_concurrency 1): the first times out twice (1 s each, one
    # retry); the others wait for the slot and run out of budget. Every answer is still the student's.
    started = time.perf_counter()
    response = httpx.post(
        f"{served.url}/silent/v1/predict", json={"inputs": [e.input for e in offline.examples[:3]]}, timeout=60
    )
    seconds = time.perf_counter() - started
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [a["label"] for a in answers] == [p.label for p in offline.predictions[:3]] and {
        a["source"] for a in answers
    } == {"student"}
    errors = sorted(a["fallback_error"] for a in answers)
    assert errors[0].startswith("teacher failed: no answer within 3.8 s"), errors
    assert any(e.startswith("teacher failed: server error after 1 retries: ReadTimeout") for e in errors), errors
    assert seconds < served.silent.budget_s + 3, seconds


@pytest.mark.slow
def test_metrics_count_fallbacks_by_source(served, offline):
    teacher = wait_for_metric(
        served.metrics, "ray_stepwise_fallbacks_total", model="esnli", source="teacher", application="stepwise"
    )
    student = wait_for_metric(
        served.metrics, "ray_stepwise_fallbacks_total", model="esnli", source="student", application="dead"
    )
    assert sum(v for _, v in teacher) == 2 * offline.sent  # single requests, then the list
    assert sum(v for _, v in student) == 25
    text = httpx.get(served.metrics, timeout=10).text
    assert not metric_samples(
        text, "ray_stepwise_fallbacks_total", application="stepwise", source="student"
    )  # the real teacher always answered
    latency = metric_samples(text, "ray_stepwise_fallback_latency_ms_count", model="esnli", application="dead")
    assert sum(v for _, v in latency) == 25


NEW_INPUTS = [
    {"premise": f"A {animal} sleeps on a mat.", "hypothesis": "An animal rests."} for animal in ("cat", "dog")
]


@pytest.fixture(scope="module")
def fallback_log(served, offline) -> SimpleNamespace:
    """The fallback log of the app with --fallback-log (margin 1: every prediction asks the teacher) after it answered
    two new inputs, one of them twice, and two test inputs, and then stopped (its replica's shutdown writes the
    shard)."""
    from ray import serve

    asked = [
        *NEW_INPUTS,
        NEW_INPUTS[0],
        premise_hypothesis(offline.examples[0]),
        premise_hypothesis(offline.examples[1]),
    ]
    sources = []
    for item in asked:
        answer = httpx.post(f"{served.url}/logged/v1/predict", json={"inputs": item}, timeout=180).json()
        sources.append(answer["predictions"][0]["source"])
    rows = wait_for_metric(served.metrics, "ray_stepwise_fallback_log_rows_total", total=len(asked), model="esnli",
                           application="logged")  # fmt: skip
    serve.delete("logged")
    return SimpleNamespace(folder=served.log / "esnli", asked=asked, sources=sources, rows=rows)


@pytest.mark.slow
def test_the_teachers_answers_are_kept_as_training_rows(fallback_log):
    """Every teacher answer is a record in the extraction format once its replica stops; training takes the new
    inputs once each and none of the test inputs."""
    assert fallback_log.sources == ["teacher"] * len(fallback_log.asked)
    assert sum(v for _, v in fallback_log.rows) == len(fallback_log.asked)
    folder = fallback_log.folder
    assert tasks.load_task(folder).name == "esnli" and not list(folder.glob(".*"))  # no half-written file left
    records = records_by_source([folder])
    assert len(records) == 4 and all(r["status"] == "ok" and r["teacher_label"] in tasks.NLI_LABELS
                                      for r in records.values())  # fmt: skip
    kept = {"id", "input", "label", "choices", "rationale", "teacher_label", "status", "reason", "fingerprint",
            "student_label", "student_margin", "signal", "model", "version", "time", "source"}  # fmt: skip
    assert all(set(r) == kept for r in records.values())  # nothing else of the request
    examples, counts = training_examples(ESNLI, records, needs_teacher_label=True, needs_rationale=True,
                                         fraction=1.0, seed=0)  # fmt: skip
    assert counts["other_inputs"] == 2 and counts["skipped_held_out_input"] == 2
    assert sorted(e.input for e in examples) == sorted(tasks.format_input(ESNLI, item) for item in NEW_INPUTS)


@pytest.mark.slow
def test_one_turn_of_the_flywheel_serves_a_student_retrained_on_the_log(
    served, fallback_log, trained_export_dir, tmp_path
):
    """The whole loop: the served teacher's answers (the log above) and an extraction run train a new step-by-step
    student on the teacher's labels (a served input has no gold label); it is exported, parity-gated, and served
    beside the old one, answering the inputs it learnt from."""
    from ray import serve

    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.extraction.run import main as extract
    from stepwise.training import train

    extracted = extract(task="esnli", out=tmp_path / "extract", teacher="replay")
    student = train.main(
        task="esnli",
        out=tmp_path / "after",
        rationales=[str(extracted), str(fallback_log.folder)],
        mode="step-by-step",
        data_fraction=0.02,
        vocab_size=1000,
        data=train.DataOptions(label_source="teacher", max_input_tokens=96, max_target_tokens=48),
        optim=train.OptimOptions(learning_rate=1e-3, batch_size=16, max_steps=10),
        evaluation=train.EvalOptions(eval_every=10, eval_limit=16),
    )
    metrics = artifacts.read_metrics(student)
    assert metrics["label_source"] == "teacher"
    assert metrics["train_examples"]["other_inputs"] == 2 and metrics["train_examples"]["skipped_held_out_input"] == 2
    assert json.loads((student / "train_config.json").read_text())["rationales"] == [
        str(extracted), str(fallback_log.folder.resolve())
    ]  # fmt: skip
    after = export_main(model=student, out=tmp_path / "export", parity=ParityOptions(parity_limit=8))
    serve.run(
        app.build_app(ServeArgs(models={"esnli": str(after)}, scaling=SMALL)), name="after", route_prefix="/after"
    )
    try:
        [before] = httpx.get(f"{served.url}/v1/models", timeout=30).json()
        answer = httpx.post(f"{served.url}/after/v1/predict", json={"inputs": NEW_INPUTS}, timeout=60).json()
        assert answer["version"] == load_runtime(after, threads=1).version != before["version"]
        assert [p["source"] for p in answer["predictions"]] == ["student"] * 2
        assert {p["label"] for p in answer["predictions"]} <= set(tasks.NLI_LABELS)
    finally:
        serve.delete("after")


@pytest.mark.slow
def test_the_consistency_signal_sends_the_predictions_whose_rationale_disagrees(
    served, step_by_step_export_dir, teacher_url, tmp_path
):
    """A step-by-step student served with --fallback-signal consistency: the inputs whose rationale reaches another
    label than the student's go to the teacher, marked with the signal in the response, the metric and the fallback
    log; those that agree keep the student's answer; the rationale checked is not returned."""
    from ray import serve

    runtime = load_runtime(step_by_step_export_dir, threads=1)
    examples = tasks.load_split(ESNLI, "test")[:12]
    students = predict(runtime, examples)
    reached = rationale_labels(runtime, examples, students)
    disagree = [label != p.label for label, p in zip(reached, students, strict=True)]
    assert 0 < sum(disagree) < len(examples), disagree
    settings = FallbackOptions(
        fallback=teacher_url,
        fallback_signal="consistency",
        fallback_model="tiny",
        fallback_max_tokens=TEACHER_TOKENS,
        fallback_timeout_s=120,
        fallback_retries=0,
        fallback_log=str(tmp_path),
    )
    models = {"esnli": str(step_by_step_export_dir)}
    serve.run(app.build_app(ServeArgs(models=models, scaling=SMALL, fallback=settings)), name="consistency",
              route_prefix="/consistency")  # fmt: skip
    try:
        inputs = [premise_hypothesis(e) for e in examples]
        body = httpx.post(f"{served.url}/consistency/v1/predict", json={"inputs": inputs}, timeout=300).json()
        sent = wait_for_metric(served.metrics, "ray_stepwise_fallbacks_total", total=sum(disagree), model="esnli",
                               application="consistency", signal="consistency")  # fmt: skip
    finally:
        serve.delete("consistency")  # its replica's shutdown writes the fallback log's shard
    for answer, student, disagrees in zip(body["predictions"], students, disagree, strict=True):
        assert answer["margin"] == pytest.approx(student.margin, abs=1e-5)
        if disagrees:
            assert answer["source"] == "teacher" and answer["fallback_signal"] == "consistency", answer
            assert answer["rationale"].strip()  # the teacher's
        else:
            assert answer["source"] == "student" and answer["label"] == student.label, answer
            assert "fallback_signal" not in answer and "rationale" not in answer
    assert sum(v for _, v in sent) == sum(disagree)
    records = records_by_source([tmp_path / "esnli"])
    assert len(records) == sum(disagree) and {r["signal"] for r in records.values()} == {"consistency"}
