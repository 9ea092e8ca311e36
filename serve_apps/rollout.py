"""How a replica follows the rollout service (services/rollout): every poll interval it reads the
active shadow and canary rollouts, loads each one's challenger next to the champion it serves,
and drops it when its rollout is over. The service alone decides; a replica only routes
(`route`) and mirrors (serve_apps/shadow.py) as the records say.

The canary's share is taken by a stable hash of a request key (ROLLOUT_CANARY_KEY: the API key's
id by default), so that one caller sees one version for the whole of a step: `canary_bucket`
places a key in [0, 1) for a rollout, and the challenger answers the keys below the step's share.
A rollout's id is part of the hash, so each rollout draws its own callers; within one rollout a
larger share only adds callers to the challenger's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable

from fastapi import Request
from mlflow.tracking import MlflowClient

from core.keys import Principal
from jobs.compatibility import contract_changes
from serve_apps.champion import ChampionModel, LoadedModel, RefusedSwap, ServingRollout, load_version
from serve_apps.errors import request_id_of
from serve_apps.fleet import ModelFleet
from serve_apps.metrics import RolloutMetrics
from services.rollout.models import RolloutOverview, RolloutRecord, RolloutState
from services.rollout.store import RolloutStore

log = logging.getLogger("ray.serve")

# The request key of a canary's hash, from the request and its caller's key.
CanaryKey = Callable[[Request, Principal], str]
# A replica that has not read the rollout records for this many poll intervals stops following
# them (the champion answers everything): it cannot tell whether the service ended a rollout.
STALE_AFTER_POLLS = 12
STALE_AFTER_MIN_S = 60.0
# GET /v1/models/{name} waits this long at most for the rollout records.
OVERVIEW_WAIT_S = 2.0
_BUCKETS = float(2**64)


def canary_bucket(rollout_id: int, key: str) -> float:
    """Where `key` falls in [0, 1) for this rollout: blake2b of "rollout_id:key" (8 bytes, read
    as a big-endian unsigned integer) over 2**64. The same on every replica and every restart."""
    digest = hashlib.blake2b(f"{rollout_id}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _BUCKETS


def _api_key(request: Request, principal: Principal) -> str:
    return principal.key_id


def _request_id(request: Request, principal: Principal) -> str:
    return request_id_of(request)


def canary_key(setting: str) -> CanaryKey:
    """The key reader ROLLOUT_CANARY_KEY names: `api_key`, `request_id` or `header:<Name>` (a
    request without that header is keyed by its API key's id)."""
    if setting == "api_key":
        return _api_key
    if setting == "request_id":
        return _request_id
    kind, _, header = setting.partition(":")
    if kind != "header" or not header:
        raise ValueError(f"unknown canary key {setting!r}: api_key, request_id or header:<Name>")

    def from_header(request: Request, principal: Principal) -> str:
        return request.headers.get(header) or principal.key_id

    return from_header


def route(
    rollout: ServingRollout, model: LoadedModel, key: CanaryKey, request: Request, principal: Principal
) -> tuple[LoadedModel, LoadedModel | None]:
    """The version that answers a request validated against the champion `model`, and the version
    that scores its mirror (None: no mirror, the replica's champion is not the rollout's)."""
    if rollout.champion_version != model.version:
        return model, None
    share = rollout.share
    if (
        rollout.kind == "canary"
        and share > 0
        and (share >= 1 or canary_bucket(rollout.id, key(request, principal)) < share)
    ):
        return rollout.challenger, model
    return model, rollout.challenger


def load_challenger(
    client: MlflowClient, model_name: str, version: str, in_force: LoadedModel
) -> LoadedModel | RefusedSwap:
    """Blocking download of a rollout's challenger; refused when it breaks the serving contract of
    the champion this replica serves (requests the champion accepts must reach either version)."""
    mv = client.get_model_version(model_name, version)
    candidate = load_version(client, model_name, version, mv.run_id)
    changes = contract_changes(in_force.predictor.schema, candidate.predictor.schema)
    if changes:
        return RefusedSwap(
            version, f"breaks the contract of version {in_force.version}: {'; '.join(changes)}", time.time()
        )
    return candidate


def _serving(record: RolloutRecord, challenger: LoadedModel) -> ServingRollout:
    return ServingRollout(record.id, record.kind, record.champion_version, record.share, challenger)


class RolloutFollower:
    """One per replica: applies the rollout service's active shadow/canary records to every model
    the replica serves (`ChampionModel.rollout`)."""

    def __init__(self, store: RolloutStore, fleet: ModelFleet, metrics: RolloutMetrics) -> None:
        self.store = store
        self.fleet = fleet
        self.metrics = metrics
        self.last_error: str | None = None
        self._last_read = time.monotonic()
        # Challengers refused by model: not downloaded again while their rollout lasts.
        self._refused: dict[str, RefusedSwap] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.store.close()

    @property
    def interval_s(self) -> float:
        return self.fleet.default.poll_interval_s

    @property
    def _read_timeout_s(self) -> float:
        return max(2 * self.interval_s, 5.0)

    async def _run(self) -> None:
        await self._prepare()
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the following for the replica's life
                log.exception("following the rollout records failed; trying again next poll")
            await asyncio.sleep(self.interval_s)

    async def _prepare(self) -> None:
        """Connect and bring the rollout tables up to date (replicas may start before the service
        first ran); retried in the background, so that serving never waits for it."""
        await self.store.open()
        delay = self.interval_s
        while True:
            try:
                await self.store.migrate()
                return
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def refresh(self) -> None:
        """One look at the records: drop ended rollouts and update shares at once, then load any
        new challenger (one download at a time; the models already served are not held up)."""
        try:
            records = await asyncio.wait_for(self.store.serving_rollouts(), self._read_timeout_s)
        except Exception as exc:
            self._failed(exc)
            return
        if self.last_error is not None:
            log.info("rollout records readable again")
            self.last_error = None
        self._last_read = time.monotonic()
        by_model = {r.model_name: r for r in records if r.active and r.kind in ("shadow", "canary")}
        for champion in self.fleet.served():
            ended = champion.rollout
            if ended is not None and champion.model_name not in by_model and await self._may_be_champion(ended):
                # Ended in a promotion (or by other hands): follow the alias now, with the
                # challenger still in memory, rather than at the next alias poll (a canary's
                # callers would flip back to the old champion meanwhile). A rejected challenger
                # is dropped below at once, however slow or far away the registry is.
                await champion.refresh()
        to_load = [c for c in self.fleet.served() if not self.apply(c, by_model.get(c.model_name))]
        for champion in to_load:
            await self._load(champion, by_model[champion.model_name])
        self.report()

    async def _may_be_champion(self, ended: ServingRollout) -> bool:
        """Whether the alias may now name the challenger of a rollout that is no longer active: it
        was promoted, or ended by other hands. False when it was rejected or its end cannot be
        read: the champion it was compared with, which answered the rest all along, then answers
        everyone."""
        try:
            record = await asyncio.wait_for(self.store.get(ended.id), self._read_timeout_s)
        except Exception as exc:
            log.warning(
                "rollout %d of version %s: how it ended is not readable (%s: %s); the champion answers everything",
                ended.id,
                ended.challenger.version,
                type(exc).__name__,
                exc,
            )
            return False
        return record is not None and record.state in (RolloutState.PROMOTED, RolloutState.ENDED)

    def apply(self, champion: ChampionModel, record: RolloutRecord | None) -> bool:
        """Follow `record` (None: no active rollout) where no download is needed; False when its
        challenger must be loaded first."""
        current = champion.rollout
        if record is None:
            self._refused.pop(champion.model_name, None)
            if current is not None:
                champion.rollout = None
                log.info(
                    "rollout %d of %s is over: challenger version %s unloaded",
                    current.id,
                    champion.model_name,
                    current.challenger.version,
                )
            return True
        if current is not None and current.challenger.version == record.challenger_version:
            updated = _serving(record, current.challenger)
            if updated != current:
                champion.rollout = updated
                log.info(
                    "rollout %d of %s: %s, challenger %s answers %.0f%% of the traffic",
                    record.id,
                    champion.model_name,
                    record.kind,
                    record.challenger_version,
                    100 * record.share if record.kind == "canary" else 0,
                )
            return True
        # Another challenger (or none yet): the previous one stops answering at once.
        champion.rollout = None
        refused = self._refused.get(champion.model_name)
        if refused is not None and refused.version == record.challenger_version:
            return True
        return champion.loaded is None  # loaded once the champion is

    async def _load(self, champion: ChampionModel, record: RolloutRecord) -> None:
        in_force = champion.loaded
        if in_force is None:
            return
        try:
            loaded = await asyncio.to_thread(
                load_challenger, champion.registry, champion.model_name, record.challenger_version, in_force
            )
        except Exception as exc:  # the registry or the artifact store: tried again next poll
            log.warning(
                "challenger version %s of %s not loaded yet: %s: %s",
                record.challenger_version,
                champion.model_name,
                type(exc).__name__,
                exc,
            )
            return
        if isinstance(loaded, RefusedSwap):
            self._refused[champion.model_name] = loaded
            self.metrics.challengers_refused.inc(tags={"model": champion.model_name})
            log.error(
                "rollout %d of %s: not loading challenger version %s, it %s; the champion answers everything",
                record.id,
                champion.model_name,
                loaded.version,
                loaded.reason,
                extra={"model_version": loaded.version},
            )
            return
        champion.rollout = _serving(record, loaded)
        log.info(
            "rollout %d of %s: %s challenger version %s loaded next to champion %s",
            record.id,
            champion.model_name,
            record.kind,
            loaded.version,
            record.champion_version,
            extra={"model_version": loaded.version, "run_id": loaded.run_id},
        )

    def _failed(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if error != self.last_error:
            log.warning("rollout records not readable: %s", error)
        self.last_error = error
        stale_after = max(STALE_AFTER_POLLS * self.interval_s, STALE_AFTER_MIN_S)
        if time.monotonic() - self._last_read > stale_after:
            for champion in self.fleet.served():
                if champion.rollout is not None:
                    log.warning(
                        "rollout %d of %s: records unreadable for %.0f s; the champion answers everything",
                        champion.rollout.id,
                        champion.model_name,
                        stale_after,
                    )
                    champion.rollout = None
        self.report()

    def report(self) -> None:
        """Set every poll: Ray's metrics agent drops a gauge not reported for two export intervals."""
        for champion in self.fleet.served():
            rollout = champion.rollout
            version = rollout.challenger.version if rollout is not None else "0"
            self.metrics.challenger_version.set(
                int(version) if version.isdigit() else -1, tags={"model": champion.model_name}
            )
        self.metrics.report()

    async def overview(self, model_name: str) -> RolloutOverview:
        return await asyncio.wait_for(self.store.overview(model_name), OVERVIEW_WAIT_S)
