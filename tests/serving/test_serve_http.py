"""The real Serve app on 127.0.0.1, used over HTTP: one Ray + Serve instance for the module, running three
applications of the tiny exported student: the normal one (two model ids of one export, and a third whose decoder
graph cannot decode), one with tight overload limits, one with a request timeout too short for any request."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from stepwise import artifacts, tasks
from stepwise.export.runtime import load_runtime, predict
from stepwise.serving import app, lifecycle, schema
from stepwise.serving.settings import BatchingOptions, LimitOptions, OverloadOptions, ScalingOptions, ServeArgs

from helpers import free_port
from serving_helpers import metric_samples, premise_hypothesis, wait_for_metric

pytestmark = pytest.mark.slow


LIMITS = LimitOptions(max_items=8, max_input_chars=600, max_body_bytes=100_000)
SMALL = ScalingOptions(replica_cpus=0.25)


@pytest.fixture(scope="module")
def claims_export(custom_nli_rows, tmp_path_factory) -> Path:
    """A user's own task: evidence/claim fields joined by a template, a declared label set; a tiny student, exported."""
    from stepwise.export.run import ParityOptions
    from stepwise.export.run import main as export_main
    from stepwise.training.tiny import build_student_folder

    folder = tmp_path_factory.mktemp("claims")
    rows = [
        {"id": r["id"], "evidence": r["premise"], "claim": r["hypothesis"], "label": r["label"], "split": r["split"]}
        for r in custom_nli_rows
    ]
    (folder / "claims.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "claims.task.json").write_text(
        json.dumps({"labels": tasks.NLI_LABELS, "input_template": "Evidence: {evidence}\nClaim: {claim}"})
    )
    student = build_student_folder(folder / "student", "tiny", str(folder / "claims.jsonl"), vocab_size=500)
    return export_main(model=student, out=folder / "export", parity=ParityOptions(parity_limit=8))


@pytest.fixture(scope="module")
def served(tiny_export_dir: Path, claims_export: Path, cqa_export_dir: Path, tmp_path_factory) -> SimpleNamespace:
    from ray import serve

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    run = tmp_path_factory.mktemp("serve")
    broken = Path(shutil.copytree(tiny_export_dir, run / "broken-export"))
    files = artifacts.read_export_config(broken)["files"]  # it loads (its parity report passed), but cannot decode
    shutil.copyfile(broken / files["encoder"], broken / files["decoder"])
    metrics_port = free_port()
    models = {
        "esnli": str(tiny_export_dir),
        "esnli-b": str(tiny_export_dir),
        "broken": str(broken),
        "claims": str(claims_export),
        "cqa": str(cqa_export_dir),
    }
    args = ServeArgs(
        models=models,
        batching=BatchingOptions(max_batch_size=8, batch_wait_timeout_s=0.02),
        limits=LIMITS,
        scaling=SMALL,
    )
    url = lifecycle.start(args, port=free_port(), run_dir=run, metrics_port=metrics_port)
    one_model = {"esnli": str(tiny_export_dir)}
    tight = ServeArgs(
        models=one_model,
        batching=BatchingOptions(max_batch_size=1, max_ongoing_requests=1),
        overload=OverloadOptions(max_queued_requests=1, retry_after_s=2),
        scaling=SMALL,
    )
    serve.run(app.build_app(tight), name="tight", route_prefix="/tight")
    serve.run(
        app.build_app(ServeArgs(models=one_model, limits=LimitOptions(request_timeout_s=0.001), scaling=SMALL)),
        name="slow",
        route_prefix="/slow",
    )
    serve.run(
        app.build_app(ServeArgs(models=one_model, limits=LIMITS, scaling=SMALL)),
        name="contract",
        route_prefix="/contract",
    )
    yield SimpleNamespace(
        url=url,
        metrics=f"http://127.0.0.1:{metrics_port}/metrics",
        logs=run / "ray" / "session_latest" / "logs" / "serve",
    )
    lifecycle.stop()


@pytest.fixture(scope="module")
def client(served) -> httpx.Client:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def examples() -> list[tasks.Example]:
    return tasks.load_split(tasks.get_task("esnli"), "test")[:8]


def test_health_models_and_docs(client, tiny_export_dir):
    assert client.get("/healthz").json() == {
        "status": "ok",
        "models": ["esnli", "esnli-b", "broken", "claims", "cqa"],
    }
    models = {m["id"]: m for m in client.get("/v1/models").json()}
    assert set(models) == {"esnli", "esnli-b", "broken", "claims", "cqa"}
    assert models["claims"]["answer_style"] == "label" and models["claims"]["labels"] == tasks.NLI_LABELS
    assert models["esnli"]["task"] == "esnli" and models["esnli"]["labels"] == tasks.NLI_LABELS
    # Loaded before the replica took a request: the version is there before any prediction was asked for.
    assert models["esnli"]["version"] == artifacts.read_export_config(tiny_export_dir)["version"]
    assert all(m["version"] for m in models.values())
    assert "swagger" in client.get("/docs").text.lower()
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def served_as(prediction) -> dict:
    """What the API returns for an offline prediction of the student (no scores asked for, no teacher)."""
    fields = {
        "label": prediction.label,
        "probability": prediction.probability,
        "margin": prediction.margin,
        "log_prob": prediction.log_prob,
        "rationale": prediction.rationale,
        "source": "student",
    }
    return {k: pytest.approx(v, abs=1e-5) if isinstance(v, float) else v for k, v in fields.items() if v is not None}


def test_labels_and_scores_match_offline_prediction(client, tiny_export_dir, examples):
    runtime = load_runtime(tiny_export_dir, threads=1)
    for example in examples:  # one at a time: each is a batch of one, as offline
        body = client.post("/v1/predict", json={"model": "esnli", "inputs": premise_hypothesis(example)}).json()
        assert body["model"] == "esnli" and body["version"] == runtime.version
        assert body["predictions"] == [served_as(predict(runtime, [example])[0])]
    # A list with explain: one batch of all of them, rationales included, in order.
    offline = predict(runtime, examples, explain=True)
    body = client.post(
        "/v1/predict", json={"model": "esnli", "explain": True, "inputs": [e.input for e in examples]}
    ).json()
    assert body["predictions"] == [served_as(p) for p in offline]
    # Every candidate's probability on request: the three labels, summing to one, the label's the largest.
    scored = client.post("/v1/predict", json={"model": "esnli", "scores": True, "inputs": examples[0].input}).json()[
        "predictions"
    ][0]
    assert set(scored["scores"]) == set(tasks.NLI_LABELS) and sum(scored["scores"].values()) == pytest.approx(1.0)
    assert (
        scored["scores"][scored["label"]]
        == pytest.approx(scored["probability"])
        == pytest.approx(max(scored["scores"].values()))
    )
    assert {m["id"]: m for m in client.get("/v1/models").json()}["esnli"]["version"] == runtime.version


def test_a_custom_task_is_served_with_its_own_fields_and_labels(client, claims_export):
    runtime = load_runtime(claims_export, threads=1)
    inputs = [
        {"evidence": "A dog runs in the park.", "claim": "An animal is outside."},
        {"evidence": "Two men talk.", "claim": "Nobody speaks."},
    ]
    body = client.post("/v1/predict", json={"model": "claims", "inputs": inputs}).json()
    expected = predict(runtime, [tasks.Example("", tasks.format_input(runtime.task, i), "") for i in inputs])
    assert [p["label"] for p in body["predictions"]] == [p.label for p in expected]
    assert {p["label"] for p in body["predictions"]} <= set(tasks.NLI_LABELS)
    wrong_fields = client.post("/v1/predict", json={"model": "claims", "inputs": {"premise": "a", "hypothesis": "b"}})
    assert wrong_fields.status_code == 422 and "missing or empty field 'evidence'" in wrong_fields.json()["error"]


def test_server_timing_says_where_the_time_went(client, examples):
    response = client.post("/v1/predict", json={"model": "esnli", "inputs": [e.input for e in examples[:3]]})
    parts = dict(part.strip().split(";", 1) for part in response.headers["server-timing"].split(","))
    durations = {name: float(value.removeprefix("dur=")) for name, value in parts.items() if value.startswith("dur=")}
    assert set(durations) == {"queue", "runtime", "app"} and parts["batch"] == "desc=3"
    assert 0 < durations["runtime"] < durations["app"] and durations["queue"] < durations["app"]


def test_model_chosen_by_body_or_header(client, examples):
    text = examples[0].input
    assert (
        client.post("/v1/predict", json={"inputs": text}, headers={schema.MODEL_HEADER: "esnli-b"}).json()["model"]
        == "esnli-b"
    )
    assert client.post("/v1/predict", json={"inputs": text, "model": "esnli"}).json()["model"] == "esnli"
    conflict = client.post(
        "/v1/predict", json={"inputs": text, "model": "esnli"}, headers={schema.MODEL_HEADER: "esnli-b"}
    )
    assert conflict.status_code == 400 and "header" in conflict.json()["error"]
    unknown = client.post("/v1/predict", json={"inputs": text, "model": "svamp"})
    assert unknown.status_code == 404 and "'svamp' is not served" in unknown.json()["error"]
    missing = client.post("/v1/predict", json={"inputs": text})
    assert missing.status_code == 422 and "model: required" in missing.json()["error"]
    unknown_header = client.post("/v1/predict", json={"inputs": text}, headers={schema.MODEL_HEADER: "svamp"})
    assert unknown_header.status_code == 404 and "'svamp' is not served" in unknown_header.json()["error"]


def test_concurrent_requests_are_batched(served, tiny_export_dir, examples):
    runtime = load_runtime(tiny_export_dir, threads=1)
    expected = [predict(runtime, [e])[0].label for e in examples]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            # esnli-b sees only single-input requests in this module, so any batch above 1 came from concurrency.
            return await asyncio.gather(
                *(c.post("/v1/predict", json={"model": "esnli-b", "inputs": e.input}) for e in examples * 4)
            )

    responses = asyncio.run(burst())
    assert [r.json()["predictions"][0]["label"] for r in responses] == expected * 4
    # Ray exports replica metrics every second or so: poll until a batch of more than one input shows up.
    # (Ray's histogram _sum is rebuilt from bucket midpoints, so count batches by bucket.)
    for _ in range(60):
        text = httpx.get(served.metrics, timeout=10).text
        batches = sum(
            v for _, v in metric_samples(text, "ray_stepwise_batch_size_count", model="esnli-b", mode="label")
        )
        singles = sum(
            v
            for _, v in metric_samples(text, "ray_stepwise_batch_size_bucket", model="esnli-b", mode="label", le="1.0")
        )
        if batches > singles:
            break
        asyncio.run(asyncio.sleep(0.5))
    assert batches > singles, f"{batches:.0f} batches, all of one input: no batching happened"
    assert batches < len(responses)


def test_concurrent_choice_requests_under_load_answer_as_offline(served, cqa_export_dir):
    """Every choice is measured by the fast tokenizer the runtime thread encodes batches with; it is not
    thread-safe ("Already borrowed", or another call's padding), so both run on that one thread."""
    examples = tasks.load_split(tasks.get_task("cqa"), "test")[:24]
    runtime = load_runtime(cqa_export_dir, threads=1)
    expected = [p.label for p in predict(runtime, examples)]

    def item(example: tasks.Example) -> dict:
        question = example.input.split("\nAnswer Choices:")[0]
        assert tasks.cqa_input(question, example.choices) == example.input
        return {"question": question, "choices": example.choices}

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            pairs = [examples[i : i + 2] for i in range(0, len(examples), 2)]
            return await asyncio.gather(
                *(c.post("/v1/predict", json={"model": "cqa", "inputs": [item(e) for e in pair]}) for pair in pairs * 4)
            )

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses if r.is_error]
    labels = [p["label"] for r in responses for p in r.json()["predictions"]]
    assert labels == expected * 4


BAD_INPUTS = [
    ("not JSON", b'{"inputs": "a",', 400, "malformed JSON"),
    ("no body", b"", 422, "no body"),
    ("JSON but not an object", b"[1, 2]", 422, "expected a JSON object"),
    ("missing inputs", {"model": "esnli"}, 422, "inputs: required field missing"),
    (
        "inputs of the wrong type",
        {"model": "esnli", "inputs": 5},
        422,
        "inputs: expected a string, an object or a list of them, got int",
    ),
    (
        "a field of the wrong type",
        {"model": "esnli", "inputs": [{"premise": 1, "hypothesis": "b"}]},
        422,
        "inputs.0.premise: Input should be a valid string",
    ),
    (
        "explain not a boolean",
        {"model": "esnli", "inputs": "a", "explain": "yes"},
        422,
        "explain: Input should be a valid boolean",
    ),
    ("unknown field", {"model": "esnli", "inputs": "a", "temperature": 0.7}, 422, "temperature: unknown field"),
    ("empty list", {"model": "esnli", "inputs": []}, 422, "inputs: empty list"),
    ("empty string", {"model": "esnli", "inputs": "   "}, 422, "inputs: empty input"),
    ("empty object", {"model": "esnli", "inputs": {}}, 422, "inputs.premise: required field missing"),
    (
        "premise without hypothesis",
        {"model": "esnli", "inputs": [{"premise": "a"}]},
        422,
        "inputs.0.hypothesis: required field missing",
    ),
    (
        "choices for a fixed label set",
        {"model": "esnli", "inputs": {"question": "q", "choices": ["a", "b"]}},
        422,
        "inputs.choices: this model's labels are fixed (esnli: entailment, neutral, contradiction); drop 'choices'",
    ),
    (
        "choices beside an input",
        {"model": "esnli", "inputs": {"input": "q", "choices": ["a"]}},
        422,
        "inputs.choices: this model's labels are fixed",
    ),
    ("a lone surrogate", b'{"model": "esnli", "inputs": "ok \\ud800"}', 422, "inputs: not valid Unicode text"),
    ("an unknown model", {"model": "svamp", "inputs": "a"}, 404, "model 'svamp' is not served"),
    ("oversized input", {"model": "esnli", "inputs": "x" * 601}, 413, "601 characters, more than max_input_chars=600"),
    (
        "oversized field",
        {"model": "esnli", "inputs": [{"premise": "x" * 700, "hypothesis": "b"}]},
        413,
        "inputs.0.premise: 700 characters",
    ),
    ("too many items", {"model": "esnli", "inputs": ["a"] * 9}, 413, "9 items, more than max_items=8"),
]


@pytest.mark.parametrize("body,status,message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_4xx_naming_the_problem(client, body, status, message):
    if isinstance(body, bytes):
        response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/predict", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_a_bad_input_fails_only_its_own_request(served, examples):
    """As seen: a lone surrogate sent among 15 concurrent good requests made most of them fail with 500."""
    bad = b'{"model": "esnli", "inputs": "ok \\ud800"}'

    async def round_of_16() -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            good = [c.post("/v1/predict", json={"model": "esnli", "inputs": e.input}) for e in examples * 2][:15]
            responses = await asyncio.gather(
                *good, c.post("/v1/predict", content=bad, headers={"content-type": "application/json"})
            )
        return [r.status_code for r in responses[:15]], responses[15].status_code

    for _ in range(10):
        good, offender = asyncio.run(round_of_16())
        assert good == [200] * 15 and offender == 422


def test_a_model_that_fails_to_decode_gets_a_500_and_others_keep_answering(served, client, examples):
    response = client.post("/v1/predict", json={"model": "broken", "inputs": examples[0].input})
    # The exception text stays in the log; the client gets only that something failed, and for which input.
    assert response.status_code == 500 and response.json()["error"].startswith("decoding failed for ")
    assert "the server's log has the details" in response.json()["error"]
    assert "decoding failed for" in "".join(p.read_text() for p in served.logs.glob("replica_*.log"))
    assert client.post("/v1/predict", json={"model": "esnli", "inputs": examples[0].input}).status_code == 200


@pytest.mark.parametrize("damage", ["parity report failed", "encoder missing"])
def test_a_replica_checks_and_loads_every_model_before_it_takes_requests(served, tiny_export_dir, tmp_path, damage):
    """The folder changes after the app was built (its checks passed): the replica's own load refuses it, so the
    application never starts serving it."""
    from ray import serve

    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "export"))
    application = app.build_app(ServeArgs(models={"late": str(folder)}, scaling=SMALL))
    if damage == "parity report failed":
        report = artifacts.read_json(folder / artifacts.PARITY, "the parity report")
        artifacts.write_json(folder / artifacts.PARITY, report | {"passed": False, "failures": ["tampered"]})
    else:
        (folder / artifacts.read_export_config(folder)["files"]["encoder"]).unlink()
    try:
        with pytest.raises(RuntimeError, match="Deploying application late failed"):
            serve.run(application, name="late", route_prefix="/late")
        why = serve.status().applications["late"].deployments["student"].message  # the replica's own error
        assert ("failed its parity gate (tampered)" if damage == "parity report failed" else "is missing") in why
    finally:
        serve.delete("late")


def test_body_over_the_cap_is_refused_before_it_is_parsed(served):
    huge = b'{"inputs": "' + b"x" * 20_000_000 + b'"}'
    response = httpx.post(
        f"{served.url}/v1/predict", content=huge, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 413 and "max_body_bytes=100000" in response.json()["error"]

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"inputs": "'
        for _ in range(200):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(
        f"{served.url}/v1/predict", content=chunks(), headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]


def test_the_openapi_contract_is_the_servers(served, tmp_path):
    """schemathesis (an outside fuzzer) against /openapi.json: every generated request, valid or not, gets a
    documented status and body; schema-valid ones are accepted, schema-invalid ones refused."""
    config = Path(__file__).with_name("schemathesis.toml")
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(config),
            "run",
            f"{served.url}/contract/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "100",
            "--seed",
            "1",
            "--request-timeout",
            "60",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert "No issues found" in done.stdout and " 0 generated" not in done.stdout


def test_wrong_method_and_path(client):
    assert client.get("/v1/predict").status_code == 405
    assert client.get("/v2/predict").json() == {"error": "Not Found"}


def test_overload_gets_503_with_retry_after_then_recovers(served, examples):
    # One request at a time and one queued: a burst of slow (explain) requests must be shed, not queued forever.
    body = {"explain": True, "inputs": [e.input for e in examples[:4]]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/tight/v1/predict", json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "2"
    assert "backpressure" in rejected.text
    assert httpx.post(f"{served.url}/tight/v1/predict", json=body, timeout=60).status_code == 200


def test_request_timeout_gets_504(served, examples):
    response = httpx.post(
        f"{served.url}/slow/v1/predict", json={"explain": True, "inputs": [e.input for e in examples]}, timeout=60
    )
    assert response.status_code == 504
    assert "request_timeout_s=0.001" in response.json()["error"]
    assert httpx.get(f"{served.url}/slow/healthz", timeout=10).status_code == 200


def test_logs_are_json(served, client):
    lines = [
        line for path in served.logs.glob("replica_*.log") for line in path.read_text().splitlines() if line.strip()
    ]
    records = [json.loads(line) for line in lines]
    loads = [r for r in records if r.get("message", "").startswith("loaded model")]
    assert loads and all({"deployment", "replica", "levelname"} <= set(r) for r in loads)


def test_request_metrics_by_route_and_status(served):
    assert wait_for_metric(served.metrics, "ray_stepwise_requests_total", route="/v1/predict", status="200")
    assert wait_for_metric(served.metrics, "ray_stepwise_requests_total", route="/v1/predict", status="422")
    assert wait_for_metric(served.metrics, "ray_stepwise_requests_total", route="/v1/predict", status="413")
    assert wait_for_metric(
        served.metrics, "ray_stepwise_requests_total", route="/v1/predict", status="500"
    )  # the broken model
    assert wait_for_metric(served.metrics, "ray_stepwise_request_latency_ms_count", route="/v1/predict")
    # Unknown paths (test_wrong_method_and_path) count as "other", so scanners cannot blow up the label set.
    assert wait_for_metric(served.metrics, "ray_stepwise_requests_total", route="other", status="404")
    assert not [
        labels
        for labels, _ in metric_samples(httpx.get(served.metrics, timeout=10).text, "ray_stepwise_requests_total")
        if labels["route"] == "/v2/predict"
    ]
