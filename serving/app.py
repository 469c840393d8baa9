"""The served app: exported students on Ray Serve, label-only by default, dynamically batched.

One deployment (`StudentServer`) is both the HTTP ingress and the model host: each replica loads the ONNX Runtime
sessions (`stepwise.export.runtime`) of every student it was asked for before it takes a request, reports them to
Serve's multiplexed routing, and decodes concurrent requests for the same model together with @serve.batch.
One deployment rather than an ingress in front of a model deployment saves a hop per request.

    serve run serving/serve_config.yaml      # import path stepwise.serving.app:build_app

Requests: POST /v1/predict {"inputs": <input or list of inputs>, "model": id, "explain": false} (the schema
is `serving/schema.py`); GET /v1/models, /healthz, /docs, /openapi.json.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' types from the runtime annotations.
import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, NamedTuple

from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.metrics import Counter, Histogram
from ray.serve.schema import LoggingConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepwise import artifacts, request_limits, storage, tasks
from stepwise.export.runtime import Prediction, Runtime, load_runtime, predict, rationale_labels
from stepwise.serving import fallback, schema
from stepwise.serving.fallback_log import FallbackLog, served_record
from stepwise.serving.settings import ServeArgs

# Serve's multiplexing would drop the least recently used model beyond its limit and load it again inside the next
# request for it: outside the request timeout, holding the runtime thread. The served set is fixed by the config, so
# a replica keeps all of it (-1: no limit) and nothing ever loads on the request path.
MODELS_PER_REPLICA = -1
logger = logging.getLogger("ray.serve")


class DecodeJob(NamedTuple):
    model_id: str
    runtime: Runtime
    example: tasks.Example
    explain: bool
    queued_at: float  # time.perf_counter() when the job entered the batch queue


class Decoded(NamedTuple):
    """One job's outcome and where its time went: waiting in the batch queue, then in its group's runtime call."""

    prediction: Prediction | Exception
    queue_s: float
    runtime_s: float
    batch_size: int


# ---------------------------------------------------------------- metrics and body limit (plain ASGI middleware)


@functools.cache
def dropped_counter(model_id: str) -> Callable[[str], None]:
    """What a fallback log calls when it loses a row: the replica's counter, by reason."""
    return lambda reason: replica_metrics()["fallback_log_dropped"].inc(tags={"model": model_id, "reason": reason})


def replica_metrics() -> dict[str, Any]:
    """Created once per replica process; Ray exports them on its metrics port (prefixed `ray_`)."""
    return {
        "requests": Counter("stepwise_requests", "HTTP requests by route and status", tag_keys=("route", "status")),
        "latency": Histogram(
            "stepwise_request_latency_ms",
            "request latency inside the replica",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
            tag_keys=("route",),
        ),
        "batch_size": Histogram(
            "stepwise_batch_size",
            "inputs decoded together",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("model", "mode"),
        ),
        "fallbacks": Counter(
            "stepwise_fallbacks",
            "predictions sent to the teacher, by who answered and what sent them (--fallback-signal)",
            tag_keys=("model", "source", "signal"),
        ),
        "predictions": Counter(
            "stepwise_predictions",
            "predictions answered, by who answered (the teacher's share is the served share of fallbacks)",
            tag_keys=("model", "source"),
        ),
        "fallback_log_rows": Counter(
            "stepwise_fallback_log_rows", "teacher answers kept as training rows (--fallback-log)", tag_keys=("model",)
        ),
        "fallback_log_dropped": Counter(
            "stepwise_fallback_log_dropped",
            "teacher answers the fallback log lost (a full queue or disk, a write error)",
            tag_keys=("model", "reason"),
        ),
        "fallback_latency": Histogram(
            "stepwise_fallback_latency_ms",
            "time spent on the teacher per fallback",
            boundaries=[10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000],
            tag_keys=("model",),
        ),
    }


METRIC_ROUTES = {"/v1/predict", "/v1/models", "/healthz", "/docs", "/openapi.json"}


class RequestMetrics:
    """Counts every response by route and status, 5xx included (an exception counts as the 500 it becomes), and
    adds the app's time to the Server-Timing header."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Server-Timing: the app's whole share of the request, beside the endpoint's own parts.
                app_ms = f"app;dur={1000 * (time.perf_counter() - started):.2f}".encode()
                headers = [
                    (k, v + b", " + app_ms if k == b"server-timing" else v) for k, v in message.get("headers", [])
                ]
                if not any(k == b"server-timing" for k, _ in headers):
                    headers.append((b"server-timing", app_ms))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The app's own paths only (under any route prefix), so scanners cannot blow up the label set.
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            route = path if path in METRIC_ROUTES else "other"
            metrics = replica_metrics()
            metrics["requests"].inc(tags={"route": route, "status": str(status)})
            metrics["latency"].observe((time.perf_counter() - started) * 1000, tags={"route": route})


class BodyTooLarge(StarletteHTTPException):
    """Raised while a chunked body streams in; an HTTP error, so that FastAPI's body reading passes it on."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"body: more than max_body_bytes={max_bytes} bytes")


class BodyLimit:
    """413 for a body over `max_bytes`, decided from Content-Length (or, chunked, while it streams in)
    before any JSON is parsed."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.refuse(send)
        received, started = 0, False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        async def noted_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, noted_send)
        except BodyTooLarge:
            if not started:
                await self.refuse(send)

    async def refuse(self, send: Any) -> None:
        body = json.dumps({"error": BodyTooLarge(self.max_bytes).detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- decoding a batch


async def decode_jobs(
    jobs: list[DecodeJob], run: Callable[[Runtime, list[tasks.Example], bool], Awaitable[list[Prediction]]]
) -> list[Decoded]:
    """One batch from all concurrent requests; each (model, explain) group is one `run` (predict) call. If a
    group fails, its rows are decoded one by one, so only an input that fails fails (its own request)."""
    groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[(job.model_id, job.explain)].append(i)
    results: list[Decoded] = [None] * len(jobs)  # type: ignore[list-item]
    for (model_id, explain), rows in groups.items():
        runtime, started = jobs[rows[0]].runtime, time.perf_counter()
        try:
            predictions: list[Prediction | Exception] = await run(runtime, [jobs[i].example for i in rows], explain)
        except Exception:
            predictions = [await decode_alone(run, runtime, jobs[i].example, explain) for i in rows]
        runtime_s = time.perf_counter() - started
        replica_metrics()["batch_size"].observe(
            len(rows), tags={"model": model_id, "mode": "explain" if explain else "label"}
        )
        for i, prediction in zip(rows, predictions, strict=True):
            results[i] = Decoded(prediction, started - jobs[i].queued_at, runtime_s, len(rows))
    return results


async def decode_alone(
    run: Callable[..., Awaitable[list[Prediction]]], runtime: Runtime, example: tasks.Example, explain: bool
) -> Prediction | Exception:
    try:
        return (await run(runtime, [example], explain))[0]
    except Exception as problem:
        logger.warning(f"decoding failed for {example.id}: {type(problem).__name__}: {problem}")
        return problem


# ---------------------------------------------------------------- the deployment


# What a 500 says instead of the exception: its text can carry server paths and internals; the log has it whole.
INTERNAL_DETAILS = "the server's log has the details"


def overlong_choice(runtime: Runtime, examples: list[tasks.Example], max_tokens: int) -> str:
    """Where the first choice longer than `max_tokens` tokens is ("" when none is): run on the runtime thread."""
    for example in examples:
        for j, choice in enumerate(example.choices or []):
            if len(runtime.tokenizer(choice).input_ids) > max_tokens:
                return f"{example.id}.choices.{j}"
    return ""


@serve.deployment(name="student")
@serve.ingress()
class StudentServer:
    async def __init__(self, args: dict[str, Any]):
        self.args = ServeArgs.from_dict(args)
        self.decode.set_max_batch_size(self.args.batching.max_batch_size)
        self.decode.set_batch_wait_timeout_s(self.args.batching.batch_wait_timeout_s)
        # One thread runs ONNX Runtime, first come first served: the fast tokenizer is not thread-safe, and the
        # replica's event loop stays free to accept (and queue for the next batch) while a batch decodes.
        self.runtime_thread = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        # Every model before the first request (Serve routes none here until __init__ returns); a model that fails
        # to load fails the replica's start, never a request.
        self.runtimes = {model_id: await self.load_model(model_id) for model_id in self.args.models}
        self.tasks = {model_id: runtime.task for model_id, runtime in self.runtimes.items()}
        # A teacher per closed-label student (open labels have no margin to send them by), its few-shot prompt read
        # now: a replica that cannot build it fails at start, never a request.
        settings = self.args.fallback
        self.thresholds = {
            model_id: fallback.threshold(settings, runtime.export_dir, model_id)
            for model_id, runtime in self.runtimes.items()
        }
        self.teachers = {
            model_id: fallback.prepare(settings, task)
            for model_id, task in self.tasks.items()
            if settings.fallback and task.closed_label_set
        }
        self.logs = {
            model_id: FallbackLog(
                Path(settings.fallback_log) / model_id, self.tasks[model_id], dropped_counter(model_id)
            )
            for model_id in self.teachers
            if settings.fallback_log
        }

    def __del__(self) -> None:
        """Serve's shutdown of this replica: the fallback logs write what they hold."""
        for log in getattr(self, "logs", {}).values():
            log.close()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def load_model(self, model_id: str) -> Runtime:
        """One model's runtime, its parity report checked again: the folder may have changed since the app was
        built, and a replica that replaces another (a restart, another node) loads it anew."""
        started = time.perf_counter()
        folder = storage.local_folder(self.args.models[model_id], f"model {model_id!r}")  # on this replica's node
        verify(model_id, folder, self.args.allow_unverified)
        runtime = await asyncio.get_running_loop().run_in_executor(
            self.runtime_thread, functools.partial(load_runtime, folder, threads=self.args.scaling.ort_threads)
        )
        logger.info(
            f"loaded model {model_id} ({runtime.model_id} {runtime.version}, {runtime.providers[0]}) "
            f"in {time.perf_counter() - started:.2f}s"
        )
        return runtime

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # set from the args in __init__
    async def decode(self, jobs: list[DecodeJob]) -> list[Decoded]:
        return await decode_jobs(jobs, self.run_predict)

    async def run_predict(self, runtime: Runtime, examples: list[tasks.Example], explain: bool) -> list[Prediction]:
        return await asyncio.get_running_loop().run_in_executor(
            self.runtime_thread, predict, runtime, examples, explain
        )

    def model_id(self, requested: str | None, header: str | None) -> str:
        if requested and header and requested != header:
            raise HTTPException(
                400, f"model {requested!r} in the body but {header!r} in the {schema.MODEL_HEADER} header"
            )
        model_id = requested or header
        if not model_id:
            if len(self.tasks) > 1:
                raise HTTPException(422, f"model: required when several models are served ({', '.join(self.tasks)})")
            model_id = next(iter(self.tasks))
        if model_id not in self.tasks:
            raise HTTPException(404, f"model {model_id!r} is not served; models: {', '.join(self.tasks)}")
        return model_id

    async def predict(self, body: Any, header_model: str | None, timing: dict[str, float]) -> schema.PredictResponse:
        """The predictions for one request; `timing` gets where its time went (queue, runtime, in seconds)."""
        model_id = self.model_id(body.model, header_model)
        task, limits = self.tasks[model_id], self.args.limits
        single = not isinstance(body.inputs, list)
        items = [body.inputs] if single else body.inputs
        examples = [
            schema.to_example(item, task, "inputs" if single else f"inputs.{i}") for i, item in enumerate(items)
        ]
        runtime = self.runtimes[model_id]
        if any(example.choices for example in examples):  # on the runtime thread: the tokenizer is not thread-safe
            overlong = await asyncio.get_running_loop().run_in_executor(
                self.runtime_thread, overlong_choice, runtime, examples, limits.max_choice_tokens
            )
            if overlong:
                raise HTTPException(413, f"{overlong}: more than max_choice_tokens={limits.max_choice_tokens} tokens")
        try:
            queued_at = time.perf_counter()
            jobs = [self.decode(DecodeJob(model_id, runtime, example, body.explain, queued_at)) for example in examples]
            decoded: list[Decoded] = await asyncio.wait_for(asyncio.gather(*jobs), limits.request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"request timed out after request_timeout_s={limits.request_timeout_s}s") from None
        timing |= {
            "queue": max(d.queue_s for d in decoded),
            "runtime": max(d.runtime_s for d in decoded),
            "batch": max(d.batch_size for d in decoded),
        }
        failed = [
            (example.id, d.prediction)
            for example, d in zip(examples, decoded, strict=True)
            if isinstance(d.prediction, Exception)
        ]
        if failed:
            where, problem = failed[0]
            logger.error(f"decoding failed for {where}: {type(problem).__name__}: {problem}")
            raise HTTPException(500, f"decoding failed for {where} ({INTERNAL_DETAILS})")
        outcomes = await self.fall_back(model_id, examples, [d.prediction for d in decoded])
        return schema.PredictResponse(
            model=model_id, version=runtime.version, predictions=[prediction_out(o, body.scores) for o in outcomes]
        )

    async def fall_back(
        self, model_id: str, examples: list[tasks.Example], predictions: list[Prediction]
    ) -> list[fallback.Outcome]:
        """The student's predictions, with those it is unsure of answered by the teacher (when one is set): below the
        margin, or (--fallback-signal consistency|both) whose rationale reaches another label."""
        settings, threshold = self.args.fallback, self.thresholds[model_id]
        outcomes = [fallback.Outcome(p, "student", None, 0.0) for p in predictions]
        unsure = [i for i, p in enumerate(predictions) if fallback.unsure(settings, p, threshold)]
        if unsure and settings.fallback_signal != "margin":
            unsure = await self.disagreeing(model_id, examples, predictions, unsure)
        answers = await asyncio.gather(
            *(fallback.ask(self.teachers[model_id], examples[i], predictions[i]) for i in unsure)
        )
        metrics = replica_metrics()
        log = self.logs.get(model_id)
        for i, outcome in zip(unsure, answers, strict=True):
            outcomes[i] = outcome = dataclasses.replace(outcome, signal=settings.fallback_signal)
            metrics["fallbacks"].inc(
                tags={"model": model_id, "source": outcome.source, "signal": settings.fallback_signal}
            )
            metrics["fallback_latency"].observe(1000 * outcome.seconds, tags={"model": model_id})
            if log and outcome.source == "teacher":
                version = self.runtimes[model_id].version
                log.add(served_record(self.tasks[model_id], examples[i], predictions[i], outcome.prediction,
                                      model_id, version, settings.fallback_signal))  # fmt: skip
                metrics["fallback_log_rows"].inc(tags={"model": model_id})
        for source in ("student", "teacher"):
            answered = sum(o.source == source for o in outcomes)
            if answered:
                metrics["predictions"].inc(answered, tags={"model": model_id, "source": source})
        return outcomes

    async def disagreeing(
        self, model_id: str, examples: list[tasks.Example], predictions: list[Prediction], rows: list[int]
    ) -> list[int]:
        """The `rows` whose rationale reaches another label than the student's (the consistency signal), checked on
        the runtime thread in one call for the request, within its timeout (504 past it, as for decoding)."""
        timeout_s, runtime = self.args.limits.request_timeout_s, self.runtimes[model_id]
        checked = [examples[i] for i in rows], [predictions[i] for i in rows]
        reached = asyncio.get_running_loop().run_in_executor(self.runtime_thread, rationale_labels, runtime, *checked)
        try:
            labels = await asyncio.wait_for(reached, timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"request timed out after request_timeout_s={timeout_s}s") from None
        return [i for i, label in zip(rows, labels, strict=True) if label != predictions[i].label]

    def models(self) -> list[schema.ModelInfo]:
        infos = []
        for model_id, task in self.tasks.items():
            infos.append(
                schema.ModelInfo(
                    id=model_id,
                    task=task.name,
                    answer_style=task.answer_style,
                    labels=task.labels,
                    version=self.runtimes[model_id].version,
                )
            )
        return infos


def prediction_out(outcome: fallback.Outcome, with_scores: bool) -> schema.PredictionOut:
    p = outcome.prediction
    return schema.PredictionOut(
        label=p.label,
        probability=p.probability,
        margin=p.margin,
        scores=p.scores if with_scores else None,
        log_prob=p.log_prob,
        rationale=p.rationale,
        source=outcome.source,
        fallback_error=outcome.error,
        fallback_signal=outcome.signal,
    )


def build_api(server: StudentServer) -> FastAPI:
    """The replica's HTTP API, its request schema built from the server's limits and models."""
    limits = server.args.limits
    request_model = schema.predict_request_model(limits, server.tasks)
    model_id = Literal[tuple(server.tasks)] | None  # type: ignore[valid-type]
    api = FastAPI(
        title="stepwise student",
        description="Labels (and, on request, rationales) from a distilled step-by-step student "
        "(ONNX Runtime on Ray Serve).",
        version="1",
    )
    api.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    api.add_middleware(RequestMetrics)  # outermost: counts the body limit's 413s too

    @api.exception_handler(RequestValidationError)
    async def bad_request(request: Request, problem: RequestValidationError) -> JSONResponse:
        status, message = schema.describe_problems(problem.errors(), limits)
        if status == 422 and "json" not in request.headers.get("content-type", "json"):  # e.g. curl -d without -H
            message += (
                f" (the body was sent as {request.headers['content-type']}; "
                "send JSON with Content-Type: application/json)"
            )
        return JSONResponse({"error": message}, status_code=status)

    @api.exception_handler(StarletteHTTPException)  # also FastAPI's, and routing's 404/405
    async def http_error(request: Request, problem: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(problem.detail)}, status_code=problem.status_code, headers=problem.headers)

    @api.exception_handler(Exception)  # anything else: still a JSON error body (and logged), never a bare traceback
    async def internal_error(request: Request, problem: Exception) -> JSONResponse:
        logger.exception(f"{request.method} {request.url.path} failed")
        return JSONResponse({"error": f"internal error ({INTERNAL_DETAILS})"}, status_code=500)

    @api.post(
        "/v1/predict",
        response_model=schema.PredictResponse,
        response_model_exclude_none=True,
        responses=schema.PREDICT_RESPONSES,
    )
    async def predict_endpoint(
        body: request_model,  # type: ignore[valid-type]
        response: Response,
        model_header: model_id = Header(
            None,
            alias=schema.MODEL_HEADER,
            convert_underscores=False,
            description="model id; also routes to a replica holding that model",
        ),  # type: ignore[valid-type]
    ) -> schema.PredictResponse:
        """Label(s) for one input or a list; with "explain": true, rationales too. The Server-Timing header says
        where the request's time went inside the replica (queue: waiting for its batch; runtime: the batch's
        decoding; batch: inputs decoded together)."""
        timing: dict[str, float] = {}
        result = await server.predict(body, model_header, timing)
        response.headers["server-timing"] = (
            f"queue;dur={1000 * timing['queue']:.2f}, runtime;dur={1000 * timing['runtime']:.2f}, "
            f"batch;desc={timing['batch']:.0f}"
        )
        return result

    @api.get("/healthz", response_model=schema.Health)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": list(server.tasks)}

    @api.get("/v1/models", response_model=list[schema.ModelInfo])
    async def models() -> list[schema.ModelInfo]:
        return server.models()

    return api


# ---------------------------------------------------------------- building the application


def check_models(models: dict[str, str], allow_unverified: bool) -> dict[str, str]:
    """model id -> absolute export folder (or its URI: each replica downloads it on its own node); fails here,
    before any replica starts, on a location that is not an export or whose parity gate did not pass."""
    checked = {}
    for model_id, folder in models.items():
        if storage.is_remote(folder):
            storage.check_location(folder, f"model {model_id!r}", must_exist=True)
        path = storage.local_folder(folder, f"model {model_id!r}")
        if not (path / artifacts.EXPORT_CONFIG).exists():
            raise ValueError(
                f"model {model_id!r}: {path} is not an export folder "
                f"(no {artifacts.EXPORT_CONFIG}; run `stepwise export` first)"
            )
        tasks.load_task(path)
        verify(model_id, path, allow_unverified)
        checked[model_id] = str(storage.as_location(folder)) if storage.is_remote(folder) else str(path)
    return checked


def verify(model_id: str, folder: Path, allow_unverified: bool) -> None:
    """ValueError naming why, unless the export's parity gate passed (or `allow_unverified`)."""
    verdict = "" if allow_unverified else unverified_reason(folder)
    if verdict:
        raise ValueError(
            f"model {model_id!r}: {folder} {verdict}; "
            "rerun `stepwise export`, or serve it anyway with --allow-unverified"
        )


def unverified_reason(folder: Path) -> str:
    """Why an export's parity with its PyTorch model is not established ("" when it is)."""
    if not (folder / artifacts.PARITY).exists():
        return f"has no {artifacts.PARITY} (its parity gate never ran)"
    report = artifacts.read_json(folder / artifacts.PARITY, "the parity report")
    if report.get("skipped"):
        return "was exported with the parity gate skipped"
    if not report.get("passed"):
        return f"failed its parity gate ({'; '.join(report.get('failures', []))})"
    return ""


def check_trt_profiles(models: dict[str, str], args: ServeArgs) -> None:
    """ValueError naming the export folder, the profile dimension and the limit, when a TensorRT export's shape
    profiles are narrower than a request this server accepts: TensorRT would have to build an engine outside them
    (or fail) mid-request. An export that asks for no TensorRT takes any shape."""
    for model_id, folder in models.items():
        location = storage.as_location(folder)
        shortfall = narrower_trt_profile(artifacts.read_export_config(location), tasks.load_task(location), args)
        if shortfall:
            raise ValueError(
                f"model {model_id!r}: {folder} {shortfall}; re-export it with `stepwise export --target tensorrt "
                f"--max-batch {args.batching.max_batch_size} --max-choices {args.limits.max_choices} "
                f"--max-choice-tokens {args.limits.max_choice_tokens}`, or serve it with lower limits"
            )


def narrower_trt_profile(export: artifacts.ExportConfig, task: tasks.Task, args: ServeArgs) -> str:
    """Where the export's recorded TensorRT profiles fall short of this server's limits ("" where they do not, or
    the export asks for no TensorRT). A batch runs the encoder and the decoder's start step on its inputs, and the
    cached decoder on every candidate of every input at once, each candidate's tokens but its first."""
    trt = next((p for p in export["providers"] if p["name"] == "TensorrtExecutionProvider"), None)
    if trt is None:
        return ""
    batch, limits = args.batching.max_batch_size, args.limits
    candidates = request_limits.candidates_per_input(task, limits.max_choices)
    per_input = f"max_choices={limits.max_choices}" if task.answer_style == "choice" else f"{candidates} candidates"
    needs = [
        ("encoder", 0, batch, f"max_batch_size={batch}"),
        ("decoder", 0, batch, f"max_batch_size={batch}"),
        ("decoder_with_past", 0, batch * candidates, f"max_batch_size={batch} x {per_input} = {batch * candidates}"),
    ]
    if task.answer_style == "choice":
        needs.append(
            ("decoder_with_past", 1, limits.max_choice_tokens, f"max_choice_tokens={limits.max_choice_tokens}")
        )
    for session, axis, need, limit in needs:
        have = profile_shape(trt["profiles"][session]["trt_profile_max_shapes"], "input_ids")[axis]
        if have < need:
            what = "rows" if axis == 0 else "tokens"
            return (
                f"has a TensorRT profile of at most {have} {what} for {session} input_ids, "
                f"fewer than the {limit} this server accepts"
            )
    return ""


def profile_shape(shapes: str, name: str) -> list[int]:
    """One input's dimensions in ONNX Runtime's TensorRT profile notation ("input_ids:16x512,attention_mask:...")."""
    for entry in shapes.split(","):
        input_name, dims = entry.rsplit(":", 1)
        if input_name == name:
            return [int(d) for d in dims.split("x")]
    raise ValueError(f"the TensorRT profile has no shape for {name}: {shapes[:80]}")


def wants_gpu(models: dict[str, str]) -> bool:
    targets = [artifacts.read_export_config(storage.as_location(folder))["target"] for folder in models.values()]
    return any(target in ("cuda", "tensorrt") for target in targets)


def build_app(args: dict[str, Any] | ServeArgs) -> serve.Application:
    """The Serve application: the app builder for `serve run` / `serve deploy` (its config's `args:`), and
    what `lifecycle.start` runs."""
    args = args if isinstance(args, ServeArgs) else ServeArgs.from_dict(args)
    scaling = args.scaling
    if scaling.max_replicas is None:
        replicas: dict[str, Any] = {"num_replicas": scaling.replicas}
    else:
        replicas = {
            "autoscaling_config": {
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
            }
        }
    models = check_models(args.models, args.allow_unverified)
    check_trt_profiles(models, args)
    if args.fallback.fallback:  # the teacher's few-shot prompts and the thresholds: refused here, before any replica
        for model_id, folder in models.items():  # starts, if unreadable
            fallback.few_shots(tasks.load_task(storage.as_location(folder)))
            fallback.threshold(args.fallback, storage.as_location(folder), model_id)
            fallback.check_signal(args.fallback, storage.as_location(folder), model_id)
    # Ray hides GPUs from actors that reserve none, and ONNX Runtime then silently falls back to the CPU.
    gpus = scaling.replica_gpus if scaling.replica_gpus is not None else float(wants_gpu(models))
    deployment = StudentServer.options(
        max_ongoing_requests=args.batching.max_ongoing_requests,
        max_queued_requests=args.overload.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.overload.retry_after_s),
        ray_actor_options={"num_cpus": scaling.replica_cpus, "num_gpus": gpus},
        logging_config=LoggingConfig(encoding="JSON", enable_access_log=args.access_log),
        **replicas,
    )
    # Replicas get a plain dict (what a Serve config's `args:` holds too) and rebuild ServeArgs from it.
    return deployment.bind(dataclasses.replace(args, models=models).to_dict())
