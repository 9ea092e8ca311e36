"""A replica following a rollout, against a real MLflow registry (SQLite and a local artifact store,
in this process) and this machine's PostgreSQL: the rollout service's records (written here with
its store) make the replica load the challenger, route a canary's share by API key and mirror
every answered request to the other version; the rows reach `predictions` and
`shadow_predictions` paired, as the service judges them; a challenger that breaks the champion's
contract is never loaded; a rollout that ends takes the challenger out of the replica, and one
that ends in a promotion leaves it serving as the champion."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import mlflow
import numpy as np
import pandas as pd
import psycopg
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from cluster.sandbox import database_url, temporary_database
from core.health import wait_until
from core.keys import KeyStore, bootstrap_principals, hash_api_key, key_id_of
from core.settings import Settings
from jobs.config import DataConfig, JobConfig
from jobs.registry import log_and_register
from serve_apps.api import create_api
from serve_apps.champion import BatchResult, ChampionModel, load_version, poll_alias
from serve_apps.fleet import ModelFleet, Routed, predict_by_model
from serve_apps.metrics import IngressMetrics
from serve_apps.replica import Replica
from serve_apps.rollout import canary_bucket
from services.feedback.store import FeedbackStore
from services.rollout.models import RolloutState
from services.rollout.store import RolloutStore
from tests.predictors import untrained_predictor

pytestmark = pytest.mark.integration

MODEL = "rollout-income"
ALIAS = "champion"
ROW = {"age": 30, "sex": "Female"}
KEYS = ("rollout-key-a", "rollout-key-b")
T = TypeVar("T")


def _frame(target: str = "income") -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.integers(18, 80, 200), "sex": rng.choice(["Female", "Male"], 200)})
    frame[target] = np.where(frame["age"] > 45, ">50K", "<=50K")
    return frame


def _register(client: MlflowClient, target: str = "income") -> str:
    frame = _frame(target)
    config = JobConfig(name=MODEL, data=DataConfig(train_uri="memory", target=target))
    with mlflow.start_run():
        return str(log_and_register(untrained_predictor(frame, config), frame, MODEL, client).version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Version 1 the champion, 2 a compatible challenger, 3 one that predicts another target."""
    root = tmp_path_factory.mktemp("rollout")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("rollout", str(root / "artifacts")))
    client = MlflowClient(uri)
    assert [_register(client), _register(client), _register(client, target="salary")] == ["1", "2", "3"]
    client.set_registered_model_alias(MODEL, ALIAS, "1")
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def database() -> Iterator[str]:
    with temporary_database("serving_rollout") as name:
        yield database_url(name)


def _store_call(dsn: str, op: Callable[[RolloutStore], Awaitable[T]]) -> T:
    """One call on the rollout service's store, as the service would make it, on its own connection."""
    return asyncio.run(RolloutStore(dsn).run_once(op))


def _rows(dsn: str, table: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(r, v) for r, v in conn.execute(f"SELECT request_id, model_version FROM {table} ORDER BY request_id")]


def test_a_replica_routes_and_mirrors_as_the_rollout_records_say(registry, database):
    settings = Settings(_env_file=None, database={"url": database}, prediction={"flush_interval_s": 0.05})
    champion = ChampionModel(MODEL, ALIAS, registry, poll_interval_s=0.1)

    async def predict_batch(item: Routed) -> BatchResult:
        return predict_by_model([item])[0]

    replica = Replica(
        settings=settings,
        fleet=ModelFleet(champion, lambda name: champion, 4),
        metrics=IngressMetrics(),
        predict_batch=predict_batch,
        max_rows=100,
    )
    app = create_api()
    app.state.key_store = KeyStore(bootstrap_principals([hash_api_key(k) for k in KEYS]))
    app.state.alert_token_store = None
    app.state.replica = replica
    buckets = {key: canary_bucket(1, key_id_of(hash_api_key(key))) for key in KEYS}
    lower, higher = sorted(KEYS, key=buckets.__getitem__)

    def ask(client: TestClient, key: str) -> str:
        response = client.post(f"/v1/models/{MODEL}/predict", json={"instances": [ROW]}, headers={"X-API-Key": key})
        assert response.status_code == 200, response.text
        return str(response.json()["model"]["version"])

    with TestClient(app) as client:
        portal = client.portal
        assert portal is not None
        portal.call(champion.start)
        portal.call(replica.start_rollouts)
        since = datetime.now(UTC) - timedelta(seconds=5)
        canary = _store_call(
            database,
            lambda s: s.start(MODEL, "canary", "1", "2", share=sum(buckets.values()) / 2, message="canary step 1"),
        )
        assert canary is not None and canary.id == 1  # the id the buckets were drawn with
        assert wait_until(lambda: champion.rollout is not None, 30), replica._rollouts
        answered = {key: {ask(client, key) for _ in range(5)} for key in KEYS}
        # One caller, one version; the other version scored every one of its requests after the fact.
        assert answered == {lower: {"2"}, higher: {"1"}}
        recorder = replica._recorder
        assert recorder is not None and portal.call(recorder.wait_ready, 30.0)  # its tables exist
        served = lambda: _rows(database, "predictions")  # noqa: E731
        mirrored = lambda: _rows(database, "shadow_predictions")  # noqa: E731
        assert wait_until(lambda: len(mirrored()) == 10 and len(served()) == 10, 30)
        pairs = {rid: v for rid, v in served()}
        assert all({pairs[rid], version} == {"1", "2"} for rid, version in mirrored())
        figures = asyncio.run(FeedbackStore(database).run_once(lambda s: s.paired_figures(MODEL, "1", "2", since, 0.1)))
        assert figures.rows == 10 and figures.challenger_served_rows == 5
        # The API shows the rollout as the service recorded it.
        shown = client.get(f"/v1/models/{MODEL}", headers={"X-API-Key": KEYS[0]}).json()
        assert shown["rollout"]["rollout"]["id"] == 1 and shown["rollout"]["rollout"]["share"] > 0
        assert shown["rollout_error"] is None

        # Rejected: the challenger leaves the replica and the champion answers everyone.
        _store_call(database, lambda s: s.finish(1, RolloutState.REJECTED, "worse"))
        assert wait_until(lambda: champion.rollout is None, 30)
        assert {ask(client, key) for key in KEYS for _ in range(3)} == {"1"}

        # A challenger predicting another target is never loaded: no answer, no mirror from it.
        _store_call(database, lambda s: s.start(MODEL, "canary", "1", "3", share=1.0, message="canary"))
        follower = replica._rollouts
        assert follower is not None
        assert wait_until(lambda: MODEL in follower._refused, 30)
        assert champion.rollout is None and {ask(client, key) for key in KEYS} == {"1"}
        _store_call(database, lambda s: s.finish(2, RolloutState.ENDED, "the test moves on"))

        # Promoted at full share: the replica serves the challenger it holds, without a download.
        _store_call(database, lambda s: s.start(MODEL, "canary", "1", "2", share=1.0, message="canary"))
        assert wait_until(lambda: champion.rollout is not None, 30)
        held = champion.rollout.challenger if champion.rollout else None
        assert {ask(client, key) for key in KEYS} == {"2"}
        registry_client = MlflowClient(registry)
        registry_client.set_registered_model_alias(MODEL, ALIAS, "2")
        try:
            _store_call(database, lambda s: s.finish(3, RolloutState.PROMOTED, "better"))
            assert wait_until(lambda: champion.rollout is None and champion.loaded is held, 30)
            assert {ask(client, key) for key in KEYS} == {"2"}
        finally:
            registry_client.set_registered_model_alias(MODEL, ALIAS, "1")
        portal.call(replica.close)
    assert {version for _, version in mirrored()} == {"1", "2"}


def test_a_promoted_challenger_is_served_without_a_second_download(registry):
    client = MlflowClient(registry)
    current = load_version(client, MODEL, "1", client.get_model_version(MODEL, "1").run_id)
    challenger = load_version(client, MODEL, "2", client.get_model_version(MODEL, "2").run_id)
    client.set_registered_model_alias(MODEL, ALIAS, "2")
    try:
        poll = poll_alias(client, MODEL, ALIAS, current, None, preloaded=challenger)
        assert poll.model is challenger
        # Without it, the version the alias names is downloaded as before.
        fresh = poll_alias(client, MODEL, ALIAS, current, None)
        assert fresh.model is not None and fresh.model is not challenger and fresh.model.version == "2"
    finally:
        client.set_registered_model_alias(MODEL, ALIAS, "1")
