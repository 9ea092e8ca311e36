"""Request and response bodies of the inference API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.rollout.models import RolloutOverview

EXAMPLE_ROW: dict[str, Any] = {
    "age": 39,
    "workclass": "State-gov",
    "fnlwgt": 77516,
    "education": "Bachelors",
    "education_num": 13,
    "marital_status": "Never-married",
    "occupation": "Adm-clerical",
    "relationship": "Not-in-family",
    "race": "White",
    "sex": "Male",
    "capital_gain": 2174,
    "capital_loss": 0,
    "hours_per_week": 40,
    "native_country": "United-States",
}


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"instances": [EXAMPLE_ROW]}]})
    instances: list[dict[str, Any]] = Field(
        ..., min_length=1, description="feature rows; field names and types follow the served model's schema"
    )


class ColumnsRequest(BaseModel):
    """The rows of `instances` as one list per feature: row i is the i-th value of every list."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"columns": {k: [v] for k, v in EXAMPLE_ROW.items()}}]}
    )
    columns: dict[str, list[Any]] = Field(
        ...,
        min_length=1,
        description="one list of values per feature, all of the same length (at least 1); names and types "
        "follow the served model's schema, and a bad value is reported as `instances` would report it "
        '(`["body", "instances", row, field]`)',
    )


# Request bodies of the predict routes besides JSON, by Content-Type.
ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet")
_TABLE_BODY = (
    "a table with one column per feature of the served model (numbers in integer or floating-point columns, "
    "categories in string columns, plain or dictionary-encoded; nulls where the schema allows them)"
)


# The predict routes' bodies besides JSON (whose models FastAPI documents), by Content-Type.
PREDICT_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "the rows to predict: JSON `instances` (an object per row) or `columns` (a list per feature), "
    "an Arrow IPC stream, or a Parquet file; at most MAX_BATCH_ROWS rows, each form validated alike",
    "content": {
        ARROW_STREAM: {
            "schema": {"type": "string", "format": "binary"},
            "description": f"an Arrow IPC stream (uncompressed): {_TABLE_BODY}",
        },
        **{
            media_type: {
                "schema": {"type": "string", "format": "binary"},
                "description": f"a Parquet file: {_TABLE_BODY}",
            }
            for media_type in PARQUET_TYPES
        },
    },
}


class ModelRef(BaseModel):
    name: str
    version: str
    run_id: str


class Prediction(BaseModel):
    label: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    predictions: list[Prediction]


class FeatureInfo(BaseModel):
    name: str
    kind: str
    categories: list[str] = []
    nullable: bool = False


class RefusedSwapInfo(BaseModel):
    """The alias names a version this replica refuses to serve: it breaks the served version's
    contract (task, target, classes or input schema) and no operator approved the change."""

    version: str
    reason: str
    since: float


class CurrentModel(BaseModel):
    name: str
    version: str
    run_id: str
    alias: str
    loaded_at: float
    task: str
    target: str
    classes: list[str] | None
    features: list[FeatureInfo]
    metrics: dict[str, float]
    swap_refused: RefusedSwapInfo | None = None
    rollout: RolloutOverview | None = Field(
        default=None,
        description="the model's shadow or canary rollout (challenger, mode, step, share, figures so far) and "
        "its probation after a promotion, as the rollout service recorded them, with their latest events; "
        "null without a rollout service (no DATABASE_URL) or when its records could not be read",
    )
    rollout_error: str | None = Field(default=None, description="why the rollout records could not be read")


class ServedModel(BaseModel):
    """A registered model with a champion alias: the API serves it at /v1/models/{name}/predict."""

    name: str
    default: bool = Field(description="whether /v1/predict and /v1/models/current answer with it (MODEL_NAME)")
    champion_version: str = Field(description="the version the champion alias names in the registry now")
    serving: CurrentModel | None = Field(
        default=None, description="the version this replica answers with, its schema and test metrics"
    )
    error: str | None = Field(default=None, description="why this replica could not load it")


class ModelList(BaseModel):
    models: list[ServedModel]


class FeatureDriftInfo(BaseModel):
    """How one feature (or the model's output) of the recent traffic compares with the training data."""

    name: str = Field(description="the feature; for the output: positive, labels or value")
    kind: str = Field(description="numeric or categorical")
    test: str = Field(
        description="ks or chi2 (score is a p-value, drifted below the threshold); wasserstein or "
        "jensen_shannon (score is a distance, drifted at or above it)"
    )
    score: float
    threshold: float
    drifted: bool
    psi: float = Field(description="population stability index (reported, not judged)")
    window_rows: int = Field(description="values of the feature in the window (missing ones left out)")


class ModelMonitoring(BaseModel):
    """The live monitor's latest judgement of the version this replica serves: the drift of its
    recent traffic against its training data, and its accuracy estimated from its calibrated
    probabilities next to the accuracy measured from feedback."""

    model: str
    version: str
    status: Literal["ok", "pending", "too_few_rows", "no_reference_profile"] = Field(
        description="ok: judged; pending: not judged yet; too_few_rows: fewer than min_rows predictions in the "
        "window; no_reference_profile: the version was trained without a reference profile"
    )
    computed_at: datetime | None = Field(description="when the monitor judged it (null while pending)")
    window_rows: int = Field(description="recent predictions judged")
    min_rows: int
    drift_share: float | None = Field(description="share of the features that drifted")
    drift_share_threshold: float
    dataset_drift: bool = Field(description="whether drift_share reached its threshold")
    features: list[FeatureDriftInfo]
    prediction: FeatureDriftInfo | None = Field(description="drift of the model's outputs")
    estimated_accuracy: float | None = Field(description="mean top-class probability of the window")
    estimated_roc_auc: float | None = Field(description="binary classifiers")
    reference_accuracy: float | None = Field(description="on the validation split at training")
    measured_accuracy: float | None = Field(
        description="from the feedback of the live accuracy window, once it holds ACCURACY_MIN_FEEDBACK labels"
    )
    measured_feedback: int = Field(description="labels received in the live accuracy window")


class ErrorDetail(BaseModel):
    loc: list[Any] | None = None
    msg: str
    type: str | None = None
    # Machine-readable particulars, as in FastAPI's own validation errors (the scope a key lacks,
    # the job an idempotency key belongs to).
    ctx: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"request_id": "4f1c0c1e9b3a4d6e8f00a1b2c3d4e5f6", "index": 0, "label": ">50K"}]
        },
    )
    request_id: str = Field(..., min_length=1, max_length=128, description="the request_id of a /v1/predict response")
    index: int = Field(0, ge=0, description="which instance of that request (0 for the first)")
    label: str = Field(..., min_length=1, max_length=200, description="the true label")

    @field_validator("request_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        # The API only hands out printable ids; PostgreSQL's text cannot hold NUL, nor UTF-8 a lone surrogate.
        if not value.isprintable():
            raise ValueError("must be the printable request_id of a /v1/predict response")
        return value


class FeedbackResponse(BaseModel):
    request_id: str
    index: int
    label: str
    outcome: str = Field(..., description="recorded, or duplicate when a label was already given (the first one stays)")
    predicted: str | None
    correct: bool | None
    model: dict[str, str]


class Alert(BaseModel):
    status: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    # RFC 3339; Alertmanager writes the fraction with varying precision (its API and its webhook
    # differ), so an episode is named by its start to the second.
    startsAt: str = Field(..., pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")  # noqa: N815 - Alertmanager's names
    endsAt: str | None = None  # noqa: N815
    fingerprint: str = Field(..., min_length=1, max_length=64)

    @property
    def episode(self) -> str:
        """One firing episode of this alert: it keeps its start time until it resolves."""
        return self.startsAt[:19]


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook body (version 4); fields this API does not use are ignored."""

    version: str = "4"
    status: str
    receiver: str = ""
    groupKey: str = ""  # noqa: N815
    alerts: list[Alert] = Field(default_factory=list, max_length=1000)


class RetrainRequest(BaseModel):
    alert: str
    fingerprint: str
    model: str = Field(description="the registered model the alert is about, which the job retrains")
    config: str = Field(description="the config in jobs/configs the job trains")
    job_id: str
    created: bool


class RetrainRefusal(BaseModel):
    """A firing retrain alert that queued nothing, because no config can safely retrain its model."""

    alert: str
    fingerprint: str
    model: str | None
    reason: str


class AlertWebhookResponse(BaseModel):
    retrain: list[RetrainRequest]
    refused: list[RetrainRefusal] = Field(default_factory=list)
