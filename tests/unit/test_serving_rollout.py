"""The serving side of a rollout, without Ray or a database: the canary's stable hash and its
request key, which version answers and which scores the mirror, the joined batch with a
challenger in it, the bounded mirror queue, the recorder's shadow buffer, and how a replica
follows the rollout service's records."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest
import torch
from fastapi.testclient import TestClient
from starlette.requests import Request

from core.health import wait_until
from core.keys import KeyStore, Principal, Scope, bootstrap_principals, hash_api_key, key_id_of
from core.settings import Settings
from jobs.config import DataConfig, JobConfig
from jobs.predictor import TabularPredictor
from serve_apps import rollout as rollout_module
from serve_apps import shadow as shadow_module
from serve_apps.api import create_api
from serve_apps.champion import ChampionModel, LoadedModel, RefusedSwap, ServingRollout
from serve_apps.fleet import ModelFleet, Routed, predict_by_model
from serve_apps.metrics import IngressMetrics, RolloutMetrics
from serve_apps.replica import Replica
from serve_apps.rollout import RolloutFollower, canary_bucket, canary_key, route
from serve_apps.shadow import Mirror, ShadowScorer
from serve_apps.validation import RowValidator
from services.feedback.recorder import PredictionRecorder
from services.feedback.store import PredictionRow, ShadowRow
from services.rollout.models import RolloutOverview, RolloutRecord, RolloutState
from tests.predictors import untrained_predictor

pytestmark = pytest.mark.unit

ROW = {"age": 39, "sex": "Male"}
NOW = datetime(2025, 1, 1, tzinfo=UTC)
# A registry address nothing listens on: these tests never reach it.
NO_REGISTRY = "http://127.0.0.1:9"


def _predictor(seed: int) -> TabularPredictor:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.integers(18, 80, 200), "sex": rng.choice(["Female", "Male"], 200)})
    frame["income"] = np.where(frame["age"] > 45, ">50K", "<=50K")
    torch.manual_seed(seed)  # distinct weights per version: their answers differ
    return untrained_predictor(frame, JobConfig(name="income", data=DataConfig(train_uri="memory", target="income")))


def _loaded(version: str, predictor: TabularPredictor | None = None) -> LoadedModel:
    predictor = predictor or _predictor(int(version))
    return LoadedModel("income", version, f"run-{version}", predictor, RowValidator(predictor.schema), 0.0)


@pytest.fixture(scope="module")
def champion_v1() -> LoadedModel:
    return _loaded("1")


@pytest.fixture(scope="module")
def challenger_v2() -> LoadedModel:
    return _loaded("2")


class OfflineChampion(ChampionModel):
    """A champion whose alias polls are counted, not sent: the registry is not there."""

    refreshed = 0

    async def refresh(self) -> str | None:
        self.refreshed += 1
        return self.loaded.version if self.loaded else None


def _champion(loaded: LoadedModel | None) -> OfflineChampion:
    champion = OfflineChampion("income", "champion", NO_REGISTRY, poll_interval_s=60)
    champion.loaded = loaded
    return champion


def _record(
    id_: int = 7, kind: str = "canary", share: float = 0.25, champion: str = "1", challenger: str = "2", **extra: Any
) -> RolloutRecord:
    return RolloutRecord.model_validate(
        {
            "id": id_,
            "model_name": "income",
            "kind": kind,
            "state": RolloutState.ACTIVE,
            "champion_version": champion,
            "challenger_version": challenger,
            "share": share,
            "started_at": NOW,
            "step_started_at": NOW,
            **extra,
        }
    )


def _request(headers: dict[str, str] | None = None, request_id: str = "rid-1") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "headers": raw, "state": {"request_id": request_id}})


PRINCIPAL = Principal("key-a", "a", frozenset({Scope.PREDICT}))

# --- the canary's hash and key -------------------------------------------------------------------


def test_the_bucket_is_a_stable_documented_hash():
    import hashlib

    digest = hashlib.blake2b(b"7:key-a", digest_size=8).digest()
    assert canary_bucket(7, "key-a") == int.from_bytes(digest, "big") / 2**64
    assert canary_bucket(7, "key-a") == canary_bucket(7, "key-a")
    assert canary_bucket(7, "key-a") != canary_bucket(8, "key-a")  # each rollout draws its own callers
    buckets = [canary_bucket(7, f"key-{i}") for i in range(5000)]
    assert all(0 <= b < 1 for b in buckets)
    # Spread evenly: the share of callers below a threshold is about the threshold.
    for share in (0.05, 0.25, 0.5):
        assert abs(sum(b < share for b in buckets) / len(buckets) - share) < 0.03


def test_a_larger_share_only_adds_callers_to_the_challenger(champion_v1, challenger_v2):
    keys = [f"key-{i}" for i in range(2000)]
    previous: set[str] = set()
    for share in (0.0, 0.05, 0.25, 0.5, 1.0):
        rollout = ServingRollout(7, "canary", "1", share, challenger_v2)
        to_challenger = {
            k
            for k in keys
            if route(rollout, champion_v1, canary_key("api_key"), _request(), Principal(k, k, frozenset()))[0]
            is challenger_v2
        }
        assert previous <= to_challenger
        previous = to_challenger
    assert previous == set(keys)


def test_the_canary_key_is_the_api_key_the_request_id_or_a_header():
    request = _request({"X-User-Id": "user-9"}, request_id="rid-42")
    assert canary_key("api_key")(request, PRINCIPAL) == "key-a"
    assert canary_key("request_id")(request, PRINCIPAL) == "rid-42"
    assert canary_key("header:X-User-Id")(request, PRINCIPAL) == "user-9"
    assert canary_key("header:x-user-id")(request, PRINCIPAL) == "user-9"  # headers ignore case
    # A request without the header falls back to its API key's id.
    assert canary_key("header:X-User-Id")(_request(), PRINCIPAL) == "key-a"
    with pytest.raises(ValueError, match="unknown canary key"):
        canary_key("cookie:x")


# --- which version answers ---------------------------------------------------------------------


def test_a_shadow_challenger_never_answers_and_scores_every_mirror(champion_v1, challenger_v2):
    rollout = ServingRollout(7, "shadow", "1", 0.0, challenger_v2)
    assert route(rollout, champion_v1, canary_key("api_key"), _request(), PRINCIPAL) == (champion_v1, challenger_v2)


def test_a_canary_routes_by_share_and_mirrors_to_the_other_version(champion_v1, challenger_v2):
    key = canary_key("api_key")
    bucket = canary_bucket(7, "key-a")
    below = ServingRollout(7, "canary", "1", min(bucket + 0.01, 1.0), challenger_v2)
    above = ServingRollout(7, "canary", "1", bucket, challenger_v2)  # the bucket is not below its own value
    assert route(below, champion_v1, key, _request(), PRINCIPAL) == (challenger_v2, champion_v1)
    assert route(above, champion_v1, key, _request(), PRINCIPAL) == (champion_v1, challenger_v2)
    everyone = ServingRollout(7, "canary", "1", 1.0, challenger_v2)
    assert route(everyone, champion_v1, key, _request(), PRINCIPAL) == (challenger_v2, champion_v1)


def test_a_replica_serving_another_champion_neither_routes_nor_mirrors(challenger_v2):
    other_champion = _loaded("3")
    rollout = ServingRollout(7, "canary", "1", 1.0, challenger_v2)
    assert route(rollout, other_champion, canary_key("api_key"), _request(), PRINCIPAL) == (other_champion, None)


# --- the joined batch --------------------------------------------------------------------------


class CountingPredictor:
    """A predictor's stand-in that counts model calls and their rows."""

    def __init__(self, inner: TabularPredictor) -> None:
        self.inner = inner
        self.schema = inner.schema
        self.calls: list[int] = []

    def record_outputs(self, rows: list[dict[str, Any]]) -> np.ndarray:
        self.calls.append(len(rows))
        return self.inner.record_outputs(rows)


def test_a_joined_batch_makes_one_call_per_version_and_keeps_the_order():
    v1, v2 = CountingPredictor(_predictor(1)), CountingPredictor(_predictor(2))
    champion_model = _loaded("1", v1)  # type: ignore[arg-type]
    challenger_model = _loaded("2", v2)  # type: ignore[arg-type]
    champion = _champion(champion_model)
    rows = [{"age": a, "sex": "Female"} for a in (20, 30, 40, 50, 60, 70)]
    batch = [
        Routed(champion, champion_model, rows[0:1]),
        Routed(champion, challenger_model, rows[1:3]),
        Routed(champion, champion_model, rows[3:4]),
        Routed(champion, challenger_model, rows[4:6]),
    ]
    results = predict_by_model(batch)
    assert [r.model.version for r in results] == ["1", "2", "1", "2"]
    assert [len(r.predictions) for r in results] == [1, 2, 1, 2]
    assert v1.calls == [2] and v2.calls == [4]
    # The same answers as each version alone.
    alone = champion.predict([rows[1:3]], challenger_model)[0].predictions
    assert results[1].predictions == alone
    assert results[0].predictions != champion.predict([rows[0:1]], challenger_model)[0].predictions


def test_a_batch_of_one_version_is_one_call(champion_v1):
    champion = _champion(champion_v1)
    results = predict_by_model([Routed(champion, champion_v1, [ROW]), Routed(champion, champion_v1, [ROW, ROW])])
    assert [len(r.predictions) for r in results] == [1, 2] and all(r.model is champion_v1 for r in results)


# --- the mirror queue --------------------------------------------------------------------------


class CountedMetrics(RolloutMetrics):
    """The replica's rollout metrics, with what they handed to Ray's counters kept for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.shadow: dict[tuple[str, str], int] = {}
        self.canary: dict[tuple[str, str], int] = {}
        self.shadow_requests.inc = self._counter(self.shadow, "outcome")  # type: ignore[method-assign]
        self.canary_requests.inc = self._counter(self.canary, "model_version")  # type: ignore[method-assign]

    @staticmethod
    def _counter(into: dict[tuple[str, str], int], label: str) -> Any:
        def inc(value: float = 1.0, tags: dict[str, str] | None = None) -> None:
            assert tags is not None
            key = (tags["model"], tags[label])
            into[key] = into.get(key, 0) + int(value)

        return inc

    def counts(self) -> dict[tuple[str, str], int]:
        """Mirrored requests by (model, outcome), as reported so far."""
        self.report()
        return self.shadow


def _mirror(model: LoadedModel, i: int, rows: int = 1) -> Mirror:
    return Mirror(7, model, f"req-{i}", [{"age": 20 + i, "sex": "Male"}] * rows)


def test_a_full_mirror_queue_drops_and_counts_and_never_waits():
    predictor = CountingPredictor(_predictor(2))
    challenger = _loaded("2", predictor)  # type: ignore[arg-type]
    recorded: list[ShadowRow] = []
    metrics = CountedMetrics()

    async def scenario() -> None:
        scorer = ShadowScorer(max_requests=3, batch_rows=2, record=recorded.extend, metrics=metrics)
        accepted = [scorer.offer(_mirror(challenger, i)) for i in range(3)]
        await asyncio.sleep(0)  # the worker takes the first batch and lets requests in before its model call
        # Offers return at once, whatever the worker is doing; beyond the bound they are dropped.
        accepted += [scorer.offer(_mirror(challenger, i)) for i in range(3, 8)]
        assert accepted == [True] * 5 + [False] * 3
        assert metrics.counts() == {("income", "dropped"): 3}
        await asyncio.wait_for(_until(lambda: not scorer.queued and len(recorded) == 5), 5)
        await scorer.close()

    asyncio.run(scenario())
    assert metrics.counts() == {("income", "dropped"): 3, ("income", "scored"): 5}
    # Batches of at most two rows, oldest first; every scored row is the challenger's, never a client's.
    assert max(predictor.calls) <= 2 and sum(predictor.calls) == 5
    assert [r.request_id for r in recorded] == [f"req-{i}" for i in range(5)]
    assert {(r.model_version, r.rollout_id, r.row_index) for r in recorded} == {("2", 7, 0)}
    assert all(r.label in {"<=50K", ">50K"} and r.output and "probabilities" in r.output for r in recorded)


def test_a_request_larger_than_a_batch_is_scored_in_several_calls_with_requests_between():
    events: list[str] = []

    class Logged(CountingPredictor):
        def record_outputs(self, rows: list[dict[str, Any]]) -> np.ndarray:
            events.append(f"model call of {len(rows)}")
            return super().record_outputs(rows)

    predictor = Logged(_predictor(2))
    challenger = _loaded("2", predictor)  # type: ignore[arg-type]
    recorded: list[ShadowRow] = []

    async def requests_arriving() -> None:
        while True:
            events.append("request")
            await asyncio.sleep(0)

    async def scenario() -> None:
        scorer = ShadowScorer(max_requests=4, batch_rows=2, record=recorded.extend, metrics=CountedMetrics())
        scorer.offer(_mirror(challenger, 0, rows=5))
        arriving = asyncio.get_running_loop().create_task(requests_arriving())
        await asyncio.wait_for(_until(lambda: len(recorded) == 5), 5)
        arriving.cancel()
        await scorer.close()

    asyncio.run(scenario())
    assert predictor.calls == [2, 2, 1]
    assert [r.row_index for r in recorded] == [0, 1, 2, 3, 4]
    # The event loop served others between the model calls: no two calls back to back.
    calls = [i for i, event in enumerate(events) if event.startswith("model call")]
    assert len(calls) == 3 and all(b - a > 1 for a, b in itertools.pairwise(calls))


def test_single_row_mirrors_gather_into_one_model_call(monkeypatch):
    predictor = CountingPredictor(_predictor(2))
    challenger = _loaded("2", predictor)  # type: ignore[arg-type]
    recorded: list[ShadowRow] = []
    # Long enough that only a full batch can have woken the worker in time.
    monkeypatch.setattr(shadow_module, "GATHER_S", 30.0)

    async def scenario() -> None:
        scorer = ShadowScorer(max_requests=16, batch_rows=4, record=recorded.extend, metrics=CountedMetrics())
        for i in range(4):
            scorer.offer(_mirror(challenger, i))
            await asyncio.sleep(0)  # the worker is awake and waiting for the batch to fill
        await asyncio.wait_for(_until(lambda: len(recorded) == 4), 5)
        await scorer.close()

    asyncio.run(scenario())
    assert predictor.calls == [4]


def test_a_half_full_queue_is_scored_without_waiting_for_a_full_batch(monkeypatch):
    predictor = CountingPredictor(_predictor(2))
    challenger = _loaded("2", predictor)  # type: ignore[arg-type]
    recorded: list[ShadowRow] = []
    monkeypatch.setattr(shadow_module, "GATHER_S", 30.0)

    async def scenario() -> None:
        # Room for more mirrors while the worker scores: it does not wait for the queue to fill.
        scorer = ShadowScorer(max_requests=4, batch_rows=256, record=recorded.extend, metrics=CountedMetrics())
        for i in range(2):
            scorer.offer(_mirror(challenger, i))
            await asyncio.sleep(0)
        await asyncio.wait_for(_until(lambda: len(recorded) == 2), 5)
        await scorer.close()

    asyncio.run(scenario())
    assert predictor.calls == [2]


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


class BrokenPredictor(CountingPredictor):
    def record_outputs(self, rows: list[dict[str, Any]]) -> np.ndarray:
        raise RuntimeError("the challenger cannot score this")


def test_a_failing_model_call_is_counted_and_the_worker_goes_on(champion_v1):
    broken = _loaded("2", BrokenPredictor(_predictor(2)))  # type: ignore[arg-type]
    recorded: list[ShadowRow] = []
    metrics = CountedMetrics()

    async def scenario() -> None:
        scorer = ShadowScorer(max_requests=8, batch_rows=8, record=recorded.extend, metrics=metrics)
        # A canary mirrors both ways: one batch, a call per version; one failing spares the other.
        scorer.offer(_mirror(broken, 0))
        scorer.offer(_mirror(champion_v1, 1))
        while len(recorded) < 1 or metrics.counts().get(("income", "failed"), 0) < 1:
            await asyncio.sleep(0.01)
        await scorer.close()

    asyncio.run(scenario())
    assert metrics.counts() == {("income", "failed"): 1, ("income", "scored"): 1}
    assert [(r.request_id, r.model_version) for r in recorded] == [("req-1", "1")]


def test_closing_stops_the_worker_and_counts_what_was_left():
    metrics = CountedMetrics()
    predictor = CountingPredictor(_predictor(2))
    challenger = _loaded("2", predictor)  # type: ignore[arg-type]
    recorded: list[ShadowRow] = []

    async def scenario() -> ShadowScorer:
        scorer = ShadowScorer(max_requests=8, batch_rows=1, record=recorded.extend, metrics=metrics)
        for i in range(3):
            scorer.offer(_mirror(challenger, i))
        await asyncio.sleep(0)  # one taken, waiting for its turn; two queued
        await scorer.close()
        return scorer

    scorer = asyncio.run(scenario())
    assert scorer.queued == 0 and scorer._task is None and not recorded and not predictor.calls
    assert metrics.counts() == {("income", "dropped"): 3}


# --- the recorder's shadow buffer --------------------------------------------------------------


class FakeFeedbackStore:
    def __init__(self) -> None:
        self.predictions: list[PredictionRow] = []
        self.shadow: list[ShadowRow] = []
        self.shadow_fails = False

    async def record_predictions(self, rows: list[PredictionRow]) -> None:
        self.predictions.extend(rows)

    async def record_shadow_predictions(self, rows: list[ShadowRow]) -> None:
        if self.shadow_fails:
            raise psycopg.OperationalError("server away")
        self.shadow.extend(rows)

    async def close(self) -> None:
        pass


def _shadow_row(i: int) -> ShadowRow:
    return ShadowRow(f"req-{i}", 0, "income", "2", ">50K", 0.7, {"probabilities": {">50K": 0.7}}, 7)


def test_the_recorder_bounds_its_shadow_buffer_and_flushes_it_with_the_predictions():
    store = FakeFeedbackStore()
    dropped: list[int] = []
    recorder = PredictionRecorder(store, 1.0, max_rows=3, on_dropped=dropped.append)  # type: ignore[arg-type]
    recorder.record([PredictionRow("req-0", 0, "income", "1", "<=50K", 0.6, ROW)])
    recorder.record_shadow([_shadow_row(i) for i in range(5)])
    assert dropped == [2] and recorder.pending == 4  # the oldest shadow rows went; predictions kept
    store.shadow_fails = True
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(recorder.flush())
    # Predictions written once; the shadow rows wait, in order, for the next flush.
    assert len(store.predictions) == 1 and recorder.pending == 3
    store.shadow_fails = False
    asyncio.run(recorder.flush())
    assert [r.request_id for r in store.shadow] == ["req-2", "req-3", "req-4"]
    assert len(store.predictions) == 1 and recorder.pending == 0


# --- following the rollout service -------------------------------------------------------------


class FakeRolloutStore:
    def __init__(self) -> None:
        self.records: list[RolloutRecord] = []
        self.fails: Exception | None = None
        self.closed = False

    async def serving_rollouts(self) -> list[RolloutRecord]:
        if self.fails is not None:
            raise self.fails
        return list(self.records)

    async def get(self, rollout_id: int) -> RolloutRecord | None:
        if self.fails is not None:
            raise self.fails
        return next((r for r in self.records if r.id == rollout_id), None)

    async def overview(self, model_name: str) -> RolloutOverview:
        if self.fails is not None:
            raise self.fails
        active = [r for r in self.records if r.model_name == model_name]
        return RolloutOverview(rollout=active[0] if active else None)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, challenger_v2: LoadedModel) -> Iterator[list[str]]:
    """The challenger downloads the follower makes (versions), answered from memory; version 9
    breaks the champion's contract."""
    made: list[str] = []

    def load(client: Any, model_name: str, version: str, in_force: LoadedModel) -> LoadedModel | RefusedSwap:
        made.append(version)
        if version == "9":
            return RefusedSwap("9", "breaks the contract of version 1: the target changed", 0.0)
        return challenger_v2 if version == "2" else _loaded(version)

    monkeypatch.setattr(rollout_module, "load_challenger", load)
    yield made


def _follower(champion: ChampionModel) -> tuple[RolloutFollower, FakeRolloutStore]:
    store = FakeRolloutStore()
    fleet = ModelFleet(champion, lambda name: _champion(None), max_models=4)
    return RolloutFollower(store, fleet, CountedMetrics()), store  # type: ignore[arg-type]


def test_the_follower_loads_updates_and_drops_the_challenger(champion_v1, challenger_v2, loads):
    champion = _champion(champion_v1)
    follower, store = _follower(champion)

    async def scenario() -> None:
        await follower.refresh()
        assert champion.rollout is None and loads == []
        store.records = [_record(share=0.05)]
        await follower.refresh()
        assert champion.rollout == ServingRollout(7, "canary", "1", 0.05, challenger_v2)
        # The next step: the share changes, the challenger is not downloaded again.
        store.records = [_record(share=0.25, step=1)]
        await follower.refresh()
        assert champion.rollout is not None and champion.rollout.share == 0.25 and loads == ["2"]
        # Records of other models and ended rollouts are not this model's.
        store.records = [_record(state=RolloutState.REJECTED), _record(id_=8, model_name="other")]
        await follower.refresh()
        assert champion.rollout is None
        # Rejected: dropped without asking the registry where the alias points.
        assert champion.refreshed == 0
        # A new rollout with another challenger replaces the old one.
        store.records = [_record(id_=9, kind="shadow", share=0.0, challenger="2")]
        await follower.refresh()
        store.records = [_record(id_=10, kind="shadow", share=0.0, challenger="3")]
        await follower.refresh()
        assert champion.rollout is not None and champion.rollout.challenger.version == "3"
        assert loads == ["2", "2", "3"]

    asyncio.run(scenario())


class HangingChampion(OfflineChampion):
    """A champion whose registry never answers an alias poll, noting what it served meanwhile."""

    seen_during_refresh: ServingRollout | None = None

    async def refresh(self) -> str | None:
        self.refreshed += 1
        self.seen_during_refresh = self.rollout
        await asyncio.sleep(3600)
        return None


def _hanging(loaded: LoadedModel) -> HangingChampion:
    champion = HangingChampion("income", "champion", NO_REGISTRY, poll_interval_s=60)
    champion.loaded = loaded
    return champion


@pytest.mark.parametrize("ending", ["rejected", "unreadable", "gone"])
def test_a_rejected_canary_stops_answering_at_once_whatever_the_registry_does(champion_v1, loads, ending):
    """Fail closed: the service's rejection reaches the callers at the next poll even while the
    registry hangs, and so does a rollout whose end cannot be read (or whose record is gone)."""
    champion = _hanging(champion_v1)
    follower, store = _follower(champion)
    store.records = [_record(share=0.5)]

    async def scenario() -> None:
        await follower.refresh()
        assert champion.rollout is not None
        store.records = [_record(state=RolloutState.REJECTED)] if ending != "gone" else []
        if ending == "unreadable":
            store.get = _failing_get  # type: ignore[method-assign]
        await asyncio.wait_for(follower.refresh(), 5)
        assert champion.rollout is None and champion.refreshed == 0

    asyncio.run(scenario())


async def _failing_get(rollout_id: int) -> RolloutRecord | None:
    raise psycopg.OperationalError("server away")


@pytest.mark.parametrize("state", [RolloutState.PROMOTED, RolloutState.ENDED])
def test_a_promoted_challenger_is_followed_by_the_alias_before_it_is_dropped(champion_v1, loads, state):
    """Promoted (or ended by other hands): the alias is asked for before the challenger is dropped,
    so that its callers do not flip back to the old champion in between."""
    champion = _champion(champion_v1)
    follower, store = _follower(champion)
    store.records = [_record(share=0.5)]

    async def scenario() -> None:
        await follower.refresh()
        store.records = [_record(state=state)]
        await follower.refresh()

    asyncio.run(scenario())
    assert champion.refreshed == 1 and champion.rollout is None


def test_the_promoted_challenger_is_in_memory_while_the_alias_is_asked_for(champion_v1, challenger_v2, loads):
    champion = _hanging(champion_v1)
    follower, store = _follower(champion)
    store.records = [_record(share=0.5)]

    async def scenario() -> None:
        await follower.refresh()
        store.records = [_record(state=RolloutState.PROMOTED)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(follower.refresh(), 0.5)

    asyncio.run(scenario())
    assert champion.refreshed == 1
    assert champion.seen_during_refresh is not None and champion.seen_during_refresh.challenger is challenger_v2


def test_a_challenger_that_breaks_the_contract_is_refused_once(champion_v1, loads):
    champion = _champion(champion_v1)
    follower, store = _follower(champion)
    store.records = [_record(challenger="9")]

    async def scenario() -> None:
        for _ in range(3):
            await follower.refresh()
        assert champion.rollout is None and loads == ["9"]
        # Its rollout over, a later rollout of the same version is looked at again.
        store.records = []
        await follower.refresh()
        store.records = [_record(id_=8, challenger="9")]
        await follower.refresh()
        assert loads == ["9", "9"]

    asyncio.run(scenario())


def test_no_challenger_is_loaded_before_the_champion(loads):
    champion = _champion(None)
    follower, store = _follower(champion)
    store.records = [_record()]
    asyncio.run(follower.refresh())
    assert champion.rollout is None and loads == []


def test_unreadable_records_keep_the_rollout_until_they_are_stale(champion_v1, loads, monkeypatch):
    champion = _champion(champion_v1)
    follower, store = _follower(champion)
    store.records = [_record(share=0.5)]

    async def scenario() -> None:
        await follower.refresh()
        store.fails = psycopg.OperationalError("server away")
        await follower.refresh()
        assert champion.rollout is not None and follower.last_error is not None
        follower._last_read -= 3600  # no read for an hour: the replica cannot tell what the service decided
        await follower.refresh()
        assert champion.rollout is None
        store.fails = None
        await follower.refresh()
        assert champion.rollout is not None and follower.last_error is None

    asyncio.run(scenario())


# --- the API -----------------------------------------------------------------------------------

KEY_A, KEY_B = "key-for-a", "key-for-b"


def _settings(**rollout: Any) -> Settings:
    return Settings(_env_file=None, database={"url": "postgresql://nobody@127.0.0.1:1/none"}, rollout=rollout)


def _replica(champion: ChampionModel, settings: Settings, store: FakeFeedbackStore | None = None) -> Replica:
    async def predict_batch(item: Routed) -> Any:
        return predict_by_model([item])[0]

    replica = Replica(
        settings=settings,
        fleet=ModelFleet(champion, lambda name: _champion(None), 4),
        metrics=IngressMetrics(),
        predict_batch=predict_batch,
        max_rows=100,
        rollout_metrics=CountedMetrics(),
    )
    replica._recorder = PredictionRecorder(store or FakeFeedbackStore(), 60.0, 1000)  # type: ignore[arg-type]
    return replica


def _client(replica: Replica) -> TestClient:
    app = create_api()
    app.state.key_store = KeyStore(bootstrap_principals([hash_api_key(KEY_A), hash_api_key(KEY_B)]))
    app.state.alert_token_store = None
    app.state.replica = replica
    return TestClient(app)


def test_a_canary_answers_each_caller_with_one_version_and_mirrors_to_the_other(champion_v1, challenger_v2):
    # A share between the two keys' buckets: the lower one gets the challenger, the other the champion.
    lower, higher = sorted((KEY_A, KEY_B), key=lambda k: canary_bucket(7, key_id_of(hash_api_key(k))))
    share = sum(canary_bucket(7, key_id_of(hash_api_key(k))) for k in (KEY_A, KEY_B)) / 2
    champion = _champion(champion_v1)
    champion.rollout = ServingRollout(7, "canary", "1", share, challenger_v2)
    store = FakeFeedbackStore()
    replica = _replica(champion, _settings(), store)
    metrics = replica.rollout_metrics
    assert isinstance(metrics, CountedMetrics)
    with _client(replica) as client:
        answered = {
            key: {
                client.post("/v1/predict", json={"instances": [ROW]}, headers={"X-API-Key": key}).json()["model"][
                    "version"
                ]
                for _ in range(5)
            }
            for key in (KEY_A, KEY_B)
        }
        assert answered == {lower: {"2"}, higher: {"1"}}
        recorder = replica._recorder
        assert recorder is not None
        assert wait_until(lambda: len(recorder._shadow) == 10, 10)
        # Shutdown: the worker stops, the counts are reported, the buffers reach the store.
        assert client.portal is not None
        client.portal.call(replica.close)
    served = {r.request_id: r.model_version for r in store.predictions}
    mirrored = {r.request_id: r.model_version for r in store.shadow}
    assert served.keys() == mirrored.keys() and len(served) == 10
    assert all({served[rid], mirrored[rid]} == {"1", "2"} for rid in served)
    assert all(r.rollout_id == 7 for r in store.shadow)
    assert metrics.canary == {("income", "1"): 5, ("income", "2"): 5}
    assert metrics.shadow == {("income", "scored"): 10}


def test_without_a_rollout_nothing_is_mirrored(champion_v1):
    replica = _replica(_champion(champion_v1), _settings())
    with _client(replica) as client:
        body = client.post("/v1/predict", json={"instances": [ROW]}, headers={"X-API-Key": KEY_A}).json()
    assert body["model"]["version"] == "1"
    assert replica._shadow is None and replica._recorder is not None and replica._recorder.pending == 1


def test_the_model_shows_its_rollout_or_why_not(champion_v1):
    champion = _champion(champion_v1)
    follower, store = _follower(champion)
    store.records = [_record()]
    replica = _replica(champion, _settings())
    with _client(replica) as client:
        # No rollout service (no database, or ROLLOUT_ENABLED=false): null, no error.
        body = client.get("/v1/models/current", headers={"X-API-Key": KEY_A}).json()
        assert body["version"] == "1" and body["rollout"] is None and body["rollout_error"] is None
        replica._rollouts = follower
        body = client.get("/v1/models/income", headers={"X-API-Key": KEY_A}).json()
        assert body["rollout"]["rollout"]["challenger_version"] == "2" and body["rollout_error"] is None
        store.fails = psycopg.OperationalError("server away")
        body = client.get("/v1/models/current", headers={"X-API-Key": KEY_A}).json()
        assert body["rollout"] is None and "could not be read" in body["rollout_error"]
