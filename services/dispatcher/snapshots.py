"""Feedback snapshots: the labelled predictions of a model, frozen as a Parquet file for one job.

Before the first submission of a job whose effective config has `feedback.enabled`, the dispatcher
exports the `feedback.max_rows` most recently labelled predictions of the job's registered model:
the features as the serving API recorded them, the label under the config's target column, and
the time of the label in `_feedback_at` (jobs/feedback_data.py reads it back). The file goes to

- `s3://<S3_BUCKET>/<JOBLIMITS_DATASET_PREFIX>feedback/<model>/<job id>.parquet` with an object
  store, which every node of a cluster can read;
- `<STATE_DIR>/feedback/<model>/<job id>.parquet` without one, which only works while the Ray job
  runs on the dispatcher's machine (a single-node cluster): a multi-node cluster needs S3.

The job gets its location and sha256 as `data.feedback_uri` and `data.feedback_sha256`. A retry of
the same job finds the file and reuses it, so every attempt trains on the same rows.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pyarrow.parquet as pq

from core.settings import Settings
from jobs.config import JobConfig
from jobs.data.storage import ensure_bucket, s3_client, sha256_bytes, split_s3_uri
from jobs.feedback_data import TIME_COLUMN
from services.feedback.store import FeedbackStore

Labelled = tuple[dict[str, Any], str, datetime]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot the job trains on."""

    uri: str
    sha256: str
    rows: int
    reused: bool = False  # written by an earlier attempt of the same job

    def overrides(self) -> dict[str, str]:
        return {"data.feedback_uri": self.uri, "data.feedback_sha256": self.sha256}

    def describe(self) -> str:
        earlier = ", from an earlier attempt" if self.reused else ""
        return f"feedback snapshot {self.uri}: {self.rows} labelled rows (sha256 {self.sha256[:12]}{earlier})"


@dataclass(frozen=True)
class NoSnapshot:
    """Too little feedback to be worth a snapshot: the job trains on its data set alone."""

    model: str
    rows: int
    min_rows: int

    def describe(self) -> str:
        return (
            f"no feedback snapshot: {self.rows} labelled rows of {self.model}, fewer than feedback.min_rows "
            f"{self.min_rows}; training without feedback"
        )


def snapshot_uri(settings: Settings, model: str, job_id: UUID) -> str:
    """Where a job's snapshot lives: the object store when there is one, else the state folder."""
    name = f"feedback/{model}/{job_id}.parquet"
    if settings.s3.bucket:
        return f"s3://{settings.s3.bucket}/{settings.joblimits.dataset_prefix}{name}"
    return str(Path(settings.state_dir).resolve() / name)


def _column(values: list[Any]) -> pd.Series:
    """One feature as Parquet can hold it: numbers when every recorded value is a number, else text
    (a JSON value that is neither, such as a list, as its JSON)."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pd.Series([float("nan") if v is None else float(v) for v in values], dtype="float64")
    texts = [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
    return pd.Series(texts, dtype=object)


def snapshot_frame(rows: list[Labelled], target: str) -> pd.DataFrame:
    """The rows oldest first: every recorded feature (by name), `target` from the label, `_feedback_at`."""
    ordered = sorted(rows, key=lambda row: row[2])
    # By name: the order of keys in PostgreSQL's jsonb is its own.
    names = sorted({name for features, _, _ in ordered for name in features} - {target, TIME_COLUMN})
    columns = {name: _column([features.get(name) for features, _, _ in ordered]) for name in names}
    columns[target] = pd.Series([label for _, label, _ in ordered], dtype=object)
    columns[TIME_COLUMN] = pd.Series(pd.to_datetime([at for _, _, at in ordered], utc=True))
    return pd.DataFrame(columns)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def read_existing(uri: str, settings: Settings) -> bytes | None:
    """The snapshot an earlier attempt wrote, or None."""
    if not uri.startswith("s3://"):
        path = Path(uri)
        return path.read_bytes() if path.is_file() else None
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    try:
        return bytes(s3_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "NoSuchBucket", "404"}:
            return None
        raise


def write(uri: str, data: bytes, settings: Settings) -> None:
    if not uri.startswith("s3://"):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Renamed into place: a reader (a retry, the job) never sees half a file.
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return
    bucket, key = split_s3_uri(uri)
    client = s3_client(settings)
    ensure_bucket(client, bucket)
    client.put_object(
        Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256", Metadata={"sha256": sha256_bytes(data)}
    )


def _described(uri: str, data: bytes, reused: bool) -> Snapshot:
    rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    return Snapshot(uri=uri, sha256=sha256_bytes(data), rows=int(rows), reused=reused)


async def export_snapshot(
    store: FeedbackStore, settings: Settings, config: JobConfig, job_id: UUID
) -> Snapshot | NoSnapshot:
    """The job's snapshot: the one an earlier attempt wrote, else a new one from the store; or
    NoSnapshot below `feedback.min_rows`. Raises when the database or the object store cannot be
    reached: a job asked to train on feedback never silently trains without it."""
    model = config.registered_model_name
    uri = snapshot_uri(settings, model, job_id)
    existing = await asyncio.to_thread(read_existing, uri, settings)
    if existing is not None:
        return _described(uri, existing, reused=True)
    rows = await store.labelled_rows_of_model(model, config.feedback.max_rows)
    if len(rows) < config.feedback.min_rows:
        return NoSnapshot(model, len(rows), config.feedback.min_rows)
    data = parquet_bytes(snapshot_frame(rows, config.data.target))
    await asyncio.to_thread(write, uri, data, settings)
    return _described(uri, data, reused=False)
