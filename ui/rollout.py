"""The Model tab's rollout part: the challenger on its way to champion (shadow or canary), the
champion on probation, and the rollout service's decisions, as `GET /v1/models/{name}` reports
them in its `rollout` field (services/rollout/models.py RolloutOverview; null when the API could
not read it, with `rollout_error` saying why).

Pure shaping of the API's JSON; the figures and the decisions are the service's, this only words
them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

EVENT_COLUMNS = ["at (UTC)", "rollout", "event", "message", "figures"]

# The figures the service stores (services/rollout/policy.py), in the order a reader wants them;
# any other figure shows under its own name, so a figure added later still shows. A shadow or
# canary window: its paired rows (a served row and its mirror) and the rule they are judged by.
_PAIRED_LABELS = {
    "rows": "paired rows",
    "requests": "paired requests",
    "agreement": "agreement",
    "labelled": "labelled paired rows",
    "champion_accuracy": "champion accuracy (same labelled rows)",
    "challenger_accuracy": "challenger accuracy (same labelled rows)",
    "challenger_served_rows": "rows the challenger answered",
    "elapsed_s": "window elapsed (s)",
    "window_requests": "window ends at (paired requests)",
    "window_s": "window ends at (s)",
    "min_rows": "paired rows needed",
    "min_agreement": "agreement needed",
    "min_labels": "labels needed to compare accuracies",
    "max_accuracy_drop": "allowed accuracy drop",
}
# A probation: each version's predictions over the same length of time, the new champion's since
# its promotion and the previous one's just before.
_PROBATION_LABELS = {
    "basis": "compared on",
    "drop": "drop (previous - new)",
    "max_drop": "allowed drop",
    "new": "new champion",
    "previous": "previous champion",
    "rows": "predictions",
    "labelled": "labelled",
    "accuracy": "live accuracy",
    "estimated_accuracy": "estimated accuracy",
    "probability_rows": "predictions with a probability",
    "elapsed_s": "elapsed (s)",
    "compared_s": "compared over (s)",
    "window_s": "probation window (s)",
}
_LABELS = {"shadow": _PAIRED_LABELS, "canary": _PAIRED_LABELS, "probation": _PROBATION_LABELS}
# Said by the rollout's own line (versions, step, share), or the service's bookkeeping.
_UNSHOWN = frozenset({"step", "share", "new_version", "previous_version", "basis_seen"})
_MODES = {"shadow": "shadow (scores mirrored requests; clients get the champion's answers)", "canary": "canary"}


def _time(value: Any) -> str:
    # ISO 8601 from the API; seconds are precise enough here.
    return str(value)[:19].replace("T", " ") if value else ""


def _cell(value: Any) -> str:
    # A pipe or a line break inside a cell would end the markdown table row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "n/a"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _labels(kind: Any) -> dict[str, str]:
    # The figures of a rollout whose kind is unknown keep their own names.
    return _LABELS.get(str(kind), {})


def _flat(figures: Any, labels: dict[str, str], prefix: str = "") -> list[tuple[str, Any]]:
    """(name, value) of every figure, the nested ones (a version's own figures) under their
    parent's name."""
    if not isinstance(figures, dict):
        return []
    known = [key for key in labels if key in figures]
    flat: list[tuple[str, Any]] = []
    for key in [*known, *sorted(k for k in figures if k not in labels and k not in _UNSHOWN)]:
        value = figures[key]
        name = labels.get(key, str(key).replace("_", " "))
        if isinstance(value, dict):
            flat += _flat(value, labels, f"{prefix}{name} · ")
        elif not isinstance(value, list):
            flat.append((prefix + name, value))
    return flat


def figure_lines(figures: Any, kind: Any) -> list[str]:
    """The figures of a rollout of this kind as a markdown table; none, no table."""
    flat = _flat(figures, _labels(kind))
    if not flat:
        return []
    return ["| figure | value |", "| --- | --- |", *(f"| {_cell(name)} | {_cell(_value(v))} |" for name, v in flat)]


def figures_text(figures: Any, kind: Any) -> str:
    """The figures of a rollout of this kind on one line, for a table cell."""
    return " · ".join(f"{name} {_value(value)}" for name, value in _flat(figures, _labels(kind)))


def _share(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, int | float) and not isinstance(value, bool) else "?"


def _canary_step(record: dict[str, Any]) -> str:
    """Where a canary stands: its step among the judged shares, and the share it answers now."""
    policy = record.get("policy")
    shares = policy.get("canary_steps") if isinstance(policy, dict) else None
    steps = [s for s in shares or [] if isinstance(s, int | float) and s < 1]
    step = int(record.get("step") or 0)
    if steps:
        plan = " → ".join(_share(s) for s in steps)
        where = f"Canary step {step + 1} of {len(steps)} ({plan} → promotion)"
    else:
        where = f"Canary step {step + 1}"
    return f"{where} · the challenger answers **{_share(record.get('share'))}** of the traffic"


def _record_lines(record: dict[str, Any]) -> list[str]:
    state = str(record.get("state") or "?")
    since = f"started {_time(record.get('started_at'))} UTC"
    if record.get("ended_at"):
        since += f", ended {_time(record['ended_at'])} UTC"
    job = f" · job `{record['job_id']}`" if record.get("job_id") else ""
    if record.get("kind") == "probation":
        head = (
            f"**Probation of champion v{record.get('challenger_version')}** (a rollback restores "
            f"v{record.get('champion_version')}): **{state}** · {since}{job}"
        )
    else:
        mode = str(record.get("kind") or "?")
        head = (
            f"**Challenger v{record.get('challenger_version')}** against champion "
            f"v{record.get('champion_version')}: {_MODES.get(mode, mode)}, **{state}** · {since}{job}"
        )
    lines = [head]
    if record.get("kind") == "canary" and state == "active":
        lines.append(_canary_step(record))
    if record.get("reason"):
        lines.append(f"Decision: {record['reason']}")
    active = state == "active"
    table = figure_lines(record.get("figures"), record.get("kind"))
    if table:
        lines.append(("Figures so far:" if active else "Deciding figures:") + "\n\n" + "\n".join(table))
    elif active:
        lines.append("No figures yet: the service has not judged a window.")
    return lines


def rollout_markdown(model: dict[str, Any]) -> str:
    """What the rollout service reports on `model` (the JSON of `GET /v1/models/{name}`)."""
    title = f"#### Rollout: {model.get('name') or '?'}"
    overview = model.get("rollout")
    if not isinstance(overview, dict):
        if model.get("rollout_error"):
            return f"{title}\n\n_Rollout state unavailable: {model['rollout_error']}_"
        return f"{title}\n\n_The API reports no rollout state for this model: it runs without the rollout service._"
    paragraphs = [title]
    for key in ("rollout", "probation"):
        record = overview.get(key)
        if isinstance(record, dict):
            paragraphs += _record_lines(record)
    if len(paragraphs) == 1:
        paragraphs.append(
            "No challenger and no champion on probation: new versions have become champion directly "
            "(rollout policy `immediate`), or none has been promoted since the rollout service started."
        )
    return "\n\n".join(paragraphs)


def _sort_key(event: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(event.get("at")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def event_rows(model: dict[str, Any]) -> list[list[str]]:
    """The service's decisions and steps on `model`, newest first; each names the rollout it
    belongs to when the overview holds that rollout."""
    overview = model.get("rollout")
    if not isinstance(overview, dict):
        return []
    records = {
        record.get("id"): record
        for record in (overview.get("rollout"), overview.get("probation"))
        if isinstance(record, dict)
    }
    events = [e for e in overview.get("events") or [] if isinstance(e, dict)]
    rows = []
    for event in sorted(events, key=_sort_key, reverse=True):
        record = records.get(event.get("rollout_id"))
        name = f"{record.get('kind')} v{record.get('challenger_version')}" if record else f"#{event.get('rollout_id')}"
        kind = record.get("kind") if record else None
        message = str(event.get("message") or "")
        rows.append(
            [
                _time(event.get("at")),
                name,
                str(event.get("kind") or ""),
                message,
                figures_text(event.get("figures"), kind),
            ]
        )
    return rows


def unavailable_markdown(message: str) -> str:
    """The rollout part of the page when the API could not give the model; the rest still shows."""
    return f"#### Rollout\n\n_Rollout state unavailable: {message}_"
