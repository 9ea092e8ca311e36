"""Registry names a rollout is handed over by: the gate's side (ML library) of docs/rollout.md.

A candidate that passes the gate under a `shadow` or `canary` policy does not move `champion`: the
gate sets the `challenger` alias and tags the version with its policy. The rollout service
(services/rollout) takes it from there, keeps the rollout's state in PostgreSQL, and is the only
one that moves `champion` to the challenger, or removes the challenger alias when it rejects it.
Any move of `champion` (the gate's or the service's) records the version it replaced, which is
what a rollback (automatic, or `python -m jobs.promote --rollback`) goes back to.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from jobs.compatibility import CONTRACT_TAG, MAX_TAG_CHARS
from jobs.config import RolloutPolicy

CHALLENGER_ALIAS = "challenger"

# On a challenger version: the policy it is rolled out under (JSON of RolloutPolicy), when the
# gate passed it, and the training job that produced it (empty for the CLI).
POLICY_TAG = "rollout.policy"
REQUESTED_AT_TAG = "rollout.requested_at"
JOB_TAG = "rollout.job_id"
# Written by the rollout service on the version: the rollout's outcome and its figures.
STATE_TAG = "rollout.state"
DECISION_REASON_TAG = "rollout.reason"
FIGURES_TAG = "rollout.figures"
# On a version that became champion: the version it replaced (what a rollback restores).
PREVIOUS_CHAMPION_TAG = "promotion.previous_champion"
# On a version a rollback moved away from, and on the one it restored.
ROLLED_BACK_TAG = "rollback.rolled_back"  # JSON: {"to", "reason", "at", "by", "figures"}
RESTORED_FROM_TAG = "rollback.restored_from"  # the version the alias left; cleared when promoted again


def policy_tag(policy: RolloutPolicy) -> str:
    return policy.model_dump_json()


def policy_from_tag(value: str | None) -> RolloutPolicy | None:
    """The policy recorded on a challenger; None when the tag is missing or unreadable (the
    service then refuses the rollout rather than guess)."""
    if not value:
        return None
    try:
        return RolloutPolicy.model_validate(json.loads(value))
    except (ValueError, TypeError):
        return None


# What the registry answers for a model, version or alias that does not exist.
_ABSENT = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
# Within ROLLED_BACK_TAG: the reason's and the figures' shares, so that who and where stay readable.
_MAX_REASON_CHARS = 1000
_MAX_FIGURES_CHARS = 2500


def alias_version(client: MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    """The version `alias` names; None only when the registry says the model or the alias does not
    exist. Any other failure (the registry unreachable, a server error) raises: "no champion" lets
    the gate promote anything and a replica call a model unknown, so it must never be a guess."""
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return None
        raise


def bounded(text: str, limit: int = MAX_TAG_CHARS) -> str:
    return text[:limit]


def json_tag(value: Any, limit: int = MAX_TAG_CHARS) -> str:
    """`value` as JSON within `limit` characters, still JSON when cut: a reader parses every tag
    this module writes, and a cut document would read as no figures at all."""
    text = json.dumps(value, default=str, sort_keys=True, ensure_ascii=False)
    if len(text) <= limit:
        return text
    kept = limit
    while kept > 0:
        cut = json.dumps({"truncated": text[:kept]}, ensure_ascii=False)
        if len(cut) <= limit:
            return cut
        kept -= len(cut) - limit
    return "{}"


def _set_version_tags(client: MlflowClient, model_name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, bounded(value))


def _delete_version_tag(client: MlflowClient, model_name: str, version: str, key: str) -> None:
    # Looked up first: a registry server may answer an error for a tag that is not there.
    if key in (client.get_model_version(model_name, version).tags or {}):
        client.delete_model_version_tag(model_name, version, key)


def _remove_alias_if(client: MlflowClient, model_name: str, alias: str, version: str) -> None:
    """Remove `alias` only while it still names `version`: a newer challenger set meanwhile stays."""
    current = alias_version(client, model_name, alias)
    if current is not None and str(current.version) == str(version):
        client.delete_registered_model_alias(model_name, alias)


def move_champion(
    client: MlflowClient,
    model_name: str,
    alias: str,
    version: str,
    previous: str | None,
    tags: dict[str, str] | None = None,
) -> None:
    """Make `version` the champion in place of `previous` (None: there was none). The version's tags
    and the contract in force are written before the alias moves: a replica that sees the move
    finds them already there. A version that becomes champion again is no longer "restored"."""
    version = str(version)
    recorded = dict(tags or {})
    if previous is None or str(previous) != version:
        # Moving the alias onto the version it already names replaces nothing: what a rollback
        # would go back to stays as it was.
        recorded[PREVIOUS_CHAMPION_TAG] = "" if previous is None else str(previous)
    _set_version_tags(client, model_name, version, recorded)
    _delete_version_tag(client, model_name, version, RESTORED_FROM_TAG)
    client.set_registered_model_tag(model_name, CONTRACT_TAG, version)
    client.set_registered_model_alias(model_name, alias, version)


def _outcome_tags(state: str, reason: str, figures: dict[str, Any] | None) -> dict[str, str]:
    return {STATE_TAG: state, DECISION_REASON_TAG: bounded(reason), FIGURES_TAG: json_tag(figures or {})}


def promote_challenger(
    client: MlflowClient, model_name: str, alias: str, version: str, reason: str, figures: dict[str, Any]
) -> str | None:
    """The rollout service's promotion: the outcome on the version, `alias` moved to it, the
    challenger alias removed if it still names it. Returns the champion it replaced (None: none)."""
    version = str(version)
    current = alias_version(client, model_name, alias)
    previous = None if current is None else str(current.version)
    move_champion(client, model_name, alias, version, previous, _outcome_tags("promoted", reason, figures))
    _remove_alias_if(client, model_name, CHALLENGER_ALIAS, version)
    return previous if previous != version else None


def reject_challenger(
    client: MlflowClient, model_name: str, version: str, reason: str, figures: dict[str, Any]
) -> None:
    """The rollout service's rejection: the outcome on the version, the challenger alias removed if
    it still names it (replicas stop loading and mirroring it); the champion is not touched."""
    version = str(version)
    _set_version_tags(client, model_name, version, _outcome_tags("rejected", reason, figures))
    _remove_alias_if(client, model_name, CHALLENGER_ALIAS, version)


def rollback(
    client: MlflowClient,
    model_name: str,
    alias: str,
    reason: str,
    by: str,
    figures: dict[str, Any] | None = None,
    expected_current: str | None = None,
) -> tuple[str, str]:
    """Move `alias` back to the version the current champion replaced; returns (from, to).

    ValueError, with nothing changed, when there is nothing safe to go back to: no champion, a
    champion other than `expected_current` (it moved since the caller looked), a champion that
    records no previous one, or a previous version that no longer exists.
    """
    if not reason.strip():
        raise ValueError("a rollback needs a reason (it is recorded on both versions)")
    current = alias_version(client, model_name, alias)
    if current is None:
        raise ValueError(f"model {model_name!r} has no {alias!r} alias: nothing to roll back")
    moved_from = str(current.version)
    if expected_current is not None and moved_from != str(expected_current):
        raise ValueError(
            f"{model_name} {alias} is version {moved_from}, not {expected_current}: it moved since, nothing rolled back"
        )
    restored = (current.tags or {}).get(PREVIOUS_CHAMPION_TAG, "")
    if not restored:
        raise ValueError(f"{model_name} version {moved_from} records no previous {alias} to go back to")
    try:
        client.get_model_version(model_name, restored)
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            raise ValueError(
                f"{model_name} version {restored}, the {alias} before version {moved_from}, no longer exists"
            ) from exc
        raise
    record = {
        "to": restored,
        "reason": bounded(reason, _MAX_REASON_CHARS),
        "at": datetime.now(UTC).isoformat(),
        "by": by,
        "figures": json.loads(json_tag(figures or {}, _MAX_FIGURES_CHARS)),
    }
    client.set_model_version_tag(model_name, moved_from, ROLLED_BACK_TAG, json_tag(record))
    client.set_model_version_tag(model_name, restored, RESTORED_FROM_TAG, moved_from)
    client.set_registered_model_tag(model_name, CONTRACT_TAG, restored)
    client.set_registered_model_alias(model_name, alias, restored)
    return moved_from, restored
