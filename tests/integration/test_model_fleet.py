"""The models one ingress replica serves, against a real MLflow registry (SQLite and a local
artifact store, in this process): any model with a champion alias is loaded on first use, other
names are unknown, the least recently used model makes room, and a joined batch of several models'
requests is answered by each request's own model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs.config import DataConfig, JobConfig
from jobs.registry import champion_version, log_and_register
from serve_apps.champion import ChampionModel
from serve_apps.fleet import (
    ModelFleet,
    ModelUnavailableError,
    Routed,
    UnknownModelError,
    aliased_models,
    predict_by_model,
)
from tests.failing_registry import failing_registry
from tests.predictors import untrained_predictor

pytestmark = pytest.mark.integration

ALIAS = "champion"
INCOME_ROW = {"age": 30, "sex": "Female"}
FLEET_ROW = {"mileage": 120000.0, "fuel": "diesel"}


def _register(client: MlflowClient, name: str) -> str:
    rng = np.random.default_rng(0)
    rows = 200
    if name == "income":
        frame = pd.DataFrame({"age": rng.integers(18, 80, rows), "sex": rng.choice(["Female", "Male"], rows)})
        frame["income"] = np.where(frame["age"] > 45, ">50K", "<=50K")
        target = "income"
    else:
        frame = pd.DataFrame({"mileage": rng.uniform(0, 3e5, rows), "fuel": rng.choice(["diesel", "petrol"], rows)})
        frame["risk"] = pd.cut(frame["mileage"], [-1, 1e5, 2e5, 4e5], labels=["low", "medium", "high"]).astype(str)
        target = "risk"
    config = JobConfig(name=name, data=DataConfig(train_uri="memory", target=target))
    with mlflow.start_run():
        version = str(log_and_register(untrained_predictor(frame, config), frame, name, client).version)
    client.set_registered_model_alias(name, ALIAS, version)
    return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fleet")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("fleet", str(root / "artifacts")))
    client = MlflowClient(uri)
    for name in ("income", "fleet-risk", "fleet-risk-2"):
        _register(client, name)
    client.create_registered_model("no-champion")  # registered, never promoted
    yield uri
    mlflow.set_tracking_uri(previous)


def _fleet(uri: str, max_models: int = 4) -> ModelFleet:
    def make(name: str) -> ChampionModel:
        return ChampionModel(name, ALIAS, uri, poll_interval_s=60)

    return ModelFleet(make("income"), make, max_models)


def test_the_registry_lists_the_models_with_a_champion(registry):
    listed = aliased_models(MlflowClient(registry), ALIAS)
    assert listed == [("fleet-risk", "1"), ("fleet-risk-2", "1"), ("income", "1")]


def test_a_model_with_a_champion_loads_on_first_use_and_other_names_are_unknown(registry):
    async def scenario() -> None:
        fleet = _fleet(registry)
        await fleet.default.start()
        try:
            # Concurrent first requests share one load.
            first, second = await asyncio.gather(fleet.get("fleet-risk"), fleet.get("fleet-risk"))
            assert first is second and first.loaded is not None and first.loaded.version == "1"
            assert first.loaded.predictor.schema.classes == ["high", "low", "medium"]
            assert await fleet.get("income") is fleet.default
            for name in ("no-such-model", "no-champion", "../income", ""):
                with pytest.raises(UnknownModelError, match="no registered model of that name has a 'champion'"):
                    await fleet.get(name)
            assert [c.model_name for c in fleet.served()] == ["income", "fleet-risk"]
        finally:
            fleet.stop()

    asyncio.run(scenario())


def test_the_least_recently_used_model_makes_room_but_never_the_default(registry):
    async def scenario() -> None:
        fleet = _fleet(registry, max_models=2)
        await fleet.default.start()
        try:
            risk = await fleet.get("fleet-risk")
            await fleet.get("fleet-risk-2")
            assert [c.model_name for c in fleet.served()] == ["income", "fleet-risk-2"]
            # The evicted model still answers the requests that hold it, and loads again on demand.
            assert risk.loaded is not None
            again = await fleet.get("fleet-risk")
            assert again is not risk and [c.model_name for c in fleet.served()] == ["income", "fleet-risk"]
        finally:
            fleet.stop()

    asyncio.run(scenario())


def test_a_joined_batch_is_answered_by_each_requests_own_model(registry):
    async def scenario() -> None:
        fleet = _fleet(registry)
        await fleet.default.start()
        try:
            income, risk = fleet.default, await fleet.get("fleet-risk")
            assert income.loaded is not None and risk.loaded is not None
            requests = [
                Routed(income, income.loaded, [INCOME_ROW]),
                Routed(risk, risk.loaded, [FLEET_ROW, FLEET_ROW]),
                Routed(income, income.loaded, [INCOME_ROW] * 3),
            ]
            results = predict_by_model(requests)
            assert [(r.model.name, len(r.predictions)) for r in results] == [
                ("income", 1),
                ("fleet-risk", 2),
                ("income", 3),
            ]
            assert {p["label"] for p in results[1].predictions} <= {"low", "medium", "high"}
            assert {p["label"] for r in (results[0], results[2]) for p in r.predictions} <= {"<=50K", ">50K"}
            # The same answers as each model alone.
            alone = risk.predict([[FLEET_ROW, FLEET_ROW]])[0].predictions
            assert results[1].predictions == alone
        finally:
            fleet.stop()

    asyncio.run(scenario())


@pytest.fixture
def broken_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # One try per call: MLflow's retries would only make the same 500 slower.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with failing_registry() as uri:
        yield uri


def test_only_a_missing_model_or_alias_means_no_champion(registry, broken_registry):
    client = MlflowClient(registry)
    assert champion_version(client, "no-champion", ALIAS) is None
    assert champion_version(client, "never-registered", ALIAS) is None
    assert champion_version(client, "income", ALIAS) is not None
    # A registry that fails is not a registry without a champion.
    with pytest.raises(MlflowException, match="500 error responses"):
        champion_version(MlflowClient(broken_registry), "income", ALIAS)


def test_a_model_the_registry_cannot_be_asked_about_is_unavailable_not_unknown(registry, broken_registry):
    def make(name: str) -> ChampionModel:
        uri = broken_registry if name == "fleet-risk" else registry
        return ChampionModel(name, ALIAS, uri, poll_interval_s=60)

    async def scenario() -> None:
        fleet = ModelFleet(make("income"), make, 4)
        await fleet.default.start()
        try:
            with pytest.raises(ModelUnavailableError, match="500 error responses"):
                await fleet.get("fleet-risk")
            # Not remembered as missing: the next request asks the registry again.
            with pytest.raises(ModelUnavailableError):
                await fleet.get("fleet-risk")
        finally:
            fleet.stop()

    asyncio.run(scenario())
