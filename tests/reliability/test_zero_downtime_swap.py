"""Promoting a new version while clients send a steady stream of predictions: no request fails,
and every response names the version that answered it, old until the swap and new after."""

from mlflow.tracking import MlflowClient

from cluster.sandbox import run_cli
from core.health import wait_until
from tests.conftest import train_job
from tests.reliability.load import SteadyLoad

AFTER_SWAP = 300


def test_promoting_a_version_swaps_it_in_without_failed_requests(stack, trained, figures):
    # A second version, registered but not promoted by its own job.
    outcome = train_job(stack, "jobs/configs/adult.yaml", ["train.epochs=1", "train.seed=7", "promotion.enabled=false"])
    new_version = str(outcome["model_version"])
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    # Whichever version earlier tests left as champion; the new one is not it.
    old_version = str(client.get_model_version_by_alias("adult-income", "champion").version)
    assert old_version != new_version

    with SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=100) as load:
        load.wait_for_count(200)
        promoted = run_cli(
            "jobs.promote",
            *("--model", "adult-income", "--version", new_version, "--force", "--reason", "swap under load"),
            env=stack.env,
            timeout=300,
        )
        assert promoted.returncode == 0, promoted.stderr
        assert wait_until(lambda: any(o.version == new_version for o in load.outcomes), 60)
        switched = next(i for i, o in enumerate(load.outcomes) if o.version == new_version)
        load.wait_for_count(switched + AFTER_SWAP)
    outcomes = sorted(load.outcomes, key=lambda o: o.sent_at)
    summary = load.summary()
    figures["champion_swap"] = {**summary.as_dict(), "old_version": old_version, "new_version": new_version}

    assert summary.failed == 0, summary.as_dict()
    assert all(o.version in {old_version, new_version} for o in outcomes)
    assert old_version in summary.versions and new_version in summary.versions
    # Each replica swaps by one reference on its next alias poll: a request sent a poll interval
    # after the first new answer gets the new version from every replica.
    first_new = next(o.sent_at for o in outcomes if o.version == new_version)
    settled = first_new + stack.settings.model.poll_interval_s + 1
    assert {o.version for o in outcomes if o.sent_at > settled} == {new_version}
    mv = client.get_model_version("adult-income", new_version)
    assert mv.tags["promotion.rule"] == "forced" and mv.tags["promotion.force_reason"] == "swap under load"
    assert mv.tags["promotion.reason"].startswith("forced by operator ") and mv.tags["promotion.forced_by"]
