"""Parse and clean tabular data sets into pandas frames, with their digests."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.settings import Settings
from jobs.config import DataConfig, JobConfig
from jobs.data.storage import Blob, read_uri
from jobs.schema import snake_case


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    digests: dict[str, str] = field(default_factory=dict)  # uri -> sha256
    sources: dict[str, str] = field(default_factory=dict)  # split name -> uri
    # Labelled production rows (jobs/feedback_data.py), when the job trains on feedback: every
    # usable row of the snapshot, and the most recent of them, held out of `train` for the gate.
    feedback: pd.DataFrame | None = None
    recent: pd.DataFrame | None = None


def _format_of(uri: str, declared: str | None) -> str:
    if declared:
        return declared
    bare = uri.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst")
    return "parquet" if bare.endswith((".parquet", ".pq")) else "csv"


def _compression_of(uri: str) -> str | None:
    lowered = uri.lower()
    for suffix, name in ((".gz", "gzip"), (".bz2", "bz2"), (".zst", "zstd"), (".xz", "xz")):
        if lowered.endswith(suffix):
            return name
    return None


def parse_blob(blob: Blob, cfg: DataConfig, skip_rows: int) -> pd.DataFrame:
    if _format_of(blob.uri, cfg.format) == "parquet":
        frame = pd.read_parquet(io.BytesIO(blob.data))
    else:
        frame = pd.read_csv(
            io.BytesIO(blob.data),
            compression=_compression_of(blob.uri),
            header=0 if cfg.header else None,
            names=cfg.columns,
            skiprows=skip_rows,
            na_values=cfg.na_values,
            keep_default_na=True,
            skipinitialspace=True,
            comment=None,
        )
    return clean_frame(frame, cfg)


def clean_frame(frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """snake_case names, trimmed strings, declared missing markers as NaN, clean target labels."""
    frame = frame.rename(columns={c: snake_case(str(c)) for c in frame.columns})
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            stripped = frame[column].astype("string").str.strip()
            frame[column] = stripped.where(~stripped.isin(cfg.na_values)).astype(object)
            frame.loc[frame[column].isna(), column] = np.nan
    target = snake_case(cfg.target)
    if target not in frame.columns:
        raise ValueError(f"target column {cfg.target!r} not in the data (columns: {list(frame.columns)})")
    if cfg.target_rstrip and frame[target].dtype == object:
        frame[target] = frame[target].str.rstrip(cfg.target_rstrip)
    frame = frame.dropna(subset=[target]).reset_index(drop=True)
    # Blank trailing lines in CSV files come through as all-NaN rows.
    return frame.dropna(how="all").reset_index(drop=True)


def _split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frame))
    cut = round(len(frame) * fraction)
    held = frame.iloc[order[:cut]].reset_index(drop=True)
    rest = frame.iloc[order[cut:]].reset_index(drop=True)
    return rest, held


def load_splits(config: JobConfig, settings: Settings | None = None) -> Splits:
    cfg = config.data
    train_blob = read_uri(cfg.train_uri, settings)
    digests = {cfg.train_uri: train_blob.sha256}
    sources = {"train": cfg.train_uri}
    full = parse_blob(train_blob, cfg, cfg.skip_rows)
    if cfg.test_uri:
        test_blob = read_uri(cfg.test_uri, settings)
        digests[cfg.test_uri] = test_blob.sha256
        sources["test"] = cfg.test_uri
        skip = cfg.test_skip_rows if cfg.test_skip_rows is not None else cfg.skip_rows
        test = parse_blob(test_blob, cfg, skip)
    else:
        full, test = _split(full, cfg.test_fraction, config.train.seed + 1)
        sources["test"] = f"{cfg.train_uri}#holdout"
    train, val = _split(full, cfg.val_fraction, config.train.seed)
    return Splits(train=train, val=val, test=test, digests=digests, sources=sources)


def load_test_frame(config: JobConfig, settings: Settings | None = None) -> pd.DataFrame:
    """The held-out set that promotion scores every candidate and champion on."""
    return load_splits(config, settings).test


def combined_digest(digests: dict[str, str]) -> str:
    """One digest for a data set version made of several files."""
    joined = "\n".join(f"{uri}={digest}" for uri, digest in sorted(digests.items()))
    return hashlib.sha256(joined.encode()).hexdigest() if len(digests) > 1 else next(iter(digests.values()))
