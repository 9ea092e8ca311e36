"""A prediction and its feedback, as the page and the UI's API endpoints show them."""

from __future__ import annotations

from typing import Any


def prediction_view(response: dict[str, Any]) -> dict[str, Any]:
    """The first (only) prediction of a `/v1/predict` response, flattened with its model."""
    prediction = (response.get("predictions") or [{}])[0]
    model = response.get("model", {})
    return {
        "label": prediction.get("label"),
        "probability": prediction.get("probability"),
        "probabilities": prediction.get("probabilities"),
        "value": prediction.get("value"),
        "model_name": model.get("name"),
        "model_version": model.get("version"),
        "run_id": model.get("run_id"),
        "request_id": response.get("request_id"),
    }


def prediction_markdown(view: dict[str, Any]) -> str:
    if view.get("label") is not None:
        probability = view.get("probability")
        share = f" with probability **{probability:.1%}**" if isinstance(probability, int | float) else ""
        head = f"### Prediction: **{view['label']}**{share}"
    else:
        head = f"### Prediction: **{view.get('value')}**"
    return (
        f"{head}\n\nModel **{view.get('model_name')} v{view.get('model_version')}** "
        f"(run `{view.get('run_id')}`), request id `{view.get('request_id')}`"
    )


def feedback_markdown(result: dict[str, Any]) -> str:
    if result.get("outcome") == "duplicate":
        return (
            f"Feedback was already given for `{result.get('request_id')}`: the first label "
            f"(**{result.get('label')}**) stays."
        )
    correct = result.get("correct")
    verdict = "right" if correct is True else "wrong" if correct is False else "not comparable"
    return (
        f"Feedback recorded: true label **{result.get('label')}**; the model said "
        f"**{result.get('predicted')}** ({verdict})."
    )


def error_markdown(message: str) -> str:
    return f"**Error:** {message}"
