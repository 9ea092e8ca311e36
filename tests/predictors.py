"""Models the tests build in memory, without training: real preprocessing and network, random weights."""

from __future__ import annotations

import pandas as pd

from jobs.config import JobConfig
from jobs.predictor import Architecture, TabularPredictor
from jobs.preprocess import Preprocessor
from jobs.schema import build_schema


def untrained_predictor(frame: pd.DataFrame, config: JobConfig) -> TabularPredictor:
    """The task's preprocessing fitted on `frame`, in front of a small untrained MLP."""
    pre = Preprocessor.fit(frame, build_schema(frame, config))
    arch = Architecture(
        cardinalities=pre.cardinalities,
        n_numeric=pre.n_numeric,
        n_outputs=pre.n_outputs,
        hidden=[8],
        dropout=0.0,
        max_embedding_dim=4,
    )
    return TabularPredictor(pre, arch, arch.build())
