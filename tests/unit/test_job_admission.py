"""Admission of training requests: data locations, caps and cluster capacity, each refusal a 422
naming the field (services/training_jobs/admission.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.settings import JobLimitsSettings, Settings
from jobs.config import load_config
from services.training_jobs import admission
from services.training_jobs.admission import ClusterCapacity, DataLocations, admit, live_capacity
from services.training_jobs.models import CONFIG_DIR, InvalidJobSpecError, JobSpec

pytestmark = pytest.mark.unit

BUCKET = "platform"
FOUR_CPUS = ClusterCapacity(cpus=4)
LIMITS = JobLimitsSettings()
ALLOWED = f"files under data/ in the repository or objects under s3://{BUCKET}/datasets/"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository root of its own: a data/ folder with one file, and a secret beside it."""
    (tmp_path / "data" / "adult").mkdir(parents=True)
    (tmp_path / "data" / "adult" / "adult.data.gz").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("not a data set")
    return tmp_path


@pytest.fixture
def locations(repo: Path) -> DataLocations:
    return DataLocations(repo_root=repo, s3_bucket=BUCKET, s3_prefix="datasets/")


def admitted(
    spec: JobSpec,
    locations: DataLocations | None = None,
    *,
    admin: bool = False,
    capacity: ClusterCapacity | None = FOUR_CPUS,
    limits: JobLimitsSettings = LIMITS,
) -> Any:
    where = locations or DataLocations.from_settings(Settings(_env_file=None))
    return admit(spec, admin=admin, limits=limits, capacity=capacity, locations=where)


def refused(spec: JobSpec, locations: DataLocations | None = None, **kwargs: Any) -> InvalidJobSpecError:
    with pytest.raises(InvalidJobSpecError) as info:
        admitted(spec, locations, **kwargs)
    return info.value


# The shipped configs -----------------------------------------------------------------------------


def shipped_specs() -> list[JobSpec]:
    specs = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        specs.append(JobSpec(kind="train", config=path.stem))
        if load_config(path).tune is not None:
            specs.append(JobSpec(kind="tune", config=path.stem))
    return specs


@pytest.mark.parametrize("spec", shipped_specs(), ids=lambda s: f"{s.kind}-{s.config}")
def test_every_shipped_config_is_admitted_with_default_settings_on_four_cpus(spec):
    assert admitted(spec) == spec.resolve()


def test_the_shipped_data_paths_pass_the_check_when_sent_as_overrides():
    config = load_config(CONFIG_DIR / "adult.yaml")
    overrides = {"data.train_uri": config.data.train_uri, "data.test_uri": config.data.test_uri}
    assert admitted(JobSpec(overrides=overrides)).data.train_uri == config.data.train_uri


# Data locations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("/etc/passwd", "is not under data/"),
        ("file:///etc/passwd", "is not under data/"),
        ("file://localhost/etc/passwd", "is not under data/"),
        ("data/../../etc/passwd", "contains '..'"),
        ("data/adult/../../secret.txt", "contains '..'"),
        ("secret.txt", "is not under data/"),
        ("data/%2e%2e/%2e%2e/etc/passwd", "contains percent-encoding"),
        ("s3://platform/datasets/%2e%2e/private/x.csv", "contains percent-encoding"),
        ("http://example.com/adult.csv", "uses the 'http' scheme"),
        ("https://example.com/adult.csv", "uses the 'https' scheme"),
        ("S3://platform/datasets/x.csv", "uses the 'S3' scheme"),
        ("file:/etc/passwd", "uses the 'file' scheme"),
        ("s3://other-bucket/datasets/adult/x.csv", f"is not under s3://{BUCKET}/datasets/"),
        ("s3://platform/private/x.csv", f"is not under s3://{BUCKET}/datasets/"),
        ("s3://platform/datasets-private/x.csv", f"is not under s3://{BUCKET}/datasets/"),
        ("s3://user@platform/datasets/x.csv", f"is not under s3://{BUCKET}/datasets/"),
        ("s3://platform/datasets/../private/x.csv", "has an empty, '.' or '..' path segment"),
        ("s3://platform/datasets/x.csv?versionId=1", "carries a query or a fragment"),
        ("", "is not under data/"),
    ],
)
def test_a_data_location_outside_the_documented_ones_is_refused(locations, uri, problem):
    error = refused(JobSpec(overrides={"data.train_uri": uri}), locations)
    assert error.loc == ["body", "overrides", "data.train_uri"]
    assert problem in error.message
    assert ALLOWED in error.message


def test_the_test_split_and_a_whole_data_section_are_checked_too(locations):
    error = refused(JobSpec(overrides={"data.test_uri": "/etc/shadow"}), locations)
    assert error.loc == ["body", "overrides", "data.test_uri"] and "is not under data/" in error.message
    section = {"train_uri": "file:///etc/passwd", "target": "income"}
    error = refused(JobSpec(overrides={"data": section}), locations)
    assert error.loc == ["body", "overrides", "data"] and "is not under data/" in error.message


def test_a_symlink_out_of_the_data_folder_is_refused(locations, repo):
    (repo / "data" / "escape.csv").symlink_to(repo / "secret.txt")
    (repo / "data" / "etc").symlink_to("/etc", target_is_directory=True)
    for uri in ("data/escape.csv", "data/etc/passwd", f"file://{repo}/data/escape.csv"):
        error = refused(JobSpec(overrides={"data.train_uri": uri}), locations)
        assert error.loc == ["body", "overrides", "data.train_uri"]
        assert "leads out of data/ through a symlink" in error.message


def test_a_symlink_loop_is_refused(locations, repo):
    (repo / "data" / "loop").symlink_to(repo / "data" / "loop")
    error = refused(JobSpec(overrides={"data.train_uri": "data/loop"}), locations)
    assert "cannot be resolved" in error.message


@pytest.mark.parametrize(
    "uri",
    [
        "data/adult/adult.data.gz",
        "./data/adult/adult.data.gz",
        "file://data/adult/adult.data.gz",
        "data/inside.csv",  # a symlink that stays inside data/
        "data/not-there-yet.csv",  # a missing file fails when the job reads it, like any other
        "s3://platform/datasets/adult/0123abcd/adult.data.gz",
    ],
)
def test_paths_under_data_and_the_data_set_prefix_are_admitted(locations, repo, uri):
    (repo / "data" / "inside.csv").symlink_to(repo / "data" / "adult" / "adult.data.gz")
    assert admitted(JobSpec(overrides={"data.train_uri": uri}), locations).data.train_uri == uri


def test_absolute_paths_into_the_data_folder_are_admitted(locations, repo):
    for uri in (f"{repo}/data/adult/adult.data.gz", f"file://{repo}/data/adult/adult.data.gz"):
        assert admitted(JobSpec(overrides={"data.train_uri": uri}), locations).data.train_uri == uri


def test_without_a_bucket_no_object_store_location_is_open(repo):
    error = refused(JobSpec(overrides={"data.train_uri": "s3://platform/datasets/x.csv"}), DataLocations(repo))
    assert error.loc == ["body", "overrides", "data.train_uri"]
    assert "S3_BUCKET is unset" in error.message and "files under data/ in the repository" in error.message


def test_the_data_set_prefix_comes_from_the_settings(repo):
    settings = Settings(_env_file=None, s3={"bucket": "lake"}, joblimits={"dataset_prefix": "/tables"})
    where = DataLocations.from_settings(settings, repo_root=repo)
    assert where.s3_prefix == "tables/"
    assert admitted(JobSpec(overrides={"data.train_uri": "s3://lake/tables/a.csv"}), where)
    error = refused(JobSpec(overrides={"data.train_uri": "s3://lake/datasets/a.csv"}), where)
    assert "is not under s3://lake/tables/" in error.message


def test_an_admin_may_name_any_location(locations):
    for uri in ("/etc/passwd", "s3://elsewhere/x.csv", "https://example.com/a.csv"):
        spec = JobSpec(overrides={"data.train_uri": uri})
        assert admitted(spec, locations, admin=True).data.train_uri == uri


def test_data_keys_that_read_no_file_stay_open(locations):
    overrides = {"data.target": "sex", "data.columns": None, "data.header": True, "data.drop": ["fnlwgt"]}
    config = admitted(JobSpec(overrides=overrides), locations)
    assert config.data.target == "sex" and config.data.drop == ["fnlwgt"]


def test_the_config_files_own_locations_are_the_operators_choice(locations):
    # The tmp repository has no data/adult/adult.test.gz; the shipped config names it all the same.
    assert admitted(JobSpec(overrides={"train.epochs": 3}), locations).data.test_uri == "data/adult/adult.test.gz"


def test_operator_only_keys_stay_refused():
    error = refused(JobSpec(overrides={"model_name": "someone-else"}))
    assert error.loc == ["body", "overrides", "model_name"] and "only be changed by an operator" in error.message


# Cluster capacity (everyone) ---------------------------------------------------------------------


@pytest.mark.parametrize("admin", [False, True])
def test_more_workers_than_the_cluster_has_cpus_is_refused_for_everyone(admin):
    error = refused(JobSpec(overrides={"train.num_workers": 64}), admin=admin)
    assert error.loc == ["body", "overrides", "train.num_workers"]
    assert "asks for 64 workers × 1 CPU = 64 CPUs; the cluster has 4 CPUs in all" in error.message
    assert "could never start" in error.message


def test_the_cpus_the_platform_holds_for_good_are_not_a_jobs_to_take():
    spec = JobSpec(overrides={"train.num_workers": 4})
    error = refused(spec)
    assert error.loc == ["body", "overrides", "train.num_workers"]
    assert "0.5 of them held by the platform's own actors" in error.message
    assert admitted(spec, limits=JobLimitsSettings(reserved_cpus=0)).train.num_workers == 4


def test_cpus_per_worker_count_against_the_cluster():
    error = refused(JobSpec(overrides={"train.cpus_per_worker": 3}))
    assert error.loc == ["body", "overrides", "train.cpus_per_worker"]
    assert "2 workers × 3 CPUs = 6 CPUs" in error.message


@pytest.mark.parametrize("admin", [False, True])
def test_gpus_on_a_cluster_without_them_are_refused(admin):
    error = refused(JobSpec(overrides={"train.use_gpu": True}), admin=admin)
    assert error.loc == ["body", "overrides", "train.use_gpu"]
    assert "asks for 2 GPUs (one per worker); the cluster has no GPUs" in error.message
    error = refused(JobSpec(overrides={"train.use_gpu": True}), capacity=ClusterCapacity(cpus=4, gpus=1))
    assert "the cluster has 1 GPU in all" in error.message
    assert admitted(JobSpec(overrides={"train.use_gpu": True}), capacity=ClusterCapacity(cpus=4, gpus=2))


def test_a_custom_resource_no_node_advertises_is_refused():
    spec = JobSpec(overrides={"train.resources_per_worker": {"trainer": 1}})
    error = refused(spec)
    assert error.loc == ["body", "overrides", "train.resources_per_worker"]
    assert "asks for 2 of the resource 'trainer'" in error.message
    assert "has no node that advertises 'trainer'" in error.message
    too_few = ClusterCapacity(cpus=4, resources={"trainer": 1})
    assert "has 1 of it in all" in refused(spec, capacity=too_few).message
    assert admitted(spec, capacity=ClusterCapacity(cpus=4, resources={"trainer": 2}))


def test_a_tuning_job_counts_its_concurrent_trials_actors_and_one_trials_workers():
    # Every trial actor Tune starts holds its share while it waits for workers: too many of them
    # leave no room for any trial's workers, and the job never progresses.
    spec = JobSpec(kind="tune", overrides={"tune.num_samples": 14, "tune.max_concurrent_trials": 14})
    error = refused(spec, admin=True)
    assert error.loc == ["body", "overrides", "tune.max_concurrent_trials"]
    assert "14 concurrent trials × 0.25 CPUs plus 1 worker × 1 CPU for the trial that runs = 4.5 CPUs" in error.message
    assert admitted(spec, admin=True, capacity=ClusterCapacity(cpus=8))


def test_a_tuning_trial_larger_than_the_cluster_is_refused():
    error = refused(JobSpec(kind="tune", overrides={"tune.trial_workers": 4}), admin=True)
    assert error.loc == ["body", "overrides", "tune.trial_workers"]


def test_trials_ignore_train_num_workers():
    # A trial runs tune.trial_workers workers (jobs.tune.trial_config): the training count is moot.
    assert admitted(JobSpec(kind="tune", overrides={"train.num_workers": 64})).train.num_workers == 64


def test_without_a_ray_connection_only_the_caps_apply():
    spec = JobSpec(overrides={"train.num_workers": 8, "train.use_gpu": True})
    assert admitted(spec, capacity=None).train.num_workers == 8
    error = refused(JobSpec(overrides={"train.num_workers": 64}), capacity=None)
    assert "above the limit of 8 (JOBLIMITS_MAX_WORKERS)" in error.message
    assert admitted(JobSpec(overrides={"train.num_workers": 64}), admin=True, capacity=None)


# Caps (callers without the admin scope) ----------------------------------------------------------


def test_epochs_beyond_the_cap_are_refused_but_not_for_an_admin():
    spec = JobSpec(overrides={"train.epochs": 100000})
    error = refused(spec)
    assert error.loc == ["body", "overrides", "train.epochs"]
    assert "100000 is above the limit of 200 (JOBLIMITS_MAX_EPOCHS)" in error.message
    assert admitted(spec, admin=True).train.epochs == 100000


@pytest.mark.parametrize(
    ("kind", "overrides", "loc", "setting"),
    [
        ("train", {"train.num_workers": 9}, "train.num_workers", "JOBLIMITS_MAX_WORKERS"),
        ("train", {"train": {"num_workers": 9}}, "train", "JOBLIMITS_MAX_WORKERS"),
        ("train", {"train.cpus_per_worker": 5}, "train.cpus_per_worker", "JOBLIMITS_MAX_CPUS_PER_WORKER"),
        ("tune", {"tune.trial_workers": 9}, "tune.trial_workers", "JOBLIMITS_MAX_WORKERS"),
        ("tune", {"train.epochs": 201}, "train.epochs", "JOBLIMITS_MAX_EPOCHS"),
        ("tune", {"tune.num_samples": 1000}, "tune.num_samples", "JOBLIMITS_MAX_TUNE_SAMPLES"),
        ("tune", {"tune.max_concurrent_trials": 9}, "tune.max_concurrent_trials", "JOBLIMITS_MAX_CONCURRENT_TRIALS"),
        (
            "tune",
            {"tune.search_space": {"train.epochs": {"randint": [1, 100000]}}, "tune.points_to_evaluate": []},
            "tune.search_space",
            "JOBLIMITS_MAX_EPOCHS",
        ),
    ],
)
def test_each_cap_names_the_override_and_the_setting(kind, overrides, loc, setting):
    error = refused(JobSpec(kind=kind, overrides=overrides), capacity=None)
    assert error.loc == ["body", "overrides", loc]
    assert setting in error.message and "is above the limit" in error.message


def test_a_config_file_above_a_cap_is_blamed_on_the_config():
    error = refused(JobSpec(config="adult"), limits=JobLimitsSettings(max_epochs=10))
    assert error.loc == ["body", "config"]
    assert "config 'adult': train.epochs: 25 is above the limit of 10" in error.message


def test_caps_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("JOBLIMITS_MAX_EPOCHS", "5")
    monkeypatch.setenv("JOBLIMITS_DATASET_PREFIX", "tables")
    limits = Settings(_env_file=None).joblimits
    assert limits.max_epochs == 5 and limits.dataset_prefix == "tables/"
    assert refused(JobSpec(overrides={"train.epochs": 6}), limits=limits).loc == ["body", "overrides", "train.epochs"]


# The cluster's size ------------------------------------------------------------------------------


def test_capacity_from_rays_totals():
    totals = {"CPU": 8.0, "GPU": 2.0, "memory": 1e9, "trainer": 4.0, "node:10.0.0.1": 1.0}
    capacity = ClusterCapacity.from_totals(totals)
    assert (capacity.cpus, capacity.gpus) == (8.0, 2.0)
    assert capacity.resources["trainer"] == 4.0 and "CPU" not in capacity.resources
    assert ClusterCapacity.from_totals({}) == ClusterCapacity(cpus=0.0)


def test_live_capacity_is_none_outside_ray_and_the_clusters_totals_inside(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert live_capacity() is None
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "trainer": 1.0})
    assert live_capacity() == ClusterCapacity(cpus=4.0, resources={"trainer": 1.0})


def test_the_trial_actors_share_is_the_one_jobs_tune_reserves():
    from jobs.tune import TRIAL_DRIVER_CPUS

    assert admission.TRIAL_DRIVER_CPUS == TRIAL_DRIVER_CPUS
