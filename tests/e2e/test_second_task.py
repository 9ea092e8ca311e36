"""A second tabular task on the running stack, as a new user brings one: a config file without
`model_name`, submitted with `ray job submit`. It registers under its own name, and nothing it does
moves Adult's champion or interrupts Adult's API; a config that reuses Adult's name with the other
schema is refused by the gate; an alias moved around the gate is refused by the replica."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cluster.demo import wait_for_version
from cluster.sandbox import Stack, run_cli
from jobs.result import training_result
from serve_apps.schemas import EXAMPLE_ROW
from services.ray_submission import follow_job, jobs_client, submit_training
from services.training_jobs.models import CONFIG_DIR
from tests.conftest import train_job
from tests.reliability.load import SteadyLoad
from tests.stack_probes import current_model, firing_alerts, until
from tests.training_jobs_helpers import QUICK, add_key, post_job, wait_job

ADULT = "adult-income"
FLEET = "fleet-risk"
FUEL = "fleet-fuel"


def _fleet_data(path: Path, rows: int = 1500) -> Path:
    """Another task than Adult's: other features, another target, three classes."""
    rng = np.random.default_rng(11)
    frame = pd.DataFrame(
        {
            "Vehicle Age": rng.integers(0, 20, rows),
            "Mileage": rng.uniform(0, 300_000, rows),
            "Fuel": rng.choice(["diesel", "petrol", "electric"], rows),
            "Region": rng.choice(["north", "south"], rows),
        }
    )
    score = frame["Vehicle Age"] / 20 + frame["Mileage"] / 300_000 + (frame["Fuel"] == "diesel") * 0.3
    frame["Risk Band"] = pd.cut(score, [-1, 0.7, 1.2, 9], labels=["low", "medium", "high"]).astype(str)
    frame.to_csv(path, index=False)
    return path


def _fleet_config(data: Path, **top: Any) -> dict[str, Any]:
    return {
        "name": FLEET,
        "task": "classification",
        "data": {"train_uri": str(data), "target": "Risk Band"},
        "model": {"hidden": [32]},
        "train": {"num_workers": 1, "epochs": 3, "batch_size": 64, "lr": 0.01},
        **top,
    }


def _champion(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except Exception:
        return None


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)


@pytest.fixture(scope="module")
def adult_served(stack: Stack, trained: dict[str, Any]) -> str:
    """Adult's champion, answering through Nginx before anything here starts."""
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    version = _champion(client, ADULT)
    assert version is not None
    assert wait_for_version(stack.settings, version, 60)
    return version


def test_a_second_task_registers_under_its_own_name_while_adult_answers(stack, adult_served, tmp_path, figures):
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    adult_versions = _versions(client, ADULT)
    config = _fleet_config(_fleet_data(tmp_path / "fleet.csv"))
    assert "model_name" not in config

    with SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=20, max_duration_s=900) as load:
        load.wait_for_count(20)
        result = train_job(stack, config)
        load.wait_for_count(load.count + 40)  # and after the job, for two more seconds
    summary = load.summary()

    assert result["model_name"] == FLEET
    assert result["promotion"]["rule"] == "no_champion" and result["promotion"]["promote"]
    assert _champion(client, FLEET) == str(result["model_version"])
    schema = client.download_artifacts(result["run_id"], "schema.json")
    assert yaml.safe_load(Path(schema).read_text())["classes"] == ["high", "low", "medium"]
    # Adult: not one new version, the same champion, and every request answered by it.
    assert _versions(client, ADULT) == adult_versions and _champion(client, ADULT) == adult_served
    assert summary.failed == 0, summary.as_dict()
    assert set(summary.versions) == {adult_served}
    figures["second_task"] = {
        "adult": {"versions": adult_versions, "champion": adult_served},
        "fleet": {"versions": _versions(client, FLEET), "champion": _champion(client, FLEET)},
        "adult_requests_during_training": summary.as_dict(),
    }


FLEET_ROW = {"vehicle_age": 12, "mileage": 180000.0, "fuel": "diesel", "region": "north"}


def test_the_second_task_is_served_next_to_adult_through_the_edge(stack, adult_served, figures):
    """Promoted, the second model is served at once by its name; Adult stays the default model."""
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    fleet_version = _champion(client, FLEET)
    assert fleet_version is not None

    fleet = stack.http.post(f"/v1/models/{FLEET}/predict", json={"instances": [FLEET_ROW] * 3}, headers=stack.auth)
    assert fleet.status_code == 200, fleet.text
    answer = fleet.json()
    assert answer["model"]["name"] == FLEET and answer["model"]["version"] == fleet_version
    for prediction in answer["predictions"]:
        assert prediction["label"] in {"low", "medium", "high"}
        assert set(prediction["probabilities"]) == {"low", "medium", "high"}
    for path in (f"/v1/models/{ADULT}/predict", "/v1/predict"):
        adult = stack.http.post(path, json={"instances": [EXAMPLE_ROW]}, headers=stack.auth)
        assert adult.status_code == 200, adult.text
        assert adult.json()["model"]["name"] == ADULT and adult.json()["model"]["version"] == adult_served
    # Each model checks rows against its own schema.
    crossed = stack.http.post(f"/v1/models/{FLEET}/predict", json={"instances": [EXAMPLE_ROW]}, headers=stack.auth)
    assert crossed.status_code == 422 and crossed.json()["error"]["code"] == "validation_error"

    listed = stack.http.get("/v1/models", headers=stack.auth)
    assert listed.status_code == 200, listed.text
    models = {m["name"]: m for m in listed.json()["models"]}
    assert models[ADULT]["default"] and models[ADULT]["serving"]["version"] == adult_served
    assert not models[FLEET]["default"] and models[FLEET]["champion_version"] == fleet_version
    assert models[FLEET]["serving"]["classes"] == ["high", "low", "medium"]
    detail = stack.http.get(f"/v1/models/{FLEET}", headers=stack.auth).json()
    assert detail["target"] == "risk_band" and {f["name"] for f in detail["features"]} == set(FLEET_ROW)
    assert stack.http.get("/v1/models/current", headers=stack.auth).json()["name"] == ADULT

    for missing in (
        stack.http.post("/v1/models/no-such-model/predict", json={"instances": [FLEET_ROW]}, headers=stack.auth),
        stack.http.get("/v1/models/no-such-model", headers=stack.auth),
    ):
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

    # Feedback on the second model's predictions takes its classes, not Adult's.
    rid = answer["request_id"]
    adults = stack.http.post("/v1/feedback", json={"request_id": rid, "index": 0, "label": ">50K"}, headers=stack.auth)
    assert adults.status_code == 422 and "high" in adults.json()["error"]["message"]
    given = stack.http.post("/v1/feedback", json={"request_id": rid, "index": 0, "label": "high"}, headers=stack.auth)
    assert given.status_code == 201, given.text
    assert given.json()["model"] == {"name": FLEET, "version": fleet_version}
    figures["served_together"] = {"models": sorted(models), "fleet_prediction": answer["predictions"][0]}


# `make test` swaps a champion under load in tests/reliability/test_zero_downtime_swap.py and serves two
# models side by side above; this one adds a third model and a swap while both take load.
@pytest.mark.extended
def test_models_appear_and_swap_while_load_runs_on_the_others(stack, adult_served, tmp_path, figures):
    """Load split across Adult and the second model (by name) while a third model is trained and
    becomes servable, and the second model's champion moves to a new version: no request of either
    fails, Adult's answers never change version, the second model's swap is seen."""
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    fleet_before = _champion(client, FLEET)
    data = _fleet_data(tmp_path / "fleet.csv")
    third = {**_fleet_config(data), "name": FUEL, "data": {"train_uri": str(data), "target": "Fuel"}}
    adult_path, fleet_path = f"/v1/models/{ADULT}/predict", f"/v1/models/{FLEET}/predict"
    fleet_body = {"instances": [FLEET_ROW]}
    with (
        SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=50, max_duration_s=900, path=adult_path) as a,
        SteadyLoad(
            stack.api_url, stack.auth, stack.verify, rate_per_s=50, max_duration_s=900, path=fleet_path, body=fleet_body
        ) as f,
    ):
        a.wait_for_count(50)
        f.wait_for_count(50)
        # A third model: trained, promoted by the gate (its first version), served by name at once.
        result = train_job(stack, third)
        assert result["model_name"] == FUEL and result["promotion"]["rule"] == "no_champion"
        fuel_row = {"vehicle_age": 12, "mileage": 180000.0, "region": "north", "risk_band": "high"}
        served = stack.http.post(f"/v1/models/{FUEL}/predict", json={"instances": [fuel_row]}, headers=stack.auth)
        assert served.status_code == 200, served.text
        assert served.json()["predictions"][0]["label"] in {"diesel", "petrol", "electric"}
        # A new version of the second model, made champion (same contract: no approval needed).
        retrained = train_job(stack, _fleet_config(data))
        fleet_after = str(retrained["model_version"])
        client.set_registered_model_alias(FLEET, "champion", fleet_after)
        until("the second model's new champion answering", lambda: f.summary().versions.get(fleet_after), 60)
        settle = int(50 * (stack.settings.model.poll_interval_s + 1)) + 100
        a.wait_for_count(a.count + settle)
        f.wait_for_count(f.count + settle)
    adult, fleet = a.summary(), f.summary()
    assert adult.failed == 0, adult.as_dict()
    assert fleet.failed == 0, fleet.as_dict()
    assert set(adult.versions) == {adult_served}
    assert set(fleet.versions) == {fleet_before, fleet_after} and fleet_before != fleet_after
    # One poll interval after the first answer of the new version, only the new version answers.
    settled = min(o.sent_at for o in f.outcomes if o.version == fleet_after) + stack.settings.model.poll_interval_s + 1
    after = {o.version for o in f.outcomes if o.ok and o.sent_at > settled}
    assert after == {fleet_after}
    names = {m["name"] for m in stack.http.get("/v1/models", headers=stack.auth).json()["models"]}
    assert {ADULT, FLEET, FUEL} <= names
    figures["models_under_load"] = {"adult": adult.as_dict(), "fleet": fleet.as_dict(), "third_model": FUEL}


@pytest.fixture(scope="module")
def reuse_job(stack: Stack, adult_served: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The other task's config under Adult's name, submitted with `ray job submit` and followed."""
    data = _fleet_data(tmp_path_factory.mktemp("reuse") / "fleet.csv")
    path = stack.settings.state_dir / "fleet-as-adult.yaml"
    path.write_text(yaml.safe_dump(_fleet_config(data, name=ADULT)))
    job_id = submit_training(stack.settings, str(path))
    status, logs = follow_job(stack.settings, job_id)
    info = jobs_client(stack.settings).get_job_info(job_id)
    return {"status": status, "logs": logs, "message": info.message or "", "result": training_result(logs)}


def test_reusing_adults_name_with_another_schema_is_refused_and_nothing_moves(stack, adult_served, reuse_job, figures):
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    logs, result = reuse_job["logs"], reuse_job["result"]

    assert reuse_job["status"] == "FAILED", logs[-3000:]
    assert "exit code 3" in reuse_job["message"], reuse_job["message"]
    assert result is not None and result["model_name"] == ADULT, logs[-3000:]
    rejected = str(result["model_version"])
    promotion = result["promotion"]
    assert not promotion["promote"] and promotion["rule"] == "incompatible"
    assert promotion["champion_version"] == adult_served
    assert f"promotion refused: candidate breaks the serving contract of champion v{adult_served}: " in logs
    assert "target changed: 'income' -> 'risk_band'" in promotion["reason"]
    assert "features removed or renamed: age, workclass, fnlwgt" in promotion["reason"]
    assert _champion(client, ADULT) == adult_served
    tags = client.get_model_version(ADULT, rejected).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.rule"] == "incompatible"

    # The gate's CLI says the same, and exits 3.
    again = run_cli("jobs.promote", "--model", ADULT, "--version", rejected, env=stack.env, timeout=300)
    assert again.returncode == 3, again.stderr[-2000:]
    assert "not promoted: candidate breaks the serving contract" in again.stderr
    assert _champion(client, ADULT) == adult_served
    figures["incompatible_reuse"] = {"version": rejected, "reason": promotion["reason"]}


def test_an_alias_moved_around_the_gate_is_refused_by_the_replica_and_alerts(stack, adult_served, reuse_job, figures):
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    assert reuse_job["result"] is not None, reuse_job["logs"][-3000:]
    incompatible = str(reuse_job["result"]["model_version"])  # registered, rejected by the gate
    try:
        with SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=20, max_duration_s=300) as load:
            load.wait_for_count(20)
            client.set_registered_model_alias(ADULT, "champion", incompatible)  # by hand, no approval
            refused = until(
                "the replica reporting the refused swap", lambda: current_model(stack).get("swap_refused"), 60
            )
            alert = until("ModelSwapRefused firing", lambda: firing_alerts(stack, "ModelSwapRefused", model=ADULT), 120)
            load.wait_for_count(load.count + 60)  # three more seconds of the refused alias
        summary = load.summary()
    finally:
        client.set_registered_model_alias(ADULT, "champion", adult_served)

    assert refused["version"] == incompatible
    assert refused["reason"].startswith(f"breaks the contract of version {adult_served}: target changed")
    assert float(alert[0]["value"]) == float(incompatible)
    assert summary.failed == 0, summary.as_dict()
    assert set(summary.versions) == {adult_served}
    assert current_model(stack)["version"] == adult_served
    # The alias back where the gate left it: the refusal clears.
    until("the refusal clearing", lambda: current_model(stack).get("swap_refused") is None, 60)
    figures["swap_refused"] = {"alias_moved_to": incompatible, "served": adult_served, **summary.as_dict()}


@pytest.fixture(scope="module")
def trainer(stack: Stack) -> dict[str, str]:
    return add_key(stack, "second-task-train", "train")


@pytest.mark.parametrize(
    "overrides",
    [{"model_name": "someone-else"}, {"name": "x"}, {"promotion.enabled": True}, {"promotion": {"margin": -1}}],
)
def test_training_requests_cannot_retarget_a_model_or_loosen_its_gate(stack, trainer, overrides):
    """A key that may train (and is not an admin's) cannot point its job at another model or
    loosen the gate that decides what it promotes."""
    response = stack.http.post("/v1/training-jobs", json={"kind": "train", "overrides": overrides}, headers=trainer)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    key = next(iter(overrides))
    assert error["details"][0]["loc"] == ["body", "overrides", key]
    assert "can only be changed by an operator" in error["message"]


def test_a_queued_job_the_gate_refuses_fails_once_with_its_reason_and_is_not_retried(stack, adult_served):
    """Overrides may still change the data: a request that retrains Adult's model on another
    target trains, is refused by the gate, and ends at once; a retry would train the same refusal."""
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    overrides = {**QUICK, "data.target": "sex"}
    response = post_job(stack, {"kind": "train", "overrides": overrides})
    assert response.status_code == 202, response.text
    job = wait_job(stack, response.json()["id"], {"failed"})

    assert job["attempts"] == 1 and job["max_attempts"] > 1
    assert job["model_name"] == ADULT and job["model_version"] and job["promoted"] is False
    assert job["last_error"].startswith(
        f"promotion refused: candidate breaks the serving contract of champion v{adult_served}"
    )
    assert "target changed: 'income' -> 'sex'" in job["last_error"]
    assert [e["state"] for e in job["events"]].count("queued") == 1  # accepted once, never re-queued
    assert _champion(client, ADULT) == adult_served


@pytest.fixture
def wrong_feedback_removed(stack: Stack) -> Iterator[None]:
    """The wrong labels would keep the second model's accuracy alert up for the window."""
    yield
    dsn = stack.settings.database.value()
    assert dsn is not None
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM feedback WHERE model_name = %s", (FLEET,))


@pytest.fixture
def fleet_config_shipped(tmp_path: Path) -> Iterator[str]:
    """The second task's config where a new task's config goes, jobs/configs/ (the alert's
    retraining looks there); removed afterwards with the wrong labels it drew."""
    name = f"fleet-e2e-{uuid.uuid4().hex[:8]}"
    path = CONFIG_DIR / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_fleet_config(_fleet_data(tmp_path / "fleet.csv"))), encoding="utf-8")
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)


def test_wrong_feedback_on_the_second_model_retrains_the_second_model(
    stack, adult_served, fleet_config_shipped, wrong_feedback_removed
):
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    adult_versions, fleet_versions = _versions(client, ADULT), _versions(client, FLEET)
    fleet_version = _champion(client, FLEET)
    assert fleet_version is not None
    body = {"instances": [FLEET_ROW] * 40}
    predicted = stack.http.post(f"/v1/models/{FLEET}/predict", json=body, headers=stack.auth).json()
    for index, prediction in enumerate(predicted["predictions"]):
        wrong = next(c for c in ("low", "medium", "high") if c != prediction["label"])
        given = {"request_id": predicted["request_id"], "index": index, "label": wrong}
        assert stack.http.post("/v1/feedback", json=given, headers=stack.auth).status_code == 201

    fired = until(
        "ModelAccuracyLow firing for the second model",
        lambda: firing_alerts(stack, "ModelAccuracyLow", model=FLEET, model_version=fleet_version),
        120,
    )
    assert fired[0]["labels"]["action"] == "retrain"
    jobs = until(
        "the second model's retraining job",
        lambda: [
            j
            for j in stack.http.get("/v1/training-jobs", params={"limit": 200}, headers=stack.auth).json()["jobs"]
            if j["config"] == fleet_config_shipped
        ],
        120,
    )
    job = wait_job(stack, jobs[0]["id"], {"succeeded"}, 600)
    assert (job["idempotency_key"] or "").startswith("alert:ModelAccuracyLow:")
    # The second model got a new version; Adult got none.
    assert job["model_name"] == FLEET and job["model_version"] not in fleet_versions
    assert _versions(client, FLEET) == [*fleet_versions, job["model_version"]]
    assert _versions(client, ADULT) == adult_versions and _champion(client, ADULT) == adult_served
