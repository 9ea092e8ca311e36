"""Labelled production rows as training data: read a feedback snapshot, check it, split it by time.

A snapshot is a Parquet file the dispatcher exports before a job with `feedback.enabled` starts
(services/dispatcher/snapshots.py): one row per prediction that got a true label, with the
features as the serving API recorded them, the label under the config's target column, and the
time the label arrived in `_feedback_at`. The job names it in `data.feedback_uri` with its sha256
in `data.feedback_sha256`; a file that does not match that digest is refused.

The most recent `feedback.holdout_fraction` of the rows, by label time, is the `recent` slice: never
trained on, scored by the promotion gate next to the test split. The older rows join the training
split before the schema and the preprocessor are fitted, cleaned like the data set's own rows.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from core.settings import Settings
from jobs.config import JobConfig
from jobs.data.loading import Splits, clean_frame
from jobs.data.storage import read_uri
from jobs.schema import snake_case

log = logging.getLogger(__name__)
# When the label of each row arrived: what the recent slice is cut by. The leading underscore keeps
# it apart from feature names (snake_case names never start with one).
TIME_COLUMN = "_feedback_at"


class SnapshotDigestError(ValueError):
    """The snapshot's bytes are not the ones the job was given: it changed since it was exported."""


@dataclass(frozen=True)
class FeedbackRows:
    """A snapshot read, cleaned and split: what a training run adds to its data."""

    uri: str
    sha256: str
    train: pd.DataFrame  # the older rows, appended to the training split
    recent: pd.DataFrame  # the most recent rows, held out for the gate
    dropped: int  # rows without a usable label (missing, or not one of the training data's classes)

    @property
    def rows(self) -> int:
        return len(self.train) + len(self.recent)


def read_snapshot(uri: str, expected_sha256: str | None, settings: Settings | None = None) -> tuple[pd.DataFrame, str]:
    """The snapshot as written, and its sha256; SnapshotDigestError when it is not the expected one."""
    blob = read_uri(uri, settings)
    if expected_sha256 is not None and blob.sha256 != expected_sha256:
        raise SnapshotDigestError(
            f"feedback snapshot {uri} has sha256 {blob.sha256}, not the {expected_sha256} the job was "
            "given (data.feedback_sha256): it changed after it was exported; refusing to train on it"
        )
    frame = pd.read_parquet(io.BytesIO(blob.data))
    if TIME_COLUMN not in frame.columns:
        raise ValueError(f"feedback snapshot {uri} has no {TIME_COLUMN} column: not a feedback snapshot")
    return frame, blob.sha256


def split_by_time(frame: pd.DataFrame, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(older rows, the most recent `holdout_fraction` of them) by label time, both oldest first.

    A non-zero fraction holds out at least one row: a slice asked for is never silently empty.
    """
    ordered = frame.assign(_order=range(len(frame)))
    ordered[TIME_COLUMN] = pd.to_datetime(ordered[TIME_COLUMN], utc=True)
    # Stable on ties: rows labelled at the same instant keep their order in the file.
    ordered = ordered.sort_values([TIME_COLUMN, "_order"], kind="stable").drop(columns="_order")
    held = 0 if holdout_fraction <= 0 or ordered.empty else max(1, round(len(ordered) * holdout_fraction))
    cut = len(ordered) - held
    return ordered.iloc[:cut].reset_index(drop=True), ordered.iloc[cut:].reset_index(drop=True)


def conform(rows: pd.DataFrame, config: JobConfig, like: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Snapshot rows as rows of the data set `like` (the cleaned training split), and how many were
    dropped.

    They go through the data set's own cleaning (names, missing markers, `target_rstrip`), keep
    only its columns (a feature the job does not use is left out; one the snapshot lacks is
    missing), and take its column types: numbers where it has numbers, text where it has text. A
    classification row whose label is not one of the training split's classes is dropped: feedback
    labels are the served model's class strings, and one that the data set does not know would
    add a class, a change of the serving contract no retraining should make by accident.
    """
    cleaned = clean_frame(rows.drop(columns=[TIME_COLUMN], errors="ignore"), config.data)
    target = snake_case(config.data.target)
    conformed = pd.DataFrame(index=cleaned.index)
    for column in like.columns:
        reference = like[column]
        if column not in cleaned.columns:
            conformed[column] = pd.Series(float("nan") if _numeric(reference) else None, index=cleaned.index)
            continue
        values = cleaned[column]
        if _numeric(reference):
            numbers = pd.to_numeric(values, errors="coerce")
            whole = numbers.notna().all() and bool((numbers.dropna() % 1 == 0).all())
            conformed[column] = numbers.astype(reference.dtype) if _integral(reference) and whole else numbers
        else:
            conformed[column] = values.map(_text).astype(object)
    usable = conformed[target].notna()
    if config.task == "classification":
        classes = set(like[target].dropna().astype(str))
        unknown = usable & ~conformed[target].astype(str).isin(classes)
        if unknown.any():
            found = sorted(conformed.loc[unknown, target].astype(str).unique())
            log.warning("dropping %d feedback rows labelled with classes the data set lacks: %s", unknown.sum(), found)
        usable &= ~unknown
    kept = conformed[usable].reset_index(drop=True)
    return kept, len(rows) - len(kept)


def _text(value: Any) -> Any:
    """A category as the data set writes it: a whole number recorded as 13.0 is the category "13"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _numeric(series: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series))


def _integral(series: pd.Series) -> bool:
    return bool(pd.api.types.is_integer_dtype(series))


def load_feedback(config: JobConfig, like: pd.DataFrame, settings: Settings | None = None) -> FeedbackRows | None:
    """The job's feedback snapshot, checked and split; None when the job names none."""
    uri = config.data.feedback_uri
    if uri is None:
        return None
    raw, sha256 = read_snapshot(uri, config.data.feedback_sha256, settings)
    older, recent = split_by_time(raw, config.feedback.holdout_fraction)
    train, dropped_train = conform(older, config, like)
    held, dropped_recent = conform(recent, config, like)
    rows = FeedbackRows(uri=uri, sha256=sha256, train=train, recent=held, dropped=dropped_train + dropped_recent)
    log.info(
        "feedback snapshot %s: %d rows, %d added to training, %d held out as the recent slice, %d dropped",
        uri,
        len(raw),
        len(rows.train),
        len(rows.recent),
        rows.dropped,
    )
    return rows


def with_feedback(splits: Splits, config: JobConfig, settings: Settings | None = None) -> Splits:
    """`splits` with the job's feedback: older rows appended to `train` (a `data.val_fraction` share
    of them to `val`), the recent slice apart, the
    snapshot among the sources and digests (its sha256 joins the data set's version). Unchanged
    when the job names no snapshot."""
    rows = load_feedback(config, splits.train, settings)
    if rows is None:
        return splits
    # A share of the older rows validates, as the data set's own rows do: early stopping then picks
    # the epoch that fits what production sends as well as the data set, not the data set alone.
    validating = rows.train.sample(frac=config.data.val_fraction, random_state=config.train.seed)
    training = rows.train.drop(index=validating.index)
    train = pd.concat([splits.train, training], ignore_index=True) if len(training) else splits.train
    val = pd.concat([splits.val, validating], ignore_index=True) if len(validating) else splits.val
    feedback = pd.concat([rows.train, rows.recent], ignore_index=True)
    return replace(
        splits,
        train=train,
        val=val,
        feedback=feedback,
        recent=rows.recent,
        digests={**splits.digests, rows.uri: rows.sha256},
        sources={**splits.sources, "feedback": rows.uri},
    )
