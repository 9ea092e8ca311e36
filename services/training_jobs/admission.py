"""Admission of training requests: what a request may read and what it may reserve, refused up
front with a 422 naming the field rather than failing, or waiting forever, on the cluster.

`admit` resolves the spec (`JobSpec.resolve` validates the overrides and keeps the operator-only
keys to operators) and then checks the effective config three ways:

1. Data locations, for callers without the admin scope. An override that sets `data.train_uri` or
   `data.test_uri` (directly, or through a whole `data` section) must name a file under the
   repository's `data/` folder (a relative path, an absolute path or `file://`) or a key under the
   object store's data-set prefix, `s3://<S3_BUCKET>/<JOBLIMITS_DATASET_PREFIX>`, where
   `python -m jobs.data push` uploads. `..` segments, percent-encoding (the reader never decodes
   it), other schemes, other buckets and symlinks that lead out of `data/` are refused. The
   locations a config file names are the operator's choice and are not checked. The other
   `data.*` keys (target, columns, features, ...) read no file, so they stay open to everyone.
2. Caps, for callers without the admin scope: workers, CPUs per worker, epochs, tuning samples
   and concurrent trials (`JOBLIMITS_*`). They bound the effective config, so a config file above
   a cap is refused as `["body", "config"]` (the shipped configs fit the defaults). GPUs and
   custom resources have no cap of their own: the worker cap and the cluster bound them. Admins
   skip the caps: they run the jobs the operator means to run (the retraining webhook is one).
3. Cluster capacity, for everyone: a job whose workers can never be placed would wait in Ray for
   ever and hold up every job queued behind it. Its CPUs (less what the platform's own actors
   hold for good, `JOBLIMITS_RESERVED_CPUS`), its GPUs and its custom resources are compared
   with the cluster's totals. Totals only: a worker larger than any single node, or a
   STRICT_SPREAD over more workers than nodes, is not detected; and a cluster that autoscales is
   judged by the size it has now unless the caller passes the size it may grow to.

A refusal names the override that caused it (`["body", "overrides", key]`), else the config.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from core.settings import REPO_ROOT, JobLimitsSettings, Settings
from jobs.config import JobConfig, TuneConfig, candidate_values
from jobs.data.storage import split_s3_uri
from services.training_jobs.models import InvalidJobSpecError, JobKind, JobSpec

# What each tuning trial's own actor reserves besides its Train workers (jobs.tune, which this
# module does not import: it loads torch). Ray Train's controller and the Ray job's entrypoint
# reserve no CPU, so outside tuning a job's CPUs are its workers' alone.
TRIAL_DRIVER_CPUS = 0.25
# Ray rounds resource amounts; a request equal to the total must not fail on float noise.
TOLERANCE = 1e-6
URI_FIELDS = ("train_uri", "test_uri", "feedback_uri")
SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
WORKERS_FIELD: dict[JobKind, str] = {"train": "train.num_workers", "tune": "tune.trial_workers"}


@dataclass(frozen=True)
class ClusterCapacity:
    """Everything the cluster's nodes advertise together, as `ray.cluster_resources()` reports it."""

    cpus: float
    gpus: float = 0.0
    # Every other resource by name: custom ones (`ray start --resources`), memory, node labels.
    resources: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_totals(cls, totals: Mapping[str, float]) -> ClusterCapacity:
        others = {name: amount for name, amount in totals.items() if name not in {"CPU", "GPU"}}
        return cls(cpus=totals.get("CPU", 0.0), gpus=totals.get("GPU", 0.0), resources=others)


def live_capacity() -> ClusterCapacity | None:
    """The cluster this process is connected to (a Serve replica is), or None outside Ray.

    Asked per request: nodes join and leave, and it is one round trip to the GCS.
    """
    import ray

    if not ray.is_initialized():
        return None
    return ClusterCapacity.from_totals(ray.cluster_resources())  # type: ignore[no-untyped-call]  # Ray leaves it untyped


@dataclass(frozen=True)
class DataLocations:
    """Where a request without the admin scope may point a job's data."""

    # Relative data paths are read against the repository root; only its data/ folder is open.
    repo_root: Path
    s3_bucket: str | None = None
    s3_prefix: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, repo_root: Path = REPO_ROOT) -> DataLocations:
        return cls(repo_root=repo_root, s3_bucket=settings.s3.bucket, s3_prefix=settings.joblimits.dataset_prefix)

    @property
    def data_dir(self) -> Path:
        return self.repo_root / "data"

    def describe(self) -> str:
        local = "files under data/ in the repository"
        if not self.s3_bucket:
            return local
        return f"{local} or objects under s3://{self.s3_bucket}/{self.s3_prefix}"

    def problem(self, uri: str) -> str | None:
        """Why a job may not read this URI, or None."""
        if "%" in uri:
            # The reader takes `%2e%2e` literally; refusing it leaves no doubt about what is read.
            return "contains percent-encoding"
        if uri.startswith("s3://"):
            return self._s3_problem(uri)
        if uri.startswith("file://"):
            return self._local_problem(uri.removeprefix("file://"))
        scheme = SCHEME.match(uri)
        if scheme:
            return f"uses the {scheme['scheme']!r} scheme; only local paths and s3:// URIs are read"
        return self._local_problem(uri)

    def _local_problem(self, text: str) -> str | None:
        path = PurePosixPath(text)
        if ".." in path.parts:
            return "contains '..'"
        # A relative path is read from the job's working directory first: only one that starts
        # at data/ means the data folder there and in the repository alike.
        if not path.is_absolute() and path.parts[:1] != ("data",):
            return "is not under data/"
        full = self.repo_root / path  # an absolute path replaces the root
        try:
            data_dir = self.data_dir.resolve()
            if not any(full.is_relative_to(folder) for folder in (self.data_dir, data_dir)):
                return "is not under data/"
            inside = full.resolve().is_relative_to(data_dir)
        except (OSError, RuntimeError):  # a symlink loop, an unreadable folder
            return "cannot be resolved"
        return None if inside else "leads out of data/ through a symlink"

    def _s3_problem(self, uri: str) -> str | None:
        if not self.s3_bucket:
            return "names the object store, which no request may read while S3_BUCKET is unset"
        parsed = urlparse(uri)
        if parsed.query or parsed.fragment:
            return "carries a query or a fragment"
        try:
            bucket, key = split_s3_uri(uri)  # the reader's own parsing: the key checked is the key read
        except ValueError:
            return "is not an s3://bucket/key URI"
        if bucket != self.s3_bucket or not key.startswith(self.s3_prefix):
            return f"is not under s3://{self.s3_bucket}/{self.s3_prefix}"
        if any(segment in {"", ".", ".."} for segment in key.split("/")):
            # Some S3-compatible servers normalise such paths: the key read could leave the prefix.
            return "has an empty, '.' or '..' path segment"
        return None


@dataclass(frozen=True)
class Demand:
    """What a job holds at once: its workers, plus the actors of the trials tuning starts together
    (each waits on its own workers, so all of them and one trial's workers must fit)."""

    workers: int
    cpus_per_worker: float
    use_gpu: bool
    resources_per_worker: Mapping[str, float]
    trial_actors: int = 0

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.trial_actors * TRIAL_DRIVER_CPUS


def demand_of(kind: JobKind, config: JobConfig) -> Demand:
    train = config.train
    workers, trial_actors = train.num_workers, 0
    if kind == "tune" and config.tune is not None:
        # A trial replaces train.num_workers with tune.trial_workers (jobs.tune.trial_config).
        workers = config.tune.trial_workers
        trial_actors = min(config.tune.max_concurrent_trials, config.tune.num_samples)
    return Demand(workers, train.cpus_per_worker, train.use_gpu, train.resources_per_worker, trial_actors)


def admit(
    spec: JobSpec,
    *,
    admin: bool,
    limits: JobLimitsSettings,
    capacity: ClusterCapacity | None,
    locations: DataLocations,
) -> JobConfig:
    """The job config a request may run; raises InvalidJobSpecError naming the field at fault.

    `capacity` None (no Ray connection) leaves only the per-setting caps.
    """
    config = spec.resolve(operator=admin)
    if not admin:
        check_data_locations(spec, config, locations)
    # Before the caps: "could never start on this cluster" says more than "above the limit".
    if capacity is not None:
        check_capacity(spec, config, capacity, limits.reserved_cpus)
    if not admin:
        check_caps(spec, config, limits)
    return config


def check_data_locations(spec: JobSpec, config: JobConfig, locations: DataLocations) -> None:
    for name in URI_FIELDS:
        key = override_key(spec, f"data.{name}")
        uri = getattr(config.data, name)
        if key is None or uri is None:
            continue
        problem = locations.problem(uri)
        if problem:
            raise InvalidJobSpecError(
                ["body", "overrides", key],
                f"overrides: {key}: {_shown(uri)} {problem}; a training request may read only "
                f"{locations.describe()} (a key with the admin scope may name any location)",
            )


def check_caps(spec: JobSpec, config: JobConfig, limits: JobLimitsSettings) -> None:
    for paths, value, setting in _capped_values(spec.kind, config):
        cap = getattr(limits, setting)
        if value > cap:
            env = f"JOBLIMITS_{setting.upper()}"
            problem = f"{value:g} is above the limit of {cap:g} ({env}); a key with the admin scope may exceed it"
            raise refusal(spec, paths, problem)


def _capped_values(kind: JobKind, config: JobConfig) -> Iterator[tuple[Sequence[str], float, str]]:
    """(config paths that set the value, the value, the JobLimitsSettings field that caps it)."""
    train, tune = config.train, config.tune
    yield [WORKERS_FIELD[kind]], demand_of(kind, config).workers, "max_workers"
    yield ["train.cpus_per_worker"], train.cpus_per_worker, "max_cpus_per_worker"
    if kind == "train" or tune is None:
        yield ["train.epochs"], train.epochs, "max_epochs"
        return
    epoch_paths, epochs = _tuned_epochs(tune, train.epochs)
    yield epoch_paths, epochs, "max_epochs"
    yield ["tune.num_samples"], tune.num_samples, "max_tune_samples"
    yield ["tune.max_concurrent_trials"], tune.max_concurrent_trials, "max_concurrent_trials"


def _tuned_epochs(tune: TuneConfig, train_epochs: int) -> tuple[Sequence[str], int]:
    """The most epochs a trial may run: the search space's, when it varies them."""
    spec = tune.search_space.get("train.epochs")
    if spec is None:
        return ["train.epochs"], train_epochs
    values = candidate_values(spec) + [p["train.epochs"] for p in tune.points_to_evaluate if "train.epochs" in p]
    return ["tune.search_space", "tune.points_to_evaluate"], max(int(v) for v in values)


def check_capacity(spec: JobSpec, config: JobConfig, capacity: ClusterCapacity, reserved_cpus: float) -> None:
    demand = demand_of(spec.kind, config)
    workers_field = WORKERS_FIELD[spec.kind]
    usable = capacity.cpus - reserved_cpus
    if demand.cpus > usable + TOLERANCE:
        held = f", {reserved_cpus:g} of them held by the platform's own actors" if reserved_cpus else ""
        raise refusal(
            spec,
            _cpu_paths(spec.kind),
            f"asks for {_cpu_sum(demand)}; the cluster has {_count(capacity.cpus, 'CPU')} in all{held}, "
            "so the job could never start",
        )
    if demand.use_gpu and demand.workers > capacity.gpus + TOLERANCE:
        has = f"has {_count(capacity.gpus, 'GPU')} in all" if capacity.gpus else "has no GPUs"
        raise refusal(
            spec,
            ["train.use_gpu", workers_field],
            f"asks for {_count(demand.workers, 'GPU')} (one per worker); the cluster {has}",
        )
    for name, amount in sorted(demand.resources_per_worker.items()):
        _check_custom(spec, name, amount * demand.workers, capacity, workers_field)


def _check_custom(spec: JobSpec, name: str, needed: float, capacity: ClusterCapacity, workers_field: str) -> None:
    have = capacity.resources.get(name, 0.0)
    if needed <= have + TOLERANCE:
        return
    has = f"has {have:g} of it in all" if have else f"has no node that advertises {name!r}"
    raise refusal(
        spec,
        ["train.resources_per_worker", workers_field],
        f"asks for {needed:g} of the resource {name!r} across its workers; the cluster {has}",
    )


def _cpu_paths(kind: JobKind) -> Sequence[str]:
    if kind == "train":
        return ["train.num_workers", "train.cpus_per_worker"]
    return ["tune.max_concurrent_trials", "tune.trial_workers", "train.cpus_per_worker", "tune.num_samples"]


def _cpu_sum(demand: Demand) -> str:
    workers = f"{_count(demand.workers, 'worker')} × {_count(demand.cpus_per_worker, 'CPU')}"
    total = _count(demand.cpus, "CPU")
    if not demand.trial_actors:
        return f"{workers} = {total}"
    actors = f"{_count(demand.trial_actors, 'concurrent trial')} × {_count(TRIAL_DRIVER_CPUS, 'CPU')}"
    return f"{actors} plus {workers} for the trial that runs = {total}"


def override_key(spec: JobSpec, path: str) -> str | None:
    """The override that sets this dotted config path: the path itself, a section above it or a
    key inside it. The last one wins, as in JobConfig.with_overrides."""
    found = None
    for key in spec.overrides:
        if key == path or path.startswith(f"{key}.") or key.startswith(f"{path}."):
            found = key
    return found


def refusal(spec: JobSpec, paths: Sequence[str], problem: str) -> InvalidJobSpecError:
    """The error for a bound broken at these config paths: blamed on the first of them an override
    set, else on the config file."""
    for path in paths:
        key = override_key(spec, path)
        if key is not None:
            return InvalidJobSpecError(["body", "overrides", key], f"overrides: {key}: {problem}")
    return InvalidJobSpecError(["body", "config"], f"config {spec.config_name!r}: {paths[0]}: {problem}")


def _count(amount: float, noun: str) -> str:
    return f"{amount:g} {noun}" if amount == 1 else f"{amount:g} {noun}s"


def _shown(uri: str) -> str:
    return repr(uri if len(uri) <= 200 else f"{uri[:200]}...")
