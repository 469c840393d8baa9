"""The same student behind a plain FastAPI app on uvicorn: no Ray, no batching, one `predict` per request.
The serving benchmark's baseline, so that Ray Serve's own overhead shows apart from HTTP's. An app factory:
the model loads when uvicorn builds the app, not when the module is imported.

    STEPWISE_PLAIN_MODEL=EXPORT_DIR uvicorn benchmarks.serving_plain:build_app --factory --port 8001
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI

from stepwise.export.runtime import load_runtime, predict
from stepwise.serving.schema import PredictionOut, PredictResponse, predict_request_model, to_example
from stepwise.serving.settings import LimitOptions


def build_app() -> FastAPI:
    """POST /v1/predict and GET /healthz for the export folder in STEPWISE_PLAIN_MODEL."""
    runtime = load_runtime(Path(os.environ["STEPWISE_PLAIN_MODEL"]), threads=1)
    request_model = predict_request_model(LimitOptions(), {runtime.task.name: runtime.task})
    # One runtime thread fed first come, first served: the fast tokenizer is not thread-safe, and no batching.
    runtime_thread = ThreadPoolExecutor(1)
    app = FastAPI(title="stepwise student, plain FastAPI")

    @app.post("/v1/predict")
    async def predict_endpoint(body: request_model) -> PredictResponse:  # type: ignore[valid-type]
        items = body.inputs if isinstance(body.inputs, list) else [body.inputs]
        examples = [to_example(item, runtime.task, f"inputs.{i}") for i, item in enumerate(items)]
        predictions = await asyncio.get_running_loop().run_in_executor(
            runtime_thread, predict, runtime, examples, body.explain
        )
        return PredictResponse(
            model=runtime.task.name,
            version=runtime.version,
            predictions=[PredictionOut(label=p.label, rationale=p.rationale) for p in predictions],
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
