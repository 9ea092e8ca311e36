"""Who did something: the actor recorded with every action that changes what the platform runs
(a training job started, cancelled or re-queued, a model version promoted).

An API key is named by its key id (a prefix of its SHA-256 digest, which gives nothing of the key
away) and its name; an operator on the cluster's command line by the operating-system user and
host; the alert webhook by the alert. The same record goes into a job's events, a model version's
tags and the JSON logs.
"""

from __future__ import annotations

import getpass
import json
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

ActorKind = Literal["api_key", "operator", "alert", "system"]


class Actor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ActorKind
    key_id: str | None = None  # api_key: the first hex digits of the key's SHA-256 digest
    name: str | None = None  # api_key: the key's name; alert: the alert's name
    user: str | None = None  # operator: the operating-system user
    host: str | None = None  # operator: the machine the command ran on

    @classmethod
    def operator(cls) -> Actor:
        """The person running a command on the cluster, as the operating system knows them."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for the uid (some containers)
            user = "unknown"
        return cls(kind="operator", user=user, host=socket.gethostname())

    @classmethod
    def system(cls) -> Actor:
        return cls(kind="system")

    def label(self) -> str:
        """One line for a tag or an event: `key:ui (id 3fa2c1d0e9b8)`, `operator:root@head-1`."""
        if self.kind == "api_key":
            return f"key:{self.name or '?'} (id {self.key_id or '?'})"
        if self.kind == "operator":
            return f"operator:{self.user or '?'}@{self.host or '?'}"
        if self.kind == "alert":
            return f"alert:{self.name or '?'}"
        return "system"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> Actor | None:
        """An actor handed over in an environment variable; None when absent or unreadable (the
        caller then records the actor it can see itself)."""
        if not text:
            return None
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None
