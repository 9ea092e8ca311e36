"""Safe rollout on the running stack, under steady load through the public API: a shadow
challenger that disagrees with the champion is rejected without a client ever seeing its answers;
a canary that is worse ends and gives all traffic back to the champion; a champion whose live
accuracy drops after its promotion is rolled back by itself and ModelRolledBack fires; a good
challenger goes through every canary step to champion, across a restart of the rollout's owner.
No request may fail in any of them.

The broken challenger is trained on the same kind of rows with every label flipped: scored on its
own (equally flipped) test split it passes the offline gate, which is exactly what only live traffic
can show. Callers are told apart by `X-Client-Id` (the test stack's ROLLOUT_CANARY_KEY)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import psycopg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cluster.sandbox import Stack, run_cli
from core.health import wait_until
from jobs.rollout import CHALLENGER_ALIAS, RESTORED_FROM_TAG, ROLLED_BACK_TAG, STATE_TAG, move_champion
from services.training_jobs.models import CONFIG_DIR
from tests.conftest import train_job
from tests.e2e.test_closed_loop import DASHBOARDS, RULES, _varied_adult_traffic
from tests.integration.test_prometheus import wait_for
from tests.observability import dashboard_exprs, promql_metric_names, rule_exprs
from tests.reliability.load import LoadSummary, Outcome, SteadyLoad
from tests.stack_probes import firing_alerts, until
from tests.training_jobs_helpers import get_job, post_job, wait_job

CLIENTS = 40  # distinct X-Client-Id values in the load
RATE_PER_S = 30.0


def _rows(rng: np.random.Generator, n: int, flipped: bool = False) -> pd.DataFrame:
    x1, x2, x3 = rng.normal(0.0, 1.0, n), rng.normal(0.0, 1.0, n), rng.normal(0.0, 1.0, n)
    channel = rng.choice(["web", "store"], n)
    yes = rng.random(n) < 1 / (1 + np.exp(-6.0 * (x1 + x2 / 2)))
    label = np.where(yes != flipped, "yes", "no")
    return pd.DataFrame({"x1": x1, "x2": x2, "x3": x3, "channel": channel, "converted": label})


def _config(name: str, data: Path, promote: bool) -> dict[str, Any]:
    return {
        "name": name,
        "task": "classification",
        "data": {"train_uri": str(data), "target": "converted"},
        "model": {"hidden": [32, 16]},
        "train": {"num_workers": 1, "epochs": 8, "patience": 3, "batch_size": 64, "lr": 0.01},
        "promotion": {"enabled": promote},
    }


@pytest.fixture(scope="module")
def rollout_model(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A fresh model with a good champion (v1) and a broken version trained on flipped labels,
    not promoted. No config in jobs/configs trains the model yet: the broken version's live
    accuracy fires ModelAccuracyLow, whose retraining would otherwise move the champion under the
    scenarios (the webhook refuses an alert no config can retrain)."""
    name = f"rollout-e2e-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("rollout")
    paths = {kind: folder / f"{kind}.csv" for kind in ("good", "good2", "flipped")}
    _rows(np.random.default_rng(1), 3000).to_csv(paths["good"], index=False)
    _rows(np.random.default_rng(2), 3000).to_csv(paths["good2"], index=False)
    _rows(np.random.default_rng(3), 3000, flipped=True).to_csv(paths["flipped"], index=False)
    try:
        first = train_job(stack, _config(name, paths["good"], True))
        assert first["promotion"]["promote"], first
        broken = train_job(stack, _config(name, paths["flipped"], False))
        pool = _rows(np.random.default_rng(4), 2000)
        yield {
            "name": name,
            "v1": str(first["model_version"]),
            "broken": str(broken["model_version"]),
            "config": name,
            "good2": paths["good2"],
            "instances": pool.drop(columns=["converted"]).to_dict("records"),
            "labels": pool["converted"].tolist(),
        }
    finally:
        _quiet(stack, name)
        dsn = stack.settings.database.value()
        assert dsn is not None
        with psycopg.connect(dsn) as conn:
            conn.execute("DELETE FROM predictions WHERE model_name = %s", (name,))
            conn.execute("DELETE FROM shadow_predictions WHERE model_name = %s", (name,))


# Helpers -----------------------------------------------------------------------------------------


def _quiet(stack: Stack, name: str) -> None:
    """No labels and no alert-queued retraining of the model left over from a scenario. While no
    config in jobs/configs trains the model the webhook refuses its ModelAccuracyLow (the broken
    version's live accuracy fires it, and it keeps firing for a while); a job that got through
    anyway would move the champion under the next scenario."""
    dsn = stack.settings.database.value()
    assert dsn is not None
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM feedback WHERE model_name = %s", (name,))
    listed = stack.http.get("/v1/training-jobs", params={"limit": 200}, headers=stack.auth).json()["jobs"]
    for job in listed:
        alerted = (job["idempotency_key"] or "").startswith("alert:")
        if job["config"] == name and alerted and job["state"] in {"queued", "submitted", "running"}:
            stack.http.delete(f"/v1/training-jobs/{job['id']}", headers=stack.auth)


def _model(stack: Stack, name: str) -> dict[str, Any]:
    response = stack.http.get(f"/v1/models/{name}", headers=stack.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _served(stack: Stack, name: str, version: str) -> bool:
    return str(_model(stack, name)["version"]) == version


def _reset_champion(stack: Stack, model: dict[str, Any], version: str) -> None:
    """Start each scenario from `version` as champion, served, with no rollout in flight."""
    _quiet(stack, model["name"])
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    with contextlib.suppress(Exception):
        client.delete_registered_model_alias(model["name"], CHALLENGER_ALIAS)
    current = client.get_model_version_by_alias(model["name"], stack.settings.champion_alias)
    if str(current.version) != version:
        move_champion(client, model["name"], stack.settings.champion_alias, version, str(current.version))

    def settled() -> bool:
        body = _model(stack, model["name"])
        rollout = (body.get("rollout") or {}).get("rollout")
        return str(body["version"]) == version and (rollout is None or rollout["state"] != "active")

    until(f"{model['name']} v{version} served with no rollout in flight", settled, 120)


def _gate(stack: Stack, name: str, version: str, mode: str) -> dict[str, Any]:
    result = run_cli(
        "jobs.promote", "--model", name, "--version", version, "--rollout", mode, env=stack.env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    decision: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return decision


def _rollout_of(stack: Stack, name: str, version: str, since: datetime, kind: str = "rollout") -> dict[str, Any] | None:
    """The model's rollout (or probation) of `version` started after `since`, as the API shows it."""
    record = (_model(stack, name).get("rollout") or {}).get(kind)
    if record is None or str(record["challenger_version"]) != version:
        return None
    started = datetime.fromisoformat(record["started_at"])
    return record if started >= since else None


def _decided(stack: Stack, name: str, version: str, since: datetime, kind: str = "rollout") -> dict[str, Any] | None:
    record = _rollout_of(stack, name, version, since, kind)
    return record if record is not None and record["state"] != "active" else None


def _now(stack: Stack) -> datetime:
    """The database's clock: rollouts are stamped by it."""
    dsn = stack.settings.database.value()
    assert dsn is not None
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    found: datetime = row[0]
    return found


@contextlib.contextmanager
def _silenced(stack: Stack, **labels: str) -> Iterator[None]:
    """An Alertmanager silence of the alerts carrying `labels`, lifted on the way out."""
    now = datetime.now(UTC)
    silence = {
        "matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True} for k, v in labels.items()],
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(hours=1)).isoformat(),
        "createdBy": "tests/e2e/test_rollout.py",
        "comment": "a rollout run by hand",
    }
    created = httpx.post(f"{stack.settings.alertmanager_url}/api/v2/silences", json=silence, timeout=10)
    assert created.status_code == 200, created.text
    try:
        yield
    finally:
        httpx.delete(f"{stack.settings.alertmanager_url}/api/v2/silence/{created.json()['silenceID']}", timeout=10)


def _load(stack: Stack, model: dict[str, Any]) -> SteadyLoad:
    instances = model["instances"]

    def vary(n: int) -> tuple[dict[str, Any], dict[str, str]]:
        return {"instances": [instances[n % len(instances)]]}, {"X-Client-Id": f"client-{n % CLIENTS}"}

    return SteadyLoad(
        stack.api_url,
        stack.auth,
        stack.verify,
        rate_per_s=RATE_PER_S,
        connections=4,
        max_duration_s=900,
        path=f"/v1/models/{model['name']}/predict",
        vary=vary,
    )


class Labeller:
    """Sends the true label of every answered request of a load as feedback, as a client whose
    outcomes become known shortly after would."""

    def __init__(self, stack: Stack, load: SteadyLoad, labels: list[str]) -> None:
        self._stack, self._load, self._labels = stack, load, labels
        self.sent = 0
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labeller", daemon=True)

    def __enter__(self) -> Labeller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        done = 0
        with httpx.Client(base_url=self._stack.api_url, verify=self._stack.verify, headers=self._stack.auth) as http:
            while not self._stop.is_set():
                outcomes = self._load.outcomes[done:]
                done += len(outcomes)
                for outcome in outcomes:
                    self._send(http, outcome)
                self._stop.wait(0.2)

    def _send(self, http: httpx.Client, outcome: Outcome) -> None:
        if not outcome.ok or outcome.sequence is None:
            return
        label = self._labels[outcome.sequence % len(self._labels)]
        response = http.post("/v1/feedback", json={"request_id": outcome.request_id, "index": 0, "label": label})
        if response.status_code == 201:
            self.sent += 1
        else:
            self.refused.append(f"{response.status_code} {response.text[:200]}")


def _client_versions(outcomes: list[Outcome]) -> dict[str, list[str]]:
    """Per caller, the versions that answered it, in order, repeats collapsed."""
    seen: dict[str, list[str]] = {}
    for outcome in sorted(outcomes, key=lambda o: o.sent_at):
        if outcome.ok and outcome.sequence is not None and outcome.version is not None:
            versions = seen.setdefault(f"client-{outcome.sequence % CLIENTS}", [])
            if not versions or versions[-1] != outcome.version:
                versions.append(outcome.version)
    return seen


def _paired_rows(stack: Stack, name: str, served: str, mirrored: str) -> int:
    """Rows recorded twice: the answer of `served` and the mirrored prediction of `mirrored`."""
    dsn = stack.settings.database.value()
    assert dsn is not None
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """
            SELECT count(*) FROM predictions p JOIN shadow_predictions s USING (request_id, row_index)
            WHERE p.model_name = %s AND p.model_version = %s AND s.model_version = %s
            """,
            (name, served, mirrored),
        ).fetchone()
    return int(row[0]) if row else 0


def _figures(summary: LoadSummary, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": summary.requests,
        "failed": summary.failed,
        "answered_by": summary.versions,
        "p99_ms": summary.p99_ms,
        "decision": record["state"],
        "reason": record["reason"],
        "figures": record["figures"],
    }


# Scenarios ---------------------------------------------------------------------------------------


def test_a_shadow_challenger_that_disagrees_is_rejected_and_no_client_sees_its_answers(stack, rollout_model, figures):
    model, name = rollout_model, rollout_model["name"]
    v1, broken = model["v1"], model["broken"]
    _reset_champion(stack, model, v1)
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    with _load(stack, model) as load:
        load.wait_for_count(60)
        since = _now(stack)
        decision = _gate(stack, name, broken, "shadow")
        assert decision["promote"] and decision["rollout"] == "shadow", decision
        assert str(client.get_model_version_by_alias(name, CHALLENGER_ALIAS).version) == broken
        record = until("the shadow rollout decided", lambda: _decided(stack, name, broken, since), 300)
        load.wait_for_count(load.count + 60)  # traffic goes on after the decision
    summary = load.summary()
    assert summary.failed == 0, summary.as_dict()
    assert set(summary.versions) == {v1}, summary.versions  # the shadow never answered a client
    assert record["state"] == "rejected" and record["kind"] == "shadow", record
    settings = stack.settings.rollout
    assert record["figures"]["rows"] >= settings.min_rows, record
    assert record["figures"]["agreement"] < settings.min_agreement, record
    assert "agree" in record["reason"], record
    tags = client.get_model_version(name, broken).tags
    assert tags[STATE_TAG] == "rejected", tags
    assert str(client.get_model_version_by_alias(name, stack.settings.champion_alias).version) == v1
    with pytest.raises(Exception):  # noqa: B017 - the registry's error for a missing alias
        client.get_model_version_by_alias(name, CHALLENGER_ALIAS)
    # Both predictions of the mirrored requests are kept: the champion's answer and the shadow's.
    assert _paired_rows(stack, name, v1, broken) >= record["figures"]["rows"]
    figures["rollout_shadow_rejected"] = _figures(summary, record)


def test_b_a_worse_canary_step_gives_all_traffic_back_to_the_champion(stack, rollout_model, figures):
    model, name = rollout_model, rollout_model["name"]
    v1, broken = model["v1"], model["broken"]
    _reset_champion(stack, model, v1)
    with _load(stack, model) as load:
        load.wait_for_count(60)
        since = _now(stack)
        decision = _gate(stack, name, broken, "canary")
        assert decision["promote"] and decision["rollout"] == "canary", decision
        active = until("the canary answering", lambda: _rollout_of(stack, name, broken, since), 120)
        assert active["kind"] == "canary" and 0 < active["share"] < 1, active
        record = until("the canary decided", lambda: _decided(stack, name, broken, since), 300)
        # Once every replica follows the decision, the champion answers everyone. Replicas follow
        # at their own polls, and answers sent before they caught up may come back late and from
        # the canary, so the probe waits for the latest answers by send time to cover every caller
        # more than once; the strict check is on every request sent after them.
        settled = until("the champion answering all", lambda: _answering_only(load, v1), 90)
        load.wait_for_count(len(load.outcomes) + 90)
    summary = load.summary()
    assert summary.failed == 0, summary.as_dict()
    assert record["state"] == "rejected" and record["kind"] == "canary", record
    assert record["step"] == 0 and record["figures"]["challenger_served_rows"] > 0, record
    assert summary.versions.get(broken, 0) > 0, summary.versions  # the canary did answer its share
    tail = [o for o in load.outcomes if o.sent_at > settled]
    assert len(tail) >= 60 and {o.version for o in tail} == {v1}, (len(tail), {o.version for o in tail})
    # One caller saw one version while the canary lasted: a caller inside it went to the challenger
    # once and back to the champion once, never to and fro; every caller ends with the champion.
    for caller, versions in _client_versions(load.outcomes).items():
        assert versions.count(broken) <= 1 and versions[-1] == v1, (caller, versions)
    figures["rollout_canary_rejected"] = _figures(summary, record)


def _answering_only(load: SteadyLoad, version: str, count: int = 3 * CLIENTS) -> float | None:
    """When the latest `count` answers by send time (every caller's more than once) all came from
    `version`, the send time of the last of them; None until then."""
    recent = sorted(load.outcomes, key=lambda o: o.sent_at)[-count:]
    if len(recent) < count or {o.version for o in recent} != {version}:
        return None
    return recent[-1].sent_at


def test_c_a_champion_worse_on_live_labels_is_rolled_back_by_itself(stack, rollout_model, figures):
    model, name = rollout_model, rollout_model["name"]
    v1, broken = model["v1"], model["broken"]
    _reset_champion(stack, model, v1)
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    min_labels = stack.settings.probation.min_labels
    with _load(stack, model) as load, Labeller(stack, load, model["labels"]) as labeller:
        # The champion's own window of labelled traffic, before the new version replaces it.
        assert wait_until(lambda: labeller.sent >= 2 * min_labels, 120), labeller.refused[:3]
        since = _now(stack)
        decision = _gate(stack, name, broken, "immediate")
        assert decision["promote"] and decision["rollout"] is None, decision
        # Not polled for: with labels for every answer, the broken version may be gone again
        # within seconds. The load's answers show it served (below).
        record = until("the probation decided", lambda: _decided(stack, name, broken, since, kind="probation"), 300)
        until(f"v{v1} served again", lambda: _served(stack, name, v1), 60)
        load.wait_for_count(load.count + 60)
    _quiet(stack, name)
    summary = load.summary()
    assert summary.failed == 0, summary.as_dict()
    assert summary.versions.get(broken, 0) > 0, summary.versions  # clients did get the broken version's answers
    assert not labeller.refused, labeller.refused[:3]
    assert record["state"] == "rolled_back", record
    assert str(client.get_model_version_by_alias(name, stack.settings.champion_alias).version) == v1
    rolled = json.loads(client.get_model_version(name, broken).tags[ROLLED_BACK_TAG])
    assert str(rolled["to"]) == v1 and rolled["reason"], rolled
    assert client.get_model_version(name, v1).tags[RESTORED_FROM_TAG] == broken
    fired = until("ModelRolledBack firing", lambda: firing_alerts(stack, "ModelRolledBack", model=name), 120)
    assert fired[0]["labels"].get("action") != "retrain", fired
    figures["rollout_probation_rolled_back"] = {**_figures(summary, record), "labels_sent": labeller.sent}


def test_d_a_good_challenger_goes_through_the_canary_to_champion_across_an_owner_restart(stack, rollout_model, figures):
    model, name = rollout_model, rollout_model["name"]
    v1 = model["v1"]
    _reset_champion(stack, model, v1)
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    shipped = CONFIG_DIR / f"{name}.yaml"
    with (
        # The scenarios before may leave ModelAccuracyLow firing (the broken version's labels): while
        # a config trains the model, the webhook would queue a retraining on it whose promotion
        # supersedes this rollout. An operator running a rollout by hand silences the model's
        # retraining alerts for as long; so does this test.
        _silenced(stack, model=name, action="retrain"),
        contextlib.ExitStack() as cleanup,
        _load(stack, model) as load,
        Labeller(stack, load, model["labels"]) as labeller,
    ):
        shipped.write_text(yaml.safe_dump(_config(name, model["good2"], True)), encoding="utf-8")
        cleanup.callback(shipped.unlink, missing_ok=True)
        since = _now(stack)
        # Retrained on other rows of the same task: as good as the champion, so a negative margin
        # lets the gate pass it (a tie never promotes), and the canary decides.
        response = post_job(
            stack,
            {
                "kind": "train",
                "config": model["config"],
                # Equally good models differ on a few of the first labelled rows of a step by
                # chance: the step allows for it rather than reject a good challenger on noise.
                "overrides": {
                    "promotion.rollout.mode": "canary",
                    "promotion.rollout.max_accuracy_drop": 0.1,
                    "promotion.margin": -0.05,
                },
            },
        )
        assert response.status_code == 202, response.text
        job = wait_job(stack, response.json()["id"], {"succeeded"}, 600)
        # Trained: with no config training the model any more, the webhook refuses any retraining
        # alert of it (a few unlucky first labels of the canary could fire one).
        shipped.unlink()
        v2 = str(job["model_version"])
        first = until("the canary answering", lambda: _rollout_of(stack, name, v2, since), 120)
        # The owner of the rollout dies mid-canary; its successor resumes the same rollout.
        stepped = until("the first step passed", lambda: _stepped(stack, name, v2, since, first["id"]), 300)
        _kill_and_restart_dispatcher(stack)
        record = until("the canary decided", lambda: _decided(stack, name, v2, since), 300)
        assert record["id"] == first["id"] and record["state"] == "promoted", record
        until(f"v{v2} served", lambda: _served(stack, name, v2), 60)
        load.wait_for_count(load.count + 60)
    summary = load.summary()
    assert summary.failed == 0, summary.as_dict()
    assert stepped["step"] >= 1
    assert str(client.get_model_version_by_alias(name, stack.settings.champion_alias).version) == v2
    assert client.get_model_version(name, v2).tags[STATE_TAG] == "promoted"
    events = [e["message"] or "" for e in get_job(stack, job["id"])["events"]]
    assert any("canary rollout" in m and "promoted" in m for m in events), events
    for caller, versions in _client_versions(load.outcomes).items():
        assert versions in ([v1], [v2], [v1, v2]), (caller, versions)
    figures["rollout_canary_promoted"] = {**_figures(summary, record), "labels_sent": labeller.sent}


def _stepped(stack: Stack, name: str, version: str, since: datetime, rollout_id: int) -> dict[str, Any] | None:
    record = _rollout_of(stack, name, version, since)
    return record if record is not None and record["id"] == rollout_id and record["step"] >= 1 else None


def _kill_and_restart_dispatcher(stack: Stack) -> None:
    pid = int((stack.settings.state_dir / "pids" / "dispatcher.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not _alive(pid), 30)
    result = run_cli("cluster", "up", env=stack.env, timeout=300)
    assert result.returncode == 0 and "dispatcher: started" in result.stdout, result.stdout + result.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dashboards_and_rules_use_only_metrics_prometheus_scraped(stack, trained, rollout_model):
    # The last e2e module that creates series: after the closed loop (feedback, retraining), the
    # learning loop and the rollouts above (shadow, canary, probation, rollback); and after a window
    # of predictions the drift monitor has judged, so its series exist. Adult's traffic needs its
    # champion served, which earlier modules leave behind but this one, run alone, must ask for.
    until("Adult's champion served", lambda: stack.http.get("/readyz").status_code == 200, 120)
    _varied_adult_traffic(stack, stack.settings.monitor.max_rows)
    wait_for(stack, f'model_estimated_accuracy{{model="{stack.settings.model.name}"}}', 120)
    names = set(httpx.get(f"{stack.settings.prometheus.url}/api/v1/label/__name__/values", timeout=10).json()["data"])
    used: dict[str, set[str]] = {}
    for dashboard in DASHBOARDS:
        for expr in dashboard_exprs(dashboard):
            for name in promql_metric_names(expr):
                used.setdefault(name, set()).add(dashboard.name)
    for rules in RULES:
        for alert, expr in rule_exprs(rules):
            for name in promql_metric_names(expr):
                used.setdefault(name, set()).add(alert)
    missing = {name: where for name, where in used.items() if name not in names}
    assert not missing, f"metrics used but never scraped: {missing}"
