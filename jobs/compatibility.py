"""Whether one model version can stand in for another behind the same API.

A serving contract is what the champion's clients rely on: the task, the target, the class labels
they receive, and every request the champion accepts. A version that would answer any of those
requests with a 422, or answer with labels of another meaning, breaks that contract. The promotion
gate and the serving replica both refuse such a version unless an operator approved the change.
"""

from __future__ import annotations

from jobs.schema import DataSchema, FeatureSpec

MAX_LISTED = 8

# Tags the promotion gate writes (jobs/promote.py) and the serving replica reads.
DECISION_TAG = "promotion.decision"
RULE_TAG = "promotion.rule"
FORCED_BY_TAG = "promotion.forced_by"
FORCE_REASON_TAG = "promotion.force_reason"
# On the registered model: the version whose serving contract is in force, moved only by the gate
# together with the alias. A replica starting cold compares the alias with it.
CONTRACT_TAG = "serving.contract_version"
# MLflow caps tag values (5,000 characters for model versions); reasons name columns and can be long.
MAX_TAG_CHARS = 4000


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _task_changes(old: DataSchema, new: DataSchema) -> list[str]:
    changes: list[str] = []
    if old.task != new.task:
        changes.append(f"task changed: {old.task} -> {new.task}")
    if old.target != new.target:
        changes.append(f"target changed: {old.target!r} -> {new.target!r}")
    if old.task == new.task == "classification" and set(old.classes or []) != set(new.classes or []):
        removed = sorted(set(old.classes or []) - set(new.classes or []))
        added = sorted(set(new.classes or []) - set(old.classes or []))
        parts = ([f"removed {_listed(removed)}"] if removed else []) + ([f"added {_listed(added)}"] if added else [])
        changes.append(f"classes changed: {'; '.join(parts)}")
    return changes


def _feature_changes(old: FeatureSpec, new: FeatureSpec) -> list[str]:
    if old.kind != new.kind:
        return [f"feature {old.name!r} changed kind: {old.kind} -> {new.kind}"]
    changes: list[str] = []
    if old.nullable and not new.nullable:
        changes.append(f"feature {old.name!r} no longer accepts null")
    lost = sorted(set(old.categories) - set(new.categories))
    if lost:
        changes.append(f"feature {old.name!r} lost categories: {_listed(lost)}")
    return changes


def contract_changes(champion: DataSchema, candidate: DataSchema) -> list[str]:
    """What `candidate` changes in `champion`'s serving contract, one sentence each; empty when
    every request the champion accepts is accepted by the candidate and answered in the same terms.

    Widening is compatible (new categories, a feature that now accepts null); narrowing, removing,
    adding a required feature, or changing what is predicted is not.
    """
    changes = _task_changes(champion, candidate)
    old = {f.name: f for f in champion.features}
    new = {f.name: f for f in candidate.features}
    removed = [name for name in old if name not in new]
    added = [name for name in new if name not in old]
    if removed:
        changes.append(f"features removed or renamed: {_listed(removed)}")
    if added:
        changes.append(f"features added (the champion's clients do not send them): {_listed(added)}")
    for name in old:
        if name in new:
            changes.extend(_feature_changes(old[name], new[name]))
    return changes


def operator_approval(version_tags: dict[str, str]) -> str | None:
    """Who approved serving this version whatever it changes (a forced promotion with a reason), or None."""
    forced = version_tags.get(RULE_TAG) == "forced" and version_tags.get(DECISION_TAG) == "promoted"
    if forced and version_tags.get(FORCED_BY_TAG) and version_tags.get(FORCE_REASON_TAG, "").strip():
        return version_tags[FORCED_BY_TAG]
    return None
