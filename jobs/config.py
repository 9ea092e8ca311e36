"""Job configuration: everything a new tabular task needs, declared in one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.settings import REPO_ROOT

TaskType = Literal["classification", "regression"]
FeatureKind = Literal["numeric", "categorical"]
Transform = Literal["none", "log1p"]


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


class PromotionConfig(_Strict):
    metric: str | None = None  # default: roc_auc (classification) or rmse (regression)
    margin: float = 0.0
    enabled: bool = True


class JobConfig(_Strict):
    name: str
    task: TaskType = "classification"
    model_name: str | None = None  # default: the settings' model name
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)

    @model_validator(mode="after")
    def _target_not_a_feature(self) -> JobConfig:
        if self.data.target in self.data.features:
            raise ValueError(f"target column {self.data.target!r} is also declared as a feature")
        return self

    @property
    def promotion_metric(self) -> str:
        if self.promotion.metric:
            return self.promotion.metric
        return "roc_auc" if self.task == "classification" else "rmse"

    def with_overrides(self, overrides: dict[str, Any]) -> JobConfig:
        """Apply dotted overrides such as {"train.epochs": 2}."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return JobConfig.model_validate(data)


def load_config(path: str | Path) -> JobConfig:
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = REPO_ROOT / candidate
    if not candidate.exists():
        raise FileNotFoundError(f"job config {path} not found")
    with candidate.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return JobConfig.model_validate(raw)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=2` -> ("train.epochs", 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
