"""Promoting a new version while clients send requests: zero failures, responses switch over."""

import threading
import time

import httpx
from mlflow.tracking import MlflowClient

from serve_apps.schemas import EXAMPLE_ROW
from tests.conftest import run_cli, train_job


def test_promoting_a_version_swaps_it_in_without_failed_requests(stack, trained):
    # A second version, registered but not promoted by its own job.
    outcome = train_job(stack, "jobs/configs/adult.yaml", ["train.epochs=1", "train.seed=7", "promotion.enabled=false"])
    new_version = str(outcome["model_version"])
    old_version = str(trained["model_version"])
    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    assert client.get_model_version_by_alias("adult-income", "champion").version == old_version

    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=stack.api_url, verify=stack.verify, headers=stack.auth, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/predict", json={"instances": [EXAMPLE_ROW]})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                else:
                    seen.append(response.json()["model"]["version"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        promoted = run_cli("jobs.promote", "--version", new_version, "--force", env=stack.env, timeout=300)
        assert promoted.returncode == 0, promoted.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not seen or seen[-1] != new_version):
            time.sleep(0.2)
        count_at_switch = len(seen)
        while len(seen) < count_at_switch + 50 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)

    assert failures == []
    assert old_version in seen and seen[-1] == new_version
    # After the swap settles, only the new version answers.
    assert set(seen[-50:]) == {new_version}
    mv = client.get_model_version("adult-income", new_version)
    assert mv.tags["promotion.reason"] == "forced by operator"
