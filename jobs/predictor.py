"""A trained model with its preprocessing: what training saves and serving loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel

from jobs.model import TabularMLP
from jobs.preprocess import Encoded, Preprocessor

PREPROCESSOR_FILE = "preprocessor.json"
ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "weights.pt"


class Architecture(BaseModel):
    cardinalities: list[int]
    n_numeric: int
    n_outputs: int
    hidden: list[int]
    dropout: float
    max_embedding_dim: int

    def build(self) -> TabularMLP:
        return TabularMLP(
            self.cardinalities,
            self.n_numeric,
            self.n_outputs,
            self.hidden,
            self.dropout,
            self.max_embedding_dim,
        )


class TabularPredictor:
    def __init__(self, preprocessor: Preprocessor, architecture: Architecture, module: TabularMLP) -> None:
        self.preprocessor = preprocessor
        self.architecture = architecture
        self.module = module.eval()
        self.schema = preprocessor.schema

    @classmethod
    def from_state_dict(
        cls, preprocessor: Preprocessor, architecture: Architecture, state: dict[str, Any]
    ) -> TabularPredictor:
        module = architecture.build()
        module.load_state_dict(state)
        return cls(preprocessor, architecture, module)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PREPROCESSOR_FILE).write_text(self.preprocessor.to_json(), encoding="utf-8")
        (directory / ARCHITECTURE_FILE).write_text(self.architecture.model_dump_json(), encoding="utf-8")
        torch.save(self.module.state_dict(), directory / WEIGHTS_FILE)
        return directory

    @classmethod
    def load(cls, directory: Path) -> TabularPredictor:
        preprocessor = Preprocessor.from_json((directory / PREPROCESSOR_FILE).read_text(encoding="utf-8"))
        architecture = Architecture.model_validate(
            json.loads((directory / ARCHITECTURE_FILE).read_text(encoding="utf-8"))
        )
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        return cls.from_state_dict(preprocessor, architecture, state)

    def raw_outputs(self, frame: pd.DataFrame) -> np.ndarray:
        return self._outputs(self.preprocessor.encode(frame))

    def record_outputs(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """raw_outputs() for JSON rows: class probabilities (rows, classes) or values (rows,)."""
        return self._outputs(self.preprocessor.encode_records(rows))

    @torch.inference_mode()
    def _outputs(self, enc: Encoded) -> np.ndarray:
        out = self.module(torch.from_numpy(enc.x_cat), torch.from_numpy(enc.x_num))
        if self.schema.task == "classification":
            return torch.softmax(out, dim=1).numpy()
        return self.preprocessor.decode_regression(out[:, 0].numpy().astype(np.float64))

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One output row per input row: label + probability, or value for regression."""
        outputs = self.raw_outputs(frame)
        if self.schema.task == "regression":
            return pd.DataFrame({"value": outputs})
        classes = np.asarray(self.schema.classes)
        best = outputs.argmax(axis=1)
        result = pd.DataFrame({"label": classes[best], "probability": outputs[np.arange(len(best)), best]})
        for j, name in enumerate(classes):
            result[f"p_{name}"] = outputs[:, j]
        return result
