"""The MLflow pyfunc wrapper of a registered version: `mlflow.pyfunc.load_model` and `mlflow models
serve` run it anywhere its requirements are installed. It and the modules it imports (predictor,
model, preprocess, schema, profile) are all the platform code a version carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from jobs.predictor import TabularPredictor

PREDICTOR_ARTIFACT = "predictor"
# What a version carries of this package, besides __init__.py: these modules import nothing of
# the platform but each other (an import-linter contract in pyproject.toml keeps it so).
INFERENCE_MODULES = (
    "pyfunc.py",
    "predictor.py",
    "model.py",
    "inference.py",
    "preprocess.py",
    "schema.py",
    "profile.py",
)
# What scoring needs installed, pinned to the versions the model was trained with.
INFERENCE_REQUIREMENTS = ("torch", "pandas", "numpy", "pydantic")


class TabularPyfunc(PythonModel):
    """Feature rows in, predictions out: labels and class probabilities, or values."""

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = TabularPredictor.load(Path(context.artifacts[PREDICTOR_ARTIFACT]))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return self.predictor.predict_frame(model_input)
