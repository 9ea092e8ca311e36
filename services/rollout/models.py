"""The records of the rollout service, as the service writes them and the replicas and the API
read them."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# shadow / canary: a challenger on its way to champion. probation: a new champion that may still
# be rolled back to the version it replaced.
RolloutKind = Literal["shadow", "canary", "probation"]


class RolloutState(enum.StrEnum):
    ACTIVE = "active"
    PROMOTED = "promoted"  # shadow/canary: the challenger became champion
    REJECTED = "rejected"  # shadow/canary: the champion stays; the challenger alias is gone
    PASSED = "passed"  # probation: the window ended without a breach
    INCONCLUSIVE = "inconclusive"  # probation: too few figures on either side to judge
    ROLLED_BACK = "rolled_back"  # probation: the alias went back to the previous champion
    ENDED = "ended"  # superseded: the alias moved by other hands (an operator, another promotion)


class RolloutRecord(BaseModel):
    """One rollout or probation. For probation, `champion_version` is the previous champion (the
    one a rollback restores) and `challenger_version` the new champion on probation."""

    model_config = ConfigDict(frozen=True)

    id: int
    model_name: str
    kind: RolloutKind
    state: RolloutState
    champion_version: str
    challenger_version: str
    step: int = 0  # index into the policy's canary steps
    share: float = 0.0  # share of the traffic the challenger answers (canary), else 0
    policy: dict[str, Any] = Field(default_factory=dict)  # jobs.config.RolloutPolicy as JSON
    job_id: str | None = None
    started_at: datetime
    step_started_at: datetime
    ended_at: datetime | None = None
    reason: str | None = None
    figures: dict[str, Any] = Field(default_factory=dict)  # the current window's, or the deciding ones

    @property
    def active(self) -> bool:
        return self.state is RolloutState.ACTIVE


class RolloutEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    rollout_id: int
    at: datetime
    kind: str  # started, step, promoted, rejected, passed, inconclusive, rolled_back, ended
    message: str
    figures: dict[str, Any] = Field(default_factory=dict)


class RolloutOverview(BaseModel):
    """What GET /v1/models/{name} shows: the active (else the latest) shadow/canary rollout, the
    active (else the latest) probation, and their most recent events, newest first."""

    rollout: RolloutRecord | None = None
    probation: RolloutRecord | None = None
    events: list[RolloutEvent] = Field(default_factory=list)
