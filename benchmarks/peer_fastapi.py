"""The model behind a hand-written FastAPI server: one uvicorn worker, a pydantic request model,
an async endpoint calling the model directly on the event loop, orjson out. No auth, no request
ids, no batching, no recording: the bare minimum around the same model code the platform runs
(`record_outputs` and the same prediction objects), so the gap to it is what the platform adds.
A sync endpoint with `predict_frame` measured 142 req/s at 16 connections (FastAPI's thread pool
and pandas); that would flatter every comparison, so it is not the baseline.

    .venv/bin/python -m benchmarks.peer_fastapi --model-dir DIR --port 8001

DIR is a saved TabularPredictor (`TabularPredictor.save`) or a downloaded MLflow model directory
(one with an MLmodel file). POST /predict {"instances": [{feature: value, ...}, ...]} returns
{"predictions": [{"label": ..., "probability": ...}, ...]}; GET /health answers once loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from fastapi import FastAPI
from pydantic import BaseModel

from jobs.predictor import TabularPredictor

cli = typer.Typer(add_completion=False)


class PredictRequest(BaseModel):
    instances: list[dict[str, Any]]


def predictor_directory(model_dir: Path) -> Path:
    """The predictor's own files, whether `model_dir` holds them or an MLflow model wraps them."""
    if (model_dir / "MLmodel").is_file():
        from jobs.registry import predictor_dir

        return predictor_dir(model_dir)
    return model_dir


def create_app(predictor: TabularPredictor) -> FastAPI:
    import orjson
    from fastapi import Response

    from serve_apps.champion import to_predictions

    app = FastAPI(title="bare FastAPI peer")
    schema = predictor.schema

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: PredictRequest) -> Response:
        outputs = predictor.record_outputs(request.instances)
        predictions = to_predictions(outputs, schema.task, schema.classes)
        return Response(orjson.dumps({"predictions": predictions}), media_type="application/json")

    return app


@cli.command()
def main(
    model_dir: Path = typer.Option(..., exists=True, file_okay=False, help="predictor or MLflow model directory"),
    port: int = typer.Option(8001),
    host: str = typer.Option("127.0.0.1"),
    access_log: bool = typer.Option(True, help="uvicorn's default, as `mlflow models serve` keeps it"),
) -> None:
    import torch
    import uvicorn

    # One intra-op thread, as in the platform's replicas and the other servers measured alongside.
    torch.set_num_threads(1)
    app = create_app(TabularPredictor.load(predictor_directory(model_dir)))
    uvicorn.run(app, host=host, port=port, workers=1, loop="uvloop", http="httptools", access_log=access_log)


if __name__ == "__main__":
    cli()
