"""What the UI does, independent of Gradio: each action calls the API (or MLflow) and returns
plain data for the page. Failures raise `ApiError` with a readable message."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pandas as pd
from opentelemetry import context as otel_context

from core import telemetry
from core.settings import Settings
from ui.card import curve_keys, curves_frame, promotion_history
from ui.errors import ApiError
from ui.form import FormSchema, form_schema
from ui.http import InferenceApi, MlflowRest
from ui.jobs import job_request
from ui.prediction import prediction_view

log = logging.getLogger("ui")
P = ParamSpec("P")
R = TypeVar("R")


def traced(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Each user action is the root of its own trace, which its API calls join. Explicitly a root:
    Gradio runs handlers in a long-lived queue task whose context still holds the span of the
    HTTP request that happened to start it, which would put every action in one trace."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with telemetry.tracer("ui").start_as_current_span(f"ui {name}", context=otel_context.Context()):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


@dataclass
class ModelCard:
    current: dict[str, Any]
    curves: pd.DataFrame
    promotions: list[dict[str, Any]]
    # What could not be shown (MLflow unreachable, ...): the card still shows the rest.
    notes: list[str] = field(default_factory=list)


class UiActions:
    def __init__(self, api: InferenceApi, mlflow: MlflowRest, model_name: str) -> None:
        self.api = api
        self.mlflow = mlflow
        self.model_name = model_name

    @classmethod
    def from_settings(cls, settings: Settings) -> UiActions:
        return cls(
            InferenceApi.from_settings(settings),
            MlflowRest(settings.mlflow.tracking_uri, settings.ui.request_timeout_s),
            settings.model.name,
        )

    def close(self) -> None:
        self.api.close()
        self.mlflow.close()

    # Predictions ------------------------------------------------------------------------

    @traced("models")
    def models(self) -> list[str]:
        """The names of the served models, the API's default one first."""
        names = sorted(str(m["name"]) for m in self.api.models())
        return sorted(names, key=lambda name: name != self.model_name)

    @traced("form")
    def form(self, model: str | None = None) -> FormSchema:
        return form_schema(self.api.current_model(model or None), self.api.openapi())

    @traced("predict")
    def predict(self, row: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        view = prediction_view(self.api.predict(row, model or None))
        extra = {"request_id": view["request_id"], "model_version": view["model_version"]}
        log.info("prediction %s with probability %s", view["label"], view["probability"], extra=extra)
        return view

    @traced("feedback")
    def feedback(self, request_id: str, label: str) -> dict[str, Any]:
        if not request_id.strip():
            raise ApiError("No prediction to give feedback on yet: predict first")
        return self.api.feedback(request_id.strip(), label)

    # The model card ----------------------------------------------------------------------

    @traced("model card")
    def model_card(self, model: str | None = None) -> ModelCard:
        current = self.api.current_model(model or None)
        card = ModelCard(current, curves_frame({}), [])
        self._add_curves(card)
        self._add_promotions(card)
        return card

    @traced("model monitoring")
    def monitoring(self, model: str | None = None) -> dict[str, Any]:
        """The monitor's latest report on the served version of `model` (default: the API's)."""
        return self.api.monitoring(model or self.model_name)

    @traced("model rollout")
    def rollout(self, model: str | None = None) -> dict[str, Any]:
        """The served model as the API describes it, its `rollout` field (the rollout service's
        challenger, probation and decisions) included."""
        return self.api.current_model(model or None)

    def _add_curves(self, card: ModelCard) -> None:
        run_id = str(card.current.get("run_id") or "")
        if not run_id:
            card.notes.append("The model has no MLflow run: no training curves.")
            return
        try:
            run = self.mlflow.run(run_id)
            histories = {key: self.mlflow.metric_history(run_id, key) for key in curve_keys(run)}
        except ApiError as exc:
            card.notes.append(f"Training curves unavailable: {exc.message}")
            return
        card.curves = curves_frame(histories)
        if card.curves.empty:
            card.notes.append(f"Run {run_id} logged no per-epoch metrics.")

    def _add_promotions(self, card: ModelCard) -> None:
        name = str(card.current.get("name") or self.model_name)
        try:
            versions = self.mlflow.model_versions(name)
            aliases = self.mlflow.aliases(name)
        except ApiError as exc:
            card.notes.append(f"Promotion history unavailable: {exc.message}")
            return
        card.promotions = promotion_history(versions, aliases)

    # Training jobs -----------------------------------------------------------------------

    @traced("start job")
    def start_job(self, kind: str, config: str | None, overrides_text: str | None) -> dict[str, Any]:
        try:
            spec = job_request(kind, config, overrides_text)
        except ValueError as exc:
            raise ApiError(str(exc)) from exc
        job = self.api.submit_job(spec)
        log.info("training job %s queued (%s)", job.get("id"), kind, extra={"job_id": str(job.get("id"))})
        return job

    @traced("job")
    def job(self, job_id: str) -> dict[str, Any]:
        if not job_id.strip():
            raise ApiError("Enter a job id, or start a job")
        return self.api.job(job_id.strip())

    @traced("cancel job")
    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """The job, cancelled. The API says 409 when it has already ended and 404 when this key
        cannot see it (unknown, or another key's job); both come back as `ApiError`."""
        if not job_id.strip():
            raise ApiError("Enter a job id, or start a job, to cancel it")
        job = self.api.cancel_job(job_id.strip())
        log.info("training job %s cancel: %s", job.get("id"), job.get("state"), extra={"job_id": str(job.get("id"))})
        return job

    @traced("recent jobs")
    def recent_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.api.jobs(limit)
