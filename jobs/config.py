"""Job configuration: everything a new tabular task needs, declared in one YAML file."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from core.settings import REPO_ROOT
from jobs.schema import FeatureKind, TaskType, Transform

# Named like the ray.tune functions they become; randint's upper bound is exclusive, as in Ray.
Distribution = Literal["uniform", "loguniform", "randint", "choice"]
TuneMetric = Literal["best_val_loss", "val_loss", "train_loss", "val_accuracy"]
# Ray placement group strategies (ray.train.ScalingConfig.placement_strategy).
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureDecl(_Strict):
    kind: FeatureKind
    transform: Transform = "none"
    # Numeric only: also embed the value's quantile bucket, so the MLP can learn thresholds
    # (capital gains, age bands) without having to carve them out of one linear input.
    buckets: int = Field(default=0, ge=0, le=256)


class DataConfig(_Strict):
    train_uri: str
    test_uri: str | None = None  # without one, test_fraction of the training data is held out
    format: Literal["csv", "parquet"] | None = None  # inferred from the URI when omitted
    header: bool = True
    columns: list[str] | None = None  # names for header-less CSV files
    skip_rows: int = 0
    test_skip_rows: int | None = None
    na_values: list[str] = Field(default_factory=lambda: ["?", ""])
    target: str
    # Strip these characters from the end of target labels ("<=50K." in Adult's test split).
    target_rstrip: str = ""
    # Declared features; any column left out is inferred unless `infer_features` is false.
    features: dict[str, FeatureDecl] = Field(default_factory=dict)
    infer_features: bool = True
    drop: list[str] = Field(default_factory=list)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    # A snapshot of labelled production rows (Parquet, jobs/feedback_data.py) to train on as well,
    # and its sha256: set by the dispatcher for a job with `feedback.enabled`, never by hand.
    feedback_uri: str | None = None
    feedback_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _digest_names_a_snapshot(self) -> DataConfig:
        if self.feedback_sha256 is not None and self.feedback_uri is None:
            raise ValueError("data.feedback_sha256 is set without data.feedback_uri")
        return self


class ModelConfig(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = Field(default=0.1, ge=0, lt=1)
    max_embedding_dim: int = Field(default=16, ge=1)


class TrainConfig(_Strict):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=256, ge=1)  # per worker
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    patience: int = Field(default=4, ge=1)
    # Learning rate is multiplied by this factor after `lr_patience` epochs without improvement.
    lr_decay: float = Field(default=0.3, gt=0, le=1)
    lr_patience: int = Field(default=1, ge=0)
    seed: int = 42
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # Custom Ray resources every worker reserves besides its CPUs (GPUs come from use_gpu): workers
    # go only to nodes that advertise them, e.g. {"trainer": 1} for a node group started with
    # `ray start --resources '{"trainer": 4}'`.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # How the workers' resource bundles are placed on the cluster's nodes: PACK fills one node
    # first (less network traffic for DDP), SPREAD puts them on different nodes where possible.
    placement_strategy: PlacementStrategy = "PACK"

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, resources: dict[str, float]) -> dict[str, float]:
        # One place per resource: CPU and GPU would silently fight cpus_per_worker and use_gpu.
        clash = sorted(set(resources) & {"CPU", "GPU"})
        if clash:
            raise ValueError(f"set {clash} through cpus_per_worker and use_gpu, not resources_per_worker")
        negative = sorted(name for name, amount in resources.items() if amount <= 0)
        if negative:
            raise ValueError(f"resources_per_worker amounts must be positive: {negative}")
        return resources


# How the gate weighs the recent feedback slice against the test split (docs/promotion.md).
RecentRule = Literal["recent_and_test", "recent_only", "test_only"]


RolloutMode = Literal["immediate", "shadow", "canary"]


class RolloutPolicy(_Strict):
    """How a candidate that passed the gate reaches the clients (docs/rollout.md): at once
    (`immediate`), after a window as a shadow that scores mirrored requests (`shadow`), or answering
    growing shares of the traffic (`canary`). The window and thresholds left unset come from the
    ROLLOUT_* settings."""

    mode: RolloutMode = "immediate"
    # Canary shares, increasing, each judged before the next; reaching 1.0 is the promotion.
    canary_steps: list[float] = Field(default_factory=lambda: [0.05, 0.25, 1.0], min_length=1, max_length=10)
    window_requests: int | None = Field(default=None, ge=1)
    window_s: float | None = Field(default=None, gt=0)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _increasing_shares(self) -> RolloutPolicy:
        steps = self.canary_steps
        if any(not 0 < share <= 1 for share in steps):
            raise ValueError("canary_steps are shares of the traffic in (0, 1]")
        if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
            raise ValueError("canary_steps must increase")
        return self

    @property
    def judged_steps(self) -> list[float]:
        """The shares the candidate answers before it is promoted (1.0 is the promotion itself)."""
        return [share for share in self.canary_steps if share < 1]


class PromotionConfig(_Strict):
    metric: str | None = None  # default: roc_auc (classification) or rmse (regression)
    margin: float = 0.0
    enabled: bool = True
    # With a recent feedback slice: `recent_and_test` promotes a candidate that beats the champion
    # on the slice by more than `margin` and is not worse on the test split by more than
    # `test_tolerance`; `recent_only` looks at the slice alone; `test_only` ignores it.
    recent_rule: RecentRule = "recent_and_test"
    test_tolerance: float = Field(default=0.02, ge=0)
    # What happens to a candidate that passed: changed through a request's overrides by admins only.
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)


class FeedbackConfig(_Strict):
    """Retraining on what production saw: the labelled predictions of the registered model (the
    features as recorded, the label from feedback) added to the training data."""

    enabled: bool = False
    # The most recent share of the labelled rows, by the time of their label: held out, never
    # trained on, and scored by the gate next to the test split.
    holdout_fraction: float = Field(default=0.3, ge=0, lt=1)
    max_rows: int = Field(default=100_000, ge=1)  # the most recent labelled rows exported
    # Fewer labelled rows than this: no snapshot, the job trains on its data set alone.
    min_rows: int = Field(default=50, ge=1)
    # A job queued before its labels exist (by an alert that needs none) stays queued until
    # `min_rows` labels of the model arrived after it was queued, at most this long (0: no wait).
    wait_s: float = Field(default=0.0, ge=0, le=30 * 24 * 3600)

    @model_validator(mode="after")
    def _min_within_max(self) -> FeedbackConfig:
        if self.min_rows > self.max_rows:
            raise ValueError(f"feedback.min_rows {self.min_rows} is above feedback.max_rows {self.max_rows}")
        return self


# Trials share one fitted preprocessor and one set of datasets, and their resources are reserved
# before any of them starts: only the model and the optimisation may vary between trials.
TUNABLE_SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "train": TrainConfig}
FIXED_TRAIN_FIELDS = frozenset({"num_workers", "use_gpu", "cpus_per_worker", "resources_per_worker"})


def _check_tunable_key(key: str) -> None:
    section, _, leaf = key.partition(".")
    model = TUNABLE_SECTIONS.get(section)
    if model is None or not leaf or "." in leaf:
        sections = ", ".join(f"{name}.<field>" for name in TUNABLE_SECTIONS)
        raise ValueError(f"search space key {key!r} is not a config path of the form {sections}")
    if leaf not in model.model_fields:
        raise ValueError(f"search space key {key!r}: {section} has no field {leaf!r}")
    if section == "train" and leaf in FIXED_TRAIN_FIELDS:
        raise ValueError(f"search space key {key!r} sets trial resources; use tune.trial_workers instead")


def _check_distribution(key: str, spec: dict[Distribution, list[Any]]) -> None:
    if len(spec) != 1:
        raise ValueError(f"search space key {key!r} needs exactly one distribution, got {sorted(spec) or 'none'}")
    ((kind, args),) = spec.items()
    if kind == "choice":
        if not args:
            raise ValueError(f"search space key {key!r}: choice needs at least one option")
        return
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise ValueError(f"search space key {key!r}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if low >= high:
        raise ValueError(f"search space key {key!r}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"search space key {key!r}: loguniform needs a positive lower bound, got {low!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"search space key {key!r}: randint needs integer bounds, got {args!r}")


def candidate_values(spec: dict[Distribution, list[Any]]) -> list[Any]:
    """Values that bound what a distribution can sample, to validate them before any trial runs."""
    ((kind, args),) = spec.items()
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]  # the upper bound is exclusive
    return list(args)


class TuneConfig(_Strict):
    """Hyperparameter search with Ray Tune: what to vary, how many trials, when to stop them."""

    num_samples: int = Field(default=8, ge=1)  # trials in all, points_to_evaluate included
    # Two one-worker trials keep both cores of a 2-core machine busy without oversubscribing it.
    max_concurrent_trials: int = Field(default=2, ge=1)
    metric: TuneMetric = "best_val_loss"  # reported by the training loop after every epoch
    # ASHA: every trial runs `grace_period` epochs; at each rung only 1/reduction_factor go on.
    grace_period: int = Field(default=3, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1)
    trial_workers: int = Field(default=1, ge=1)  # Ray Train workers per trial (train.num_workers)
    # Dotted config key -> one distribution, e.g. {"train.lr": {"loguniform": [5e-4, 1e-2]}}.
    search_space: dict[str, dict[Distribution, list[Any]]] = Field(min_length=1)
    # Trials to run first with fixed values (keys from search_space), e.g. the untuned defaults.
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("search_space")
    @classmethod
    def _valid_space(cls, space: dict[str, dict[Distribution, list[Any]]]) -> dict[str, dict[Distribution, list[Any]]]:
        for key, spec in space.items():
            _check_tunable_key(key)
            _check_distribution(key, spec)
        return space

    @model_validator(mode="after")
    def _points_in_space(self) -> TuneConfig:
        for index, point in enumerate(self.points_to_evaluate):
            unknown = sorted(set(point) - set(self.search_space))
            if unknown:
                raise ValueError(f"points_to_evaluate[{index}] sets {unknown}, which are not in search_space")
        if len(self.points_to_evaluate) > self.num_samples:
            raise ValueError("points_to_evaluate has more points than num_samples trials")
        return self

    @property
    def mode(self) -> Literal["min", "max"]:
        # Derived, so that a metric and its direction cannot disagree.
        return "max" if self.metric.endswith("accuracy") else "min"


# A registered model's name ends up in URLs (`/v1/models/{name}`) and metric labels.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# What only an operator may change through a training request's overrides: which registered model
# a job writes to, and the rules of the gate that decides whether it replaces that model's champion.
OPERATOR_ONLY_KEYS = ("name", "model_name", "promotion")


def operator_only(key: str) -> bool:
    """Whether a dotted override key (`promotion.margin`) touches an operator-only setting."""
    return any(key == root or key.startswith(f"{root}.") for root in OPERATOR_ONLY_KEYS)


class JobConfig(_Strict):
    # The task's name; it is also its registered model's name unless `model_name` says otherwise.
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    task: TaskType = "classification"
    model_name: str | None = Field(default=None, pattern=MODEL_NAME_PATTERN)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    tune: TuneConfig | None = None  # only `python -m jobs.tune` reads it

    @model_validator(mode="after")
    def _target_not_a_feature(self) -> JobConfig:
        if self.data.target in self.data.features:
            raise ValueError(f"target column {self.data.target!r} is also declared as a feature")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_tune(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Training runs log the dumped config as params and as an artifact: keep them as they were.
        data: dict[str, Any] = handler(self)
        if self.tune is None:
            data.pop("tune", None)
        return data

    @model_validator(mode="after")
    def _trial_values_valid(self) -> JobConfig:
        """Fail at load time, not in a trial an hour later, when a sampled value breaks the config."""
        if self.tune is None:
            return self
        if self.task == "regression" and self.tune.metric.endswith("accuracy"):
            raise ValueError(f"tune.metric {self.tune.metric!r} is not reported for regression tasks")
        # Without the tune section: validating a trial config must not recurse into this check.
        base = self.model_dump(exclude={"tune"})
        checks = [
            (f"search_space[{k!r}]", {k: v}) for k, s in self.tune.search_space.items() for v in candidate_values(s)
        ]
        checks += [(f"points_to_evaluate[{i}]", p) for i, p in enumerate(self.tune.points_to_evaluate)]
        for where, overrides in checks:
            try:
                JobConfig.model_validate(apply_overrides(base, overrides))
            except ValidationError as exc:
                errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"tune.{where}: {overrides} gives an invalid config ({errors})") from None
        return self

    @property
    def registered_model_name(self) -> str:
        """The registered model this job adds a version to: never another task's by default."""
        return self.model_name or self.name

    @property
    def promotion_metric(self) -> str:
        if self.promotion.metric:
            return self.promotion.metric
        return "roc_auc" if self.task == "classification" else "rmse"

    def with_overrides(self, overrides: dict[str, Any]) -> JobConfig:
        """Apply dotted overrides such as {"train.epochs": 2}."""
        return JobConfig.model_validate(apply_overrides(self.model_dump(), overrides))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dumped config with dotted overrides such as {"train.epochs": 2} set in it."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            # An optional section that is unset dumps as None (`tune`): start it empty.
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return data


def read_config_file(path: str | Path, what: str) -> Any:
    """The YAML document of a config file; a relative path that does not exist from here is taken
    from the repository's root. FileNotFoundError names `what` (e.g. "job config")."""
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = REPO_ROOT / candidate
    if not candidate.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    with candidate.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_config(path: str | Path) -> JobConfig:
    return JobConfig.model_validate(read_config_file(path, "job config"))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=2` -> ("train.epochs", 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
