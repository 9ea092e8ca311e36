"""A trained model with its preprocessing: what training saves and serving loads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from jobs.inference import fold
from jobs.model import TabularMLP
from jobs.preprocess import Encoded, Preprocessor
from jobs.profile import PROFILE_FILE, ReferenceProfile, load_profile

PREPROCESSOR_FILE = "preprocessor.json"
ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "weights.pt"
# A classifier's calibration (jobs/calibration.py fits it). Absent from versions trained before
# calibration existed: those keep their uncalibrated outputs (temperature 1).
CALIBRATION_FILE = "calibration.json"


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


class Calibration(BaseModel):
    """calibration.json: probabilities are softmax(logits / temperature). An unknown method fails
    validation rather than being served as if it were temperature scaling."""

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0, allow_inf_nan=False)


class TabularPredictor:
    """`temperature` scales a classifier's logits before the softmax (1.0: uncalibrated);
    `profile` is the reference profile the live monitor compares traffic with (None: none saved)."""

    def __init__(
        self,
        preprocessor: Preprocessor,
        architecture: Architecture,
        module: TabularMLP,
        temperature: float = 1.0,
        profile: ReferenceProfile | None = None,
    ) -> None:
        self.preprocessor = preprocessor
        self.architecture = architecture
        self.module = module.eval()
        # What predictions run through: the module's function in fewer operations. A predictor's
        # weights are final (a new state is a new predictor), so it is folded once here.
        self._network = fold(self.module)
        self.schema = preprocessor.schema
        self.temperature = temperature
        self.profile = profile

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be a finite number above 0, not {value}")
        self._temperature = float(value)

    @classmethod
    def from_state_dict(
        cls,
        preprocessor: Preprocessor,
        architecture: Architecture,
        state: dict[str, Any],
        temperature: float = 1.0,
        profile: ReferenceProfile | None = None,
    ) -> TabularPredictor:
        module = architecture.build()
        module.load_state_dict(state)
        return cls(preprocessor, architecture, module, temperature, profile)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PREPROCESSOR_FILE).write_text(self.preprocessor.to_json(), encoding="utf-8")
        (directory / ARCHITECTURE_FILE).write_text(self.architecture.model_dump_json(), encoding="utf-8")
        torch.save(self.module.state_dict(), directory / WEIGHTS_FILE)
        if self.schema.task == "classification":
            calibration = Calibration(temperature=self.temperature)
            (directory / CALIBRATION_FILE).write_text(calibration.model_dump_json(), encoding="utf-8")
        profile_path = directory / PROFILE_FILE
        if self.profile is not None:
            profile_path.write_text(self.profile.model_dump_json(), encoding="utf-8")
        else:
            # A directory saved into twice must not keep a profile of another model.
            profile_path.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: Path) -> TabularPredictor:
        preprocessor = Preprocessor.from_json((directory / PREPROCESSOR_FILE).read_text(encoding="utf-8"))
        architecture = Architecture.model_validate(
            json.loads((directory / ARCHITECTURE_FILE).read_text(encoding="utf-8"))
        )
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        calibration_path = directory / CALIBRATION_FILE
        temperature = 1.0
        if preprocessor.schema.task == "classification" and calibration_path.is_file():
            temperature = Calibration.model_validate_json(calibration_path.read_text(encoding="utf-8")).temperature
        return cls.from_state_dict(preprocessor, architecture, state, temperature, load_profile(directory))

    def raw_outputs(self, frame: pd.DataFrame) -> np.ndarray:
        return self._outputs(self.preprocessor.encode(frame))

    def record_outputs(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """raw_outputs() for JSON rows: class probabilities (rows, classes) or values (rows,)."""
        return self._outputs(self.preprocessor.encode_records(rows))

    def logits(self, frame: pd.DataFrame) -> np.ndarray:
        """A classifier's uncalibrated logits (rows, classes): what the temperature is fitted on."""
        if self.schema.task != "classification":
            raise ValueError("logits are a classifier's; a regression model predicts values")
        return self._forward(self.preprocessor.encode(frame)).numpy()

    @torch.inference_mode()
    def _forward(self, enc: Encoded) -> torch.Tensor:
        return self._network(torch.from_numpy(enc.x_cat), torch.from_numpy(enc.x_num))

    @torch.inference_mode()
    def _outputs(self, enc: Encoded) -> np.ndarray:
        out = self._forward(enc)
        if self.schema.task == "classification":
            if self.temperature != 1.0:  # the common uncalibrated case skips the division
                out = out / self.temperature
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
