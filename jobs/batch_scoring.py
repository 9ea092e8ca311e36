"""What each scoring actor of a batch inference job runs (jobs/batch_predict.py starts them).

Light on purpose: an actor imports this module, torch and the model's own modules, not MLflow or
the job's driver code, so that it starts in a few seconds. The driver resolves the version and
ships the model's files (`ModelFiles`); each actor loads them once with `TabularPredictor.load`,
the loader the registered version's pyfunc uses.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.batch_config import BatchRefusedError
from jobs.batch_io import FILE_COLUMN, ROW_COLUMN, STREAM_NAMES
from jobs.predictor import TabularPredictor
from jobs.preprocess import Encoded, _transform
from jobs.schema import FeatureRules
from jobs.validation import TableCheck, check_table

MODEL_COLUMNS = ("model_name", "model_version")
REJECT_COLUMNS = ("field", "error", "reason", "fields")


@dataclass(frozen=True)
class Reconciled:
    """How an input's columns feed a model: the input column of each feature, the key columns
    copied to the output and the rejects, and the schemas of both."""

    features: dict[str, str]  # feature name -> input column
    categorical: tuple[str, ...]  # the categorical features
    text_numbers: bool  # CSV: numeric features are read from text
    keys: tuple[str, ...]
    read_columns: tuple[str, ...]
    output_schema: pa.Schema
    rejects_schema: pa.Schema


@dataclass(frozen=True)
class ModelFiles:
    """A registered version's predictor folder (what `TabularPredictor.save` wrote), file by file."""

    files: dict[str, bytes]

    @classmethod
    def read(cls, directory: Path) -> ModelFiles:
        return cls({path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()})

    def load(self) -> TabularPredictor:
        with tempfile.TemporaryDirectory(prefix="batch-model-") as tmp:
            for name, data in self.files.items():
                (Path(tmp) / name).write_bytes(data)
            return TabularPredictor.load(Path(tmp))


@dataclass(frozen=True)
class ScoringSpec:
    """What every scoring actor is built from (it travels to them pickled)."""

    model: ModelFiles  # of a pinned version, whatever an alias does meanwhile
    model_name: str
    model_version: str
    reconciled: Reconciled
    rejects_folder: str
    filesystem: pafs.FileSystem
    torch_threads: int


def _key_column(table: pa.Table, key: str) -> pa.ChunkedArray:
    if key in table.column_names:
        return table.column(key)
    return table.column(STREAM_NAMES[key])  # a row id the input has no column for


class ColumnEncoder:
    """The model's input arrays from checked columns (`TableCheck.features`): what
    `Preprocessor.encode` gives for the same rows, without building a DataFrame of Python strings
    first (the integration test compares the predictions with `predict_frame`'s)."""

    def __init__(self, predictor: TabularPredictor) -> None:
        preprocessor = predictor.preprocessor
        schema, state = preprocessor.schema, preprocessor.state
        self._categorical = [f.name for f in schema.categorical]
        self._bucketed = [(f.name, np.asarray(state.bucket_edges[f.name])) for f in schema.bucketed]
        self._numeric = [
            (f.name, f.transform, state.numeric_stats[f.name].mean, state.numeric_stats[f.name].std)
            for f in schema.numeric
        ]

    def encode(self, features: dict[str, np.ndarray], rows: int) -> Encoded:
        n_cat = len(self._categorical)
        x_cat = np.empty((rows, n_cat + len(self._bucketed)), dtype=np.int64)
        for j, name in enumerate(self._categorical):
            x_cat[:, j] = features[name]
        for j, (name, edges) in enumerate(self._bucketed):
            raw = features[name]
            x_cat[:, n_cat + j] = np.where(np.isnan(raw), 0, np.searchsorted(edges, raw, side="right") + 1)
        x_num = np.empty((rows, len(self._numeric)), dtype=np.float32)
        for j, (name, transform, mean, std) in enumerate(self._numeric):
            # The preprocessing's own transform and statistics.
            values = (_transform(features[name], transform) - mean) / std
            x_num[:, j] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        return Encoded(x_cat=x_cat, x_num=x_num)


class Scorer:
    """A Ray Data actor: loads the model once, then validates and scores one batch per call."""

    def __init__(self, spec: ScoringSpec) -> None:
        import torch

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.predictor = spec.model.load()
        self.encoder = ColumnEncoder(self.predictor)
        self.rules = FeatureRules(self.predictor.schema)
        self.classes = list(self.predictor.schema.classes or [])
        self.labels = pa.array(self.classes, type=pa.string())

    def __call__(self, table: pa.Table) -> pa.Table:
        spec = self.spec
        columns = {feature: table.column(column) for feature, column in spec.reconciled.features.items()}
        try:
            check = check_table(self.rules, columns, table.num_rows, spec.reconciled.text_numbers)
        except ValueError as exc:  # a column type a later file disagrees on: not a row's fault
            raise BatchRefusedError(f"input: {exc}") from exc
        if len(check.refused_rows):
            self._write_rejects(table, check.refused_rows, check)
        accepted = table.filter(pa.array(check.accepted)) if len(check.refused_rows) else table
        if accepted.num_rows == 0:
            return self._output(accepted, np.zeros((0, len(self.classes))) if self.classes else np.zeros(0))
        encoded = self.encoder.encode(check.features, accepted.num_rows)
        return self._output(accepted, self.predictor._outputs(encoded))

    def _keys(self, table: pa.Table) -> list[pa.ChunkedArray]:
        return [_key_column(table, key) for key in self.spec.reconciled.keys]

    def _output(self, table: pa.Table, outputs: np.ndarray) -> pa.Table:
        rows = table.num_rows
        if self.predictor.schema.task == "regression":
            predictions = [pa.array(outputs, type=pa.float64())]
        else:
            best = outputs.argmax(axis=1) if rows else np.zeros(0, dtype=np.int64)
            labels = self.labels.take(pa.array(best, type=pa.int64()))
            probabilities = pa.StructArray.from_arrays(
                [pa.array(outputs[:, j], type=pa.float64()) for j in range(len(self.classes))], names=self.classes
            )
            top = outputs[np.arange(rows), best]
            predictions = [labels, pa.array(top, type=pa.float64()), probabilities]
        model = [
            pa.repeat(pa.scalar(self.spec.model_name, pa.string()), rows),
            pa.repeat(pa.scalar(self.spec.model_version, pa.string()), rows),
        ]
        schema = self.spec.reconciled.output_schema
        # Cast, not asserted: a later file may store a key as int32 where the first had int64.
        return pa.Table.from_arrays([*self._keys(table), *predictions, *model], names=schema.names).cast(schema)

    def _write_rejects(self, table: pa.Table, refused_rows: np.ndarray, check: TableCheck) -> None:
        """The batch's refused rows, one file per batch. Its name comes from the batch's first row
        id and length: a batch Ray runs again (its actor died) writes the same file again."""
        refused = table.take(pa.array(refused_rows, type=pa.int64()))
        columns = [
            *self._keys(refused),
            pa.array(check.first_field, type=pa.string()),
            pa.array(check.first_error, type=pa.string()),
            pa.array(check.first_reason, type=pa.string()),
            pa.array(check.fields, type=pa.list_(pa.string())),
        ]
        schema = self.spec.reconciled.rejects_schema
        rejects = pa.Table.from_arrays(columns, names=schema.names).cast(schema)
        first = (table.column(STREAM_NAMES[FILE_COLUMN])[0].as_py(), table.column(STREAM_NAMES[ROW_COLUMN])[0].as_py())
        name = hashlib.sha256(json.dumps([*first, table.num_rows]).encode()).hexdigest()[:24]
        pq.write_table(rejects, f"{self.spec.rejects_folder}/rejects-{name}.parquet", filesystem=self.spec.filesystem)
