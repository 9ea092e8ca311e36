"""Training and tuning jobs: the request the form builds, and how a job is shown."""

from __future__ import annotations

import json
from typing import Any

JOB_COLUMNS = [
    "id", "kind", "config", "state", "attempts", "model version", "promoted", "created", "started by", "last error"
]  # fmt: skip
# A job in one of these never changes again: the page stops following it, and it cannot be cancelled.
TERMINAL_STATES = frozenset({"succeeded", "failed", "dead_lettered", "cancelled", "timed_out"})


def parse_overrides(text: str | None) -> dict[str, Any]:
    """The overrides box: empty, or a JSON object of dotted config keys."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"overrides: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(value, dict):
        raise ValueError('overrides: must be a JSON object such as {"train.epochs": 5}')
    return value


def job_request(kind: str, config: str | None, overrides_text: str | None) -> dict[str, Any]:
    """The body of `POST /v1/training-jobs`; an empty config means the kind's default."""
    spec: dict[str, Any] = {"kind": kind, "overrides": parse_overrides(overrides_text)}
    if config and config.strip():
        spec["config"] = config.strip()
    return spec


def is_terminal(job: dict[str, Any]) -> bool:
    return str(job.get("state")) in TERMINAL_STATES


def yes_no(value: Any, yes: str = "yes", no: str = "no") -> str:
    return yes if value is True else no if value is False else ""


def _cell(value: Any) -> str:
    # A pipe or a line break inside a cell would end the markdown table row.
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")


def _short_time(value: Any) -> str:
    # ISO 8601 from the API; seconds are precise enough for a table.
    return str(value or "")[:19].replace("T", " ")


def actor_label(actor: Any) -> str:
    """Who did something to a job, as the API records it (`created_by`, an event's `actor`):
    `key ui-20260101120000 (id 3fa2c1d0e9b8)`, `operator root@head-1`, `alert ModelAccuracyLow`."""
    if not isinstance(actor, dict):
        return ""
    kind = actor.get("kind")
    if kind == "api_key":
        return f"key {actor.get('name') or '?'} (id {actor.get('key_id') or '?'})"
    if kind == "operator":
        return f"operator {actor.get('user') or '?'}@{actor.get('host') or '?'}"
    if kind == "alert":
        return f"alert {actor.get('name') or '?'}"
    return str(kind or "")


def job_markdown(job: dict[str, Any]) -> str:
    paragraphs = [
        f"### Job `{job.get('id')}`: **{job.get('state')}**",
        f"{job.get('kind')} with config `{job.get('config')}`, attempt {job.get('attempts')} of "
        f"{job.get('max_attempts')}",
    ]
    if actor_label(job.get("created_by")):
        paragraphs.append(f"Started by {actor_label(job['created_by'])}")
    if job.get("reason"):
        paragraphs.append(f"Reason: {job['reason']}")
    if job.get("overrides"):
        paragraphs.append(f"Overrides: `{json.dumps(job['overrides'])}`")
    if job.get("ray_job_id"):
        paragraphs.append(f"Ray job `{job['ray_job_id']}`, MLflow run `{job.get('mlflow_run_id') or '-'}`")
    if job.get("model_version"):
        promoted = yes_no(job.get("promoted"), " (promoted to champion)", " (not promoted)")
        if job.get("rollout"):
            promoted = f" (passed the gate; rolled out as a {job['rollout']} challenger: see the Model tab)"
        paragraphs.append(f"Model version **{job['model_version']}**{promoted}")
    if job.get("test_metrics"):
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(job["test_metrics"].items()))
        paragraphs.append(f"Test metrics: {metrics}")
    if job.get("last_error"):
        paragraphs.append(f"Last error: {job['last_error']}")
    events = job.get("events") or []
    if events:
        table = ["| at (UTC) | state | attempt | by | message |", "| --- | --- | --- | --- | --- |"]
        table += [
            f"| {_short_time(e.get('at'))} | {e.get('state')} | {e.get('attempt')} "
            f"| {_cell(actor_label(e.get('actor')))} | {_cell(e.get('message'))} |"
            for e in events
        ]
        paragraphs.append("\n".join(table))
    return "\n\n".join(paragraphs)


def job_rows(jobs: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            str(job.get("id")),
            str(job.get("kind")),
            str(job.get("config")),
            str(job.get("state")),
            str(job.get("attempts")),
            str(job.get("model_version") or ""),
            str(job["rollout"]) if job.get("rollout") else yes_no(job.get("promoted")),
            _short_time(job.get("created_at")),
            actor_label(job.get("created_by")),
            str(job.get("last_error") or "")[:120],
        ]
        for job in jobs
    ]
