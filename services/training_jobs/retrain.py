"""Which shipped config retrains a model when its accuracy alert fires.

The alert names a registered model (its `model` label); the job it queues must train that model and
no other. The mapping is the configs themselves: a config in jobs/configs trains the model its
`model_name` (or `name`) names. `RETRAIN_CONFIGS` (model name -> config name) settles a model that
several configs train. Whenever the answer is not exactly one config that trains the alert's model,
nothing is queued and the reason says why: retraining another model's config would register a
version under the wrong name, or a job the gate can only refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from jobs.config import JobConfig
from services.training_jobs.models import CONFIG_DIR, CONFIG_NAME, JobKind, base_config


class RetrainConfigError(Exception):
    """No config can safely retrain the alert's model; the message says why and how to fix it."""


def _load(path: Path) -> JobConfig:
    try:
        return base_config(path)
    except Exception as exc:
        first = next(iter(str(exc).splitlines()), "")
        raise RetrainConfigError(
            f"config {path.stem!r} cannot be read ({type(exc).__name__}: {first}), so it is unknown which "
            "model it trains: fix it, or map the model with RETRAIN_CONFIGS"
        ) from exc


def _fits(config: JobConfig, kind: JobKind) -> bool:
    """A tune job needs a config with a tune section; a train job takes one without (a tune config
    names the same model as its base config, and training it would train its base settings)."""
    return (config.tune is not None) == (kind == "tune")


def _mapped(model: str, name: str, kind: JobKind, config_dir: Path) -> str:
    path = config_dir / f"{name}.yaml"
    if not CONFIG_NAME.match(name) or not path.is_file():
        raise RetrainConfigError(f"RETRAIN_CONFIGS maps {model!r} to {name!r}, which is not a config in jobs/configs")
    config = _load(path)
    trains = config.registered_model_name
    if trains != model:
        raise RetrainConfigError(f"RETRAIN_CONFIGS maps {model!r} to {name!r}, which trains {trains!r}")
    if kind == "tune" and config.tune is None:
        raise RetrainConfigError(f"RETRAIN_CONFIGS maps {model!r} to {name!r}, which has no tune section")
    return name


def retrain_config(model: str, kind: JobKind, mapping: Mapping[str, str], config_dir: Path = CONFIG_DIR) -> str:
    """The name of the config (in `config_dir`) whose `kind` job retrains `model`; raises
    RetrainConfigError when there is none, or more than one and `mapping` does not choose."""
    if model in mapping:
        return _mapped(model, mapping[model], kind, config_dir)
    # A file whose name is not a config name cannot be asked for by any job, so it trains nothing.
    paths = sorted((p for p in config_dir.glob("*.yaml") if CONFIG_NAME.match(p.stem)), key=lambda p: p.stem)
    configs = {path.stem: _load(path) for path in paths}
    found = [name for name, config in configs.items() if config.registered_model_name == model]
    fitting = [name for name in found if _fits(configs[name], kind)]
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        section = "with" if kind == "tune" else "without"
        others = f" {section} a tune section (only {', '.join(found)})" if found else ""
        raise RetrainConfigError(
            f"no config in jobs/configs trains {model!r}{others}: add one, or map the model with RETRAIN_CONFIGS"
        )
    raise RetrainConfigError(
        f"{len(fitting)} configs train {model!r} ({', '.join(fitting)}): choose one with RETRAIN_CONFIGS"
    )
