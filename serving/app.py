"""Serving: exported students on Ray Serve, label-only by default, dynamically batched, hardened.

One deployment (`StudentServer`) is both the HTTP ingress (FastAPI) and the model host: each replica holds
the ONNX Runtime sessions (`export.runtime`) of the students it was asked for, loaded on first use through
Serve model multiplexing, and decodes concurrent requests for the same model together with @serve.batch.
One deployment rather than an ingress in front of a model deployment saves a hop per request.

    stepwise serve --model runs/export-esnli                       # one student, model id = its task name
    stepwise serve --model runs/export-esnli cqa=runs/export-cqa   # several; requests choose by model id
    serve run serving/serve_config.yaml                           # the same app from a Serve config file

Requests: POST /v1/predict {"inputs": <input or list of inputs>, "model": id, "explain": false}.
An input is a string (the formatted task input) or an object: {"premise", "hypothesis"} (NLI),
{"question", "choices"} or {"input", "choices"} (multiple choice), {"input"}.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' types from the runtime annotations.
import asyncio
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.metrics import Counter, Histogram
from ray.serve.schema import LoggingConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepwise.export.runtime import Prediction, Runtime, load_runtime, predict
from stepwise import artifacts, tasks

ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "stepwise"
MODELS_PER_REPLICA = 4  # students one replica keeps loaded (least recently used is dropped)
MODEL_HEADER = "serve_multiplexed_model_id"  # Serve routes a request to a replica that has this model loaded
logger = logging.getLogger("ray.serve")


class ServeArgs(BaseModel):
    """What the app builder takes: from `stepwise serve` options, or `args:` in serving/serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(min_length=1, description="model id -> export folder")
    max_batch_size: int = Field(16, ge=1, description="most inputs decoded together")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long a batch waits to fill (0: take what is queued)")
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica works on at once")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting for a replica before 503 (-1: unbounded)")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After of a 503 on overload")
    request_timeout_s: float = Field(10.0, gt=0, description="a request still decoding after this gets 504")
    max_items: int = Field(64, ge=1, description="most inputs in one request")
    max_input_chars: int = Field(4000, ge=1, description="longest formatted input, in characters")
    replicas: int = Field(1, ge=1, description="replicas when not autoscaling")
    min_replicas: int = Field(1, ge=0, description="autoscaling floor")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling ceiling; set it to autoscale")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target of ongoing requests per replica")
    replica_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves per replica")
    replica_gpus: float | None = Field(None, ge=0, description="GPUs per replica; default 1 when an export targets cuda/tensorrt, else 0")
    ort_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per session")
    access_log: bool = Field(False, description="one JSON log line per request (costs latency)")

    @model_validator(mode="after")
    def _consistent(self) -> "ServeArgs":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size ({self.max_batch_size}), or batches never fill")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


DEFAULTS = ServeArgs.model_construct()  # the field defaults, for the CLI signature


# ---------------------------------------------------------------- the HTTP API


class InputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: StrictStr | None = None
    premise: StrictStr | None = None
    hypothesis: StrictStr | None = None
    question: StrictStr | None = None
    choices: list[StrictStr] | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": {"premise": "A man plays a guitar.", "hypothesis": "A person makes music."}}]})

    inputs: StrictStr | InputItem | list[StrictStr | InputItem] = Field(description="one input or a list of them")
    model: StrictStr | None = Field(None, description="model id (see /v1/models); or the serve_multiplexed_model_id header")
    explain: StrictBool = Field(False, description="also generate each input's rationale (slower)")


class PredictionOut(BaseModel):
    label: str
    rationale: str | None = None


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[PredictionOut]


class ModelInfo(BaseModel):
    id: str
    task: str
    answer_style: str
    labels: list[str]
    version: str | None  # known once loaded on the replica that answered
    loaded: bool  # on the replica that answered (a replica keeps MODELS_PER_REPLICA, least recently used dropped)


api = FastAPI(
    title="stepwise student",
    description="Labels (and, on request, rationales) from a distilled step-by-step student (ONNX Runtime on Ray Serve).",
    version="1",
)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's errors as one readable message: 400 for a body that is not JSON, 422 for the wrong shape."""
    problems = exc.errors()
    if any(p["type"] == "json_invalid" for p in problems):
        where = next(p for p in problems if p["type"] == "json_invalid")
        return error(400, f"malformed JSON: {where.get('ctx', {}).get('error', 'cannot parse the body')} (at character {where['loc'][-1]})")
    message = "; ".join(dict.fromkeys(describe(p) for p in problems))
    if "json" not in request.headers.get("content-type", "json"):  # e.g. curl -d without -H
        message += f" (the body was sent as {request.headers['content-type']}; send JSON with Content-Type: application/json)"
    return error(422, message)


def describe(problem: dict[str, Any]) -> str:
    # Union members show up in `loc` as "str", "InputItem" or "list[...]"; drop them so the path reads like the JSON.
    path = [str(part) for part in problem["loc"][1:] if isinstance(part, int) or not (part in UNION_TAGS or "[" in part)]
    field = ".".join(path)
    if not field:
        return "body: expected a JSON object with 'inputs'" + (" (the request has no body)" if problem["type"] == "missing" else "")
    if problem["type"] == "missing":
        return f"{field}: required field missing"
    if problem["type"] == "extra_forbidden":
        return f"{field}: unknown field"
    if path == ["inputs"]:
        return f"inputs: expected a string, an object or a list of them, got {type(problem['input']).__name__}"
    return f"{field}: {problem['msg']}"


UNION_TAGS = {"str", "InputItem"}


@api.exception_handler(StarletteHTTPException)  # also FastAPI's, and routing's 404/405
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), exc.headers)


def to_example(item: str | InputItem, task: tasks.Task, where: str, max_chars: int) -> tasks.Example:
    """A request input as a task example, or a 4xx naming what is wrong with it."""
    choices = None if isinstance(item, str) else item.choices
    if isinstance(item, str):
        text = item
    elif item.premise is not None or item.hypothesis is not None:
        if item.premise is None or item.hypothesis is None or item.input is not None or item.question is not None:
            raise HTTPException(422, f"{where}: give both 'premise' and 'hypothesis' (and neither 'input' nor 'question')")
        check_text(item.premise, f"{where}.premise", max_chars)
        check_text(item.hypothesis, f"{where}.hypothesis", max_chars)
        text = tasks.nli_input(item.premise, item.hypothesis)
    elif (item.input is None) == (item.question is None):
        raise HTTPException(422, f"{where}: give 'input', 'premise' and 'hypothesis', or 'question' and 'choices'")
    else:
        question = item.input if item.input is not None else item.question
        check_text(question, f"{where}.{'input' if item.input is not None else 'question'}", max_chars)
        if item.question is not None and not choices:
            raise HTTPException(422, f"{where}: 'question' needs 'choices'")
        text = tasks.cqa_input(question, choices) if choices else question
    if choices is not None:
        if not choices or len(choices) > len(tasks.LETTERS):
            raise HTTPException(422, f"{where}.choices: expected 1 to {len(tasks.LETTERS)} choices, got {len(choices)}")
        for i, choice in enumerate(choices):
            check_text(choice, f"{where}.choices.{i}", max_chars)
    if task.answer_style == "choice" and not choices:
        raise HTTPException(422, f"{where}: this model answers multiple-choice questions ({task.name}): give 'choices'")
    if task.answer_style != "choice" and choices:
        raise HTTPException(422, f"{where}.choices: this model's labels are fixed ({task.name}: {', '.join(task.labels) or 'free text'}); drop 'choices'")
    check_text(text, where, max_chars)
    return tasks.Example(id=where, input=text, label="", choices=choices)


def check_text(text: str, where: str, max_chars: int) -> None:
    if not text.strip():
        raise HTTPException(422, f"{where}: empty input")
    if len(text) > max_chars:
        raise HTTPException(413, f"{where}: {len(text)} characters, more than max_input_chars={max_chars}")


class DecodeJob(NamedTuple):
    model_id: str
    runtime: Runtime
    example: tasks.Example
    explain: bool


@functools.cache
def replica_metrics() -> dict[str, Any]:
    """Created once per replica process; Ray exports them on its metrics port (prefixed `ray_`)."""
    return {
        "requests": Counter("stepwise_requests", "HTTP requests by route and status", tag_keys=("route", "status")),
        "latency": Histogram("stepwise_request_latency_ms", "request latency inside the replica", boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000], tag_keys=("route",)),
        "batch_size": Histogram("stepwise_batch_size", "inputs decoded together", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("model", "mode")),
    }


METRIC_ROUTES = {"/v1/predict", "/v1/models", "/healthz", "/docs", "/openapi.json"}


@api.middleware("http")
async def count_requests(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    # The app's own paths only (under any route prefix), so scanners cannot blow up the label set.
    path = request.scope["path"].removeprefix(request.scope.get("root_path", ""))
    metrics, route = replica_metrics(), path if path in METRIC_ROUTES else "other"
    metrics["requests"].inc(tags={"route": route, "status": str(response.status_code)})
    metrics["latency"].observe((time.perf_counter() - started) * 1000, tags={"route": route})
    return response


@serve.deployment(name="student")
@serve.ingress(api)
class StudentServer:
    def __init__(self, args: dict[str, Any]):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        self.args = ServeArgs.model_validate(args)
        self.tasks = {model_id: tasks.load_task(Path(folder)) for model_id, folder in self.args.models.items()}
        self.decode.set_max_batch_size(self.args.max_batch_size)
        self.decode.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        # Runtimes this replica holds; an entry disappears when multiplexing drops (and frees) that runtime.
        self.loaded: weakref.WeakValueDictionary[str, Runtime] = weakref.WeakValueDictionary()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def load_model(self, model_id: str) -> Runtime:
        started = time.perf_counter()
        runtime = await asyncio.to_thread(load_runtime, Path(self.args.models[model_id]), threads=self.args.ort_threads)
        self.loaded[model_id] = runtime
        logger.info(f"loaded model {model_id} ({runtime.model_id} {runtime.version}, {runtime.providers[0]}) in {time.perf_counter() - started:.2f}s")
        return runtime

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s)
    async def decode(self, jobs: list[DecodeJob]) -> list[Prediction]:
        """One batch from all concurrent requests; each (model, explain) group is one `predict` call."""
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.model_id, job.explain)].append(i)
        results: list[Prediction] = [None] * len(jobs)  # type: ignore[list-item]
        for (model_id, explain), rows in groups.items():
            # A thread, so the replica keeps accepting (and queueing for the next batch) while ORT runs.
            predictions = await asyncio.to_thread(predict, jobs[rows[0]].runtime, [jobs[i].example for i in rows], explain)
            replica_metrics()["batch_size"].observe(len(rows), tags={"model": model_id, "mode": "explain" if explain else "label"})
            for i, prediction in zip(rows, predictions):
                results[i] = prediction
        return results

    def model_id(self, requested: str | None, header: str) -> str:
        if requested and header and requested != header:
            raise HTTPException(400, f"model {requested!r} in the body but {header!r} in the {MODEL_HEADER} header")
        model_id = requested or header
        if not model_id:
            if len(self.tasks) > 1:
                raise HTTPException(422, f"model: required when several models are served ({', '.join(self.tasks)})")
            model_id = next(iter(self.tasks))
        if model_id not in self.tasks:
            raise HTTPException(404, f"model {model_id!r} is not served; models: {', '.join(self.tasks)}")
        return model_id

    @api.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict_endpoint(self, body: PredictRequest) -> PredictResponse:
        """Label(s) for one input or a list; with "explain": true, rationales too."""
        model_id = self.model_id(body.model, serve.get_multiplexed_model_id())
        items = body.inputs if isinstance(body.inputs, list) else [body.inputs]
        if not items:
            raise HTTPException(422, "inputs: empty list")
        if len(items) > self.args.max_items:
            raise HTTPException(413, f"inputs: {len(items)} items, more than max_items={self.args.max_items}")
        task = self.tasks[model_id]
        examples = [to_example(item, task, f"inputs.{i}" if isinstance(body.inputs, list) else "inputs", self.args.max_input_chars) for i, item in enumerate(items)]
        try:
            runtime = await self.load_model(model_id)
            jobs = [self.decode(DecodeJob(model_id, runtime, example, body.explain)) for example in examples]
            predictions = await asyncio.wait_for(asyncio.gather(*jobs), self.args.request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"request timed out after request_timeout_s={self.args.request_timeout_s}s") from None
        return PredictResponse(model=model_id, version=runtime.version, predictions=[PredictionOut(label=p.label, rationale=p.rationale) for p in predictions])

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": list(self.tasks)}

    @api.get("/v1/models")
    async def models(self) -> list[ModelInfo]:
        infos = []
        for model_id, task in self.tasks.items():
            runtime = self.loaded.get(model_id)
            infos.append(ModelInfo(id=model_id, task=task.name, answer_style=task.answer_style, labels=task.labels, version=runtime and runtime.version, loaded=runtime is not None))
        return infos


# ---------------------------------------------------------------- building and running the app


def check_models(models: dict[str, str]) -> dict[str, str]:
    """model id -> absolute export folder; fails here, before any replica starts, on a folder that is not an export."""
    checked = {}
    for model_id, folder in models.items():
        path = Path(folder).expanduser().resolve()
        if not (path / artifacts.EXPORT_CONFIG).exists():
            raise ValueError(f"model {model_id!r}: {path} is not an export folder (no {artifacts.EXPORT_CONFIG}; run `stepwise export` first)")
        tasks.load_task(path)
        checked[model_id] = str(path)
    return checked


def wants_gpu(models: dict[str, str]) -> bool:
    return any(artifacts.read_export_config(Path(folder))["target"] in ("cuda", "tensorrt") for folder in models.values())


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application (import path `stepwise.serving.app:build_app` for `serve run` / `serve deploy`)."""
    if args.max_replicas is None:
        scaling: dict[str, Any] = {"num_replicas": args.replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target_ongoing_requests}}
    models = check_models(args.models)
    # Ray hides GPUs from actors that reserve none, and ONNX Runtime then silently falls back to the CPU.
    gpus = args.replica_gpus if args.replica_gpus is not None else float(wants_gpu(models))
    deployment = StudentServer.options(
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": gpus},
        logging_config=LoggingConfig(encoding="JSON", enable_access_log=args.access_log),
        **scaling,
    )
    return deployment.bind(args.model_copy(update={"models": models}).model_dump())


def parse_models(specs: list[str]) -> dict[str, str]:
    """`DIR` (id: the folder's task name) or `ID=DIR` -> {id: DIR}."""
    models: dict[str, str] = {}
    for spec in specs:
        model_id, folder = spec.split("=", 1) if "=" in spec else (tasks.load_task(Path(spec)).name, spec)
        if model_id in models:
            raise ValueError(f"model id {model_id!r} given twice: name them with ID=DIR")
        models[model_id] = folder
    return models


_started_ray = False


def short_ray_dir(ray_dir: Path) -> Path:
    """Ray's sockets live under its temp dir and a Unix socket path holds at most 107 bytes, which a deep
    run folder overflows: then Ray runs in a short /tmp folder and `ray_dir` links to it (logs stay findable)."""
    if len(str(ray_dir)) <= 40:
        return ray_dir
    short = Path(tempfile.mkdtemp(prefix="stepwise-ray-"))
    ray_dir.parent.mkdir(parents=True, exist_ok=True)
    if ray_dir.is_symlink() or ray_dir.exists():
        ray_dir.unlink() if ray_dir.is_symlink() else shutil.rmtree(ray_dir)
    ray_dir.symlink_to(short, target_is_directory=True)
    return short


def start(models: dict[str, Path], port: int = 8000, host: str = "127.0.0.1", args: dict[str, Any] | None = None, ray_dir: Path | None = None, ray_cpus: int = 2, metrics_port: int | None = None, ready_timeout_s: float = 120.0) -> str:
    """Start Ray (unless already up), Serve and the app in this process; return the base URL once /healthz answers.

    `args` are further `ServeArgs` fields (batching, limits, scaling). Metrics: http://127.0.0.1:<metrics_port>/metrics.
    """
    global _started_ray
    server_args = ServeArgs(models={k: str(v) for k, v in models.items()}, **(args or {}))
    app = build_app(server_args)
    if not ray.is_initialized():
        for name, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "ORT_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}.items():
            os.environ.setdefault(name, value)
        # Replicas are new processes: they find `serving` and `export` through PYTHONPATH.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray_dir = short_ray_dir(Path(ray_dir or ROOT / "runs" / "serve" / "ray").resolve())
        ray.init(num_cpus=ray_cpus, include_dashboard=False, _temp_dir=str(ray_dir), _metrics_export_port=metrics_port, log_to_driver=False)
        _started_ray = True
    # The proxy's own timeout is a backstop; the app answers 504 at request_timeout_s first.
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": server_args.request_timeout_s + 30}, logging_config=LoggingConfig(encoding="JSON", enable_access_log=server_args.access_log))
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_ready(url, ready_timeout_s)
    return url


def wait_ready(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Return once GET /healthz answers 200; fail early if `process` (a server started elsewhere) exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with {process.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f}s")
        time.sleep(0.2)


def stop() -> None:
    """Shut Serve down (proxy, replicas) and Ray too when `start` started it; frees the port."""
    global _started_ray
    if ray.is_initialized():
        serve.shutdown()
        if _started_ray:
            ray.shutdown()
            _started_ray = False


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM shuts down as cleanly as Ctrl-C


def main(
    model: list[str],
    port: int = 8000,
    host: str = "127.0.0.1",
    replicas: int = DEFAULTS.replicas,
    min_replicas: int = DEFAULTS.min_replicas,
    max_replicas: int | None = DEFAULTS.max_replicas,
    target_ongoing_requests: float = DEFAULTS.target_ongoing_requests,
    max_batch_size: int = DEFAULTS.max_batch_size,
    batch_wait_timeout_s: float = DEFAULTS.batch_wait_timeout_s,
    max_ongoing_requests: int = DEFAULTS.max_ongoing_requests,
    max_queued_requests: int = DEFAULTS.max_queued_requests,
    retry_after_s: float = DEFAULTS.retry_after_s,
    request_timeout_s: float = DEFAULTS.request_timeout_s,
    max_items: int = DEFAULTS.max_items,
    max_input_chars: int = DEFAULTS.max_input_chars,
    replica_cpus: float = DEFAULTS.replica_cpus,
    replica_gpus: float | None = DEFAULTS.replica_gpus,
    ort_threads: int = DEFAULTS.ort_threads,
    access_log: bool = DEFAULTS.access_log,
    ray_cpus: int = 2,
    metrics_port: int = 9464,
    run_dir: Path = Path("runs/serve"),
) -> int:
    """Serve exported students over HTTP on Ray Serve until Ctrl-C.

    Args:
        model: export folders, as DIR (model id = its task name) or ID=DIR; several for several students
        port: HTTP port of the Serve proxy
        host: address to listen on (0.0.0.0 to accept other machines)
        replicas: replicas when not autoscaling
        min_replicas: autoscaling floor (with --max-replicas)
        max_replicas: autoscaling ceiling; setting it turns autoscaling on
        target_ongoing_requests: autoscaling target of ongoing requests per replica
        max_batch_size: most inputs one replica decodes together
        batch_wait_timeout_s: how long a batch waits to fill; 0 takes whatever is queued (lowest latency)
        max_ongoing_requests: requests one replica works on at once (at least max_batch_size)
        max_queued_requests: requests waiting for a replica before new ones get 503 (-1: unbounded)
        retry_after_s: Retry-After header of a 503 on overload
        request_timeout_s: a request still decoding after this many seconds gets 504
        max_items: most inputs in one request (413 beyond)
        max_input_chars: longest input in characters (413 beyond)
        replica_cpus: CPUs Ray reserves per replica
        replica_gpus: GPUs per replica; default 1 when an export targets cuda or tensorrt, else 0
        ort_threads: ONNX Runtime intra-op threads per session
        access_log: a JSON access-log line per request (costs latency)
        ray_cpus: CPUs of the local Ray instance
        metrics_port: Prometheus metrics at http://127.0.0.1:PORT/metrics
        run_dir: Ray's temporary folder and logs (logs/serve/ holds the JSON logs)
    """
    options = {k: v for k, v in locals().items() if k in ServeArgs.model_fields}
    previous_handler = signal.signal(signal.SIGTERM, interrupt)
    try:
        url = start(parse_models(model), port=port, host=host, args=options, ray_dir=run_dir / "ray", ray_cpus=ray_cpus, metrics_port=metrics_port)
        print(f"[serve] {url}/v1/predict  docs {url}/docs  metrics http://127.0.0.1:{metrics_port}/metrics  logs {run_dir.resolve()}/ray/session_latest/logs/serve  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", flush=True)
    except (ValueError, FileNotFoundError) as problem:  # a bad folder or setting, found before Ray starts
        raise SystemExit(f"stepwise serve: {problem}") from None
    finally:
        stop()
        signal.signal(signal.SIGTERM, previous_handler)
    return 0
