"""What a training request is, the states it goes through, and how it is shown to users."""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.audit import Actor
from core.settings import REPO_ROOT
from jobs.batch_config import BATCH_CONFIG_DIR, BatchConfig, load_batch_config
from jobs.config import JobConfig, load_config, operator_only

CONFIG_DIR = REPO_ROOT / "jobs" / "configs"
CONFIG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_CONFIG = {"train": "adult", "tune": "adult-tune", "batch_predict": "batch-predict"}
MODULES = {"train": "jobs.train", "tune": "jobs.tune", "batch_predict": "jobs.batch_predict"}

# A batch_predict job scores a data set with a registered version (jobs/batch_predict.py): it runs
# through the same queue, states, retries and quota as training, with a config from jobs/configs/batch.
JobKind = Literal["train", "tune", "batch_predict"]
# Why a job was started, as its requester says (an alert's name and figures): one line of text.
REASON_MAX_LENGTH = 500
OverrideValue = str | int | float | bool | None | list[Any] | dict[str, Any]


class JobState(StrEnum):
    QUEUED = "queued"  # accepted, or waiting for its next attempt after a failed one
    SUBMITTED = "submitted"  # claimed by a dispatcher, Ray job submitted or being submitted
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # ended without retries: no longer runnable, or refused by the promotion gate
    DEAD_LETTERED = "dead_lettered"  # every attempt failed; the request sits in the dead-letter queue
    CANCELLED = "cancelled"  # by its owner, an admin or an operator, or its Ray job stopped by hand
    TIMED_OUT = "timed_out"  # its attempt ran past the maximum wall time of its kind; not retried

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD_LETTERED, JobState.CANCELLED, JobState.TIMED_OUT}
)
# Ended by the platform while in flight: their Ray job is stopped, not followed to its end.
HALTED_STATES = frozenset({JobState.CANCELLED, JobState.TIMED_OUT})


@lru_cache(maxsize=64)
def _base_config(path: str, mtime_ns: int) -> JobConfig:
    """Parsed once per file version: YAML parsing dominates the cost of accepting a request.
    The mtime is part of the key so an edited config is read again."""
    del mtime_ns
    return load_config(path)


def base_config(path: Path) -> JobConfig:
    """A config file as it is on disk now."""
    return _base_config(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _base_batch_config(path: str, mtime_ns: int) -> BatchConfig:
    del mtime_ns
    return load_batch_config(path)


def base_batch_config(path: Path) -> BatchConfig:
    """A batch config file as it is on disk now."""
    return _base_batch_config(str(path), path.stat().st_mtime_ns)


def _unstorable(value: Any) -> str | None:
    """Why PostgreSQL could not store this override value (jsonb has no NaN or Infinity and no NUL
    character; UTF-8 has no lone surrogates), or None. Iterative: values may be nested deeply."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return "numbers must be finite (no NaN or Infinity)"
        if isinstance(item, str) and not _storable_text(item):
            return "text may not contain NUL characters or lone surrogates"
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
    return None


def _is_control(char: str) -> bool:
    # Unicode's "other" categories: controls (line breaks, tabs, NUL), format characters (which
    # can reorder how the rest is displayed), surrogates, private-use and unassigned code points.
    return unicodedata.category(char).startswith("C")


def clean_reason(text: str) -> str | None:
    """Text from elsewhere (an alert's annotations) as a valid `JobSpec.reason`: whitespace runs
    become one space, other control characters go, and it is cut to the maximum length."""
    spaced = "".join(" " if char.isspace() else char for char in text)
    kept = " ".join("".join(char for char in spaced if not _is_control(char)).split())
    if len(kept) > REASON_MAX_LENGTH:
        kept = kept[: REASON_MAX_LENGTH - 1].rstrip() + "\u2026"
    return kept or None


def _storable_text(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ModelNotAllowedError(Exception):
    """The job would register (or, batch_predict, score with) a model the caller's key is not restricted to."""

    def __init__(self, model: str, allowed: frozenset[str], scores: bool = False) -> None:
        verb, does = ("use", "scores with") if scores else ("train", "registers")
        super().__init__(
            f"this API key may only {verb} the models {', '.join(sorted(allowed))}; the job {does} {model!r}"
        )
        self.model = model
        # Where the request names the model: a batch job's `model` override, else its config.
        self.loc: list[str | int] = ["body", "overrides", "model"] if scores else ["body", "config"]


class InvalidJobSpecError(ValueError):
    """The spec names a config that does not exist or overrides that do not validate."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class JobSpec(BaseModel):
    """A training request, as posted to `POST /v1/training-jobs`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"kind": "train", "config": "adult", "overrides": {"train.epochs": 5}},
                {
                    "kind": "batch_predict",
                    "overrides": {
                        "model": "adult-income@champion",
                        "input": "incoming/adult.parquet",
                        "output": "scored/adult.parquet",
                    },
                },
            ],
        },
    )

    kind: JobKind = "train"
    # A config shipped in jobs/configs (by name, without .yaml); default: adult / adult-tune, and
    # for batch_predict batch-predict in jobs/configs/batch.
    config: str | None = Field(
        default=None,
        description="name of a config in jobs/configs (batch_predict: jobs/configs/batch), without .yaml",
    )
    overrides: dict[str, OverrideValue] = Field(
        default_factory=dict, description='dotted config keys, e.g. {"train.epochs": 5}'
    )
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    reason: str | None = Field(
        default=None,
        max_length=REASON_MAX_LENGTH,
        description="why the job is started, in one line; its first event reads 'accepted: <reason>'",
    )

    @field_validator("config")
    @classmethod
    def _config_name(cls, value: str | None) -> str | None:
        if value is not None and not CONFIG_NAME.match(value):
            raise ValueError("must be a config name such as 'adult' (letters, digits, '-' and '_')")
        return value

    @field_validator("overrides")
    @classmethod
    def _override_keys(cls, value: dict[str, OverrideValue]) -> dict[str, OverrideValue]:
        for key in value:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", key):
                raise ValueError(f"{key!r} is not a dotted config key such as 'train.epochs'")
            problem = _unstorable(value[key])
            if problem:
                raise ValueError(f"{key!r}: {problem}")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _printable_key(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("must be printable text")
        return value

    @field_validator("reason")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(_is_control(char) for char in value):
            raise ValueError("must be one line of text without control characters")
        # Blank says nothing: the job is accepted without a reason.
        return value.strip() or None

    @property
    def config_name(self) -> str:
        return self.config or DEFAULT_CONFIG[self.kind]

    @property
    def config_path(self) -> Path:
        folder = BATCH_CONFIG_DIR if self.kind == "batch_predict" else CONFIG_DIR
        return folder / f"{self.config_name}.yaml"

    @property
    def module(self) -> str:
        return MODULES[self.kind]

    def fingerprint(self) -> str:
        """Identity of the request, to tell a replay of an idempotency key from a conflicting reuse.
        The reason is not part of it: an alert's repeats carry newer figures for the same episode."""
        canonical = json.dumps(
            {"kind": self.kind, "config": self.config_name, "overrides": self.overrides}, sort_keys=True
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def resolve(self, operator: bool = False) -> JobConfig:
        """The effective job config; raises InvalidJobSpecError naming the field at fault.

        Only an operator (the cluster's own settings, or the CLI on the cluster) may point a job at
        another registered model or change the gate that decides whether it replaces the champion.
        """
        if self.kind == "batch_predict":
            raise InvalidJobSpecError(["body", "kind"], "a batch_predict job has a batch config (resolve_batch)")
        if not operator:
            self._check_not_operator_only()
        if not self.config_path.is_file():
            raise InvalidJobSpecError(["body", "config"], f"no config named {self.config_name!r} in jobs/configs")
        base = base_config(self.config_path)
        try:
            resolved = base.with_overrides(self.overrides)
        except ValidationError as exc:
            first = exc.errors()[0]
            path = ".".join(str(p) for p in first["loc"])
            raise InvalidJobSpecError(["body", "overrides", path], f"overrides: {path}: {first['msg']}") from exc
        if self.kind == "tune" and getattr(resolved, "tune", None) is None:
            raise InvalidJobSpecError(["body", "config"], f"config {self.config_name!r} has no tune section")
        return resolved

    def resolve_batch(self) -> BatchConfig:
        """The effective config of a batch_predict job, complete (model, input and output set);
        raises InvalidJobSpecError naming the field at fault. Where it may read and write is
        checked on admission (services/training_jobs/service.py), and again by the job."""
        if not self.config_path.is_file():
            raise InvalidJobSpecError(
                ["body", "config"], f"no batch config named {self.config_name!r} in jobs/configs/batch"
            )
        try:
            resolved = base_batch_config(self.config_path).with_overrides(self.overrides)
        except ValidationError as exc:
            first = exc.errors()[0]
            path = ".".join(str(p) for p in first["loc"])
            raise InvalidJobSpecError(["body", "overrides", path], f"overrides: {path}: {first['msg']}") from exc
        missing = resolved.missing()
        if missing:
            raise InvalidJobSpecError(
                ["body", "overrides", missing[0]],
                f"overrides: {missing[0]}: required (a batch_predict job needs model, input and output)",
            )
        return resolved

    def _check_not_operator_only(self) -> None:
        for key, value in self.overrides.items():
            # Turning promotion off can only keep the champion where it is: anyone may.
            if key == "promotion.enabled" and value is False:
                continue
            if operator_only(key):
                raise InvalidJobSpecError(
                    ["body", "overrides", key],
                    f"overrides: {key}: the model name and the promotion settings can only be changed by "
                    "an operator (in the config file, or with --set on the cluster's CLI)",
                )

    def cli_overrides(self) -> list[str]:
        """The overrides as `--set key=value` arguments; values as JSON, which YAML reads back."""
        return [f"{key}={json.dumps(value)}" for key, value in self.overrides.items()]


class JobRecord(BaseModel):
    """A training job as stored and as returned by the API."""

    id: UUID
    kind: JobKind
    config: str
    overrides: dict[str, Any]
    idempotency_key: str | None = None
    reason: str | None = None
    state: JobState
    attempts: int
    max_attempts: int
    ray_job_id: str | None = None
    mlflow_run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    # Whether the gate made the job's version the champion; a version it handed to a shadow or
    # canary rollout instead has `rollout` set (the mode) and is not promoted (yet): the rollout
    # service's decision follows in the job's events.
    promoted: bool | None = None
    rollout: str | None = None
    test_metrics: dict[str, float] | None = None
    last_error: str | None = None
    trace_id: str | None = None
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_attempt_at: datetime | None = None
    # Set while the job waits, queued, for labels to train on (feedback.wait_s).
    waiting_until: datetime | None = None
    # Who started it: an API key, an operator on the cluster, or an alert (None for jobs accepted
    # before this was recorded).
    created_by: Actor | None = None

    def spec(self) -> JobSpec:
        return JobSpec(kind=self.kind, config=self.config, overrides=self.overrides, reason=self.reason)


class JobEvent(BaseModel):
    at: datetime
    state: JobState
    attempt: int
    message: str | None = None
    # Who caused the change; None for the dispatcher's own steps (submitted, running, retries).
    actor: Actor | None = None


def actor_log_fields(actor: Actor) -> dict[str, str | None]:
    """What a JSON log line says about who did something: the label and the key id, never the key."""
    return {"actor": actor.label(), "actor_kind": actor.kind, "actor_key_id": actor.key_id}


class JobDetail(JobRecord):
    events: list[JobEvent] = Field(default_factory=list)


class JobList(BaseModel):
    jobs: list[JobRecord]
    next_before: datetime | None = Field(default=None, description="pass as `before` for the next page")
