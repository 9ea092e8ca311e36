"""The least a training job pays on this cluster before it trains anything, run as a Ray job.

    python -m benchmarks.train_floor [--config jobs/configs/adult.yaml]

What every `jobs.train` run does before and around its epochs, and nothing else: the driver's
imports (those of `jobs.train` itself), connecting to Ray, and a Ray Train run of the config's worker
group, started as `jobs.train.fit` starts it (the same trainer class, scaling and environment), whose
workers set up torch's process group, report once and stop. No data, no MLflow, no registration.
`python -m benchmarks.training_job` submits it through the Jobs API like a training job and clocks
it from the submission to SUCCEEDED: the floor under the whole job's wall time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

CONFIG = Path("jobs/configs/adult.yaml")


def report_once(config: dict[str, Any]) -> None:
    """The workers' whole loop: one report, no checkpoint."""
    import ray.train

    ray.train.report({"rank": float(ray.train.get_context().get_world_rank())})


def main(config: Path = typer.Option(CONFIG, "--config", help="job config YAML: its worker group")) -> None:
    """Start and finish the config's Ray Train worker group without training."""
    import ray
    from ray.train import RunConfig

    import jobs.train as train  # the training driver's imports: a job pays them before it starts
    from core.settings import get_settings
    from jobs.config import load_config
    from jobs.run_store import run_store

    settings = get_settings()
    job = load_config(config)
    ray.init(address=settings.ray.address)
    trainer = train.trainer_class(standalone=True, ray_data=False)(
        report_once,
        scaling_config=train.worker_scaling(job),
        run_config=RunConfig(name=f"floor-{job.name}", **run_store(settings).run_config_kwargs()),
    )
    with train.trainer_environment(standalone=True):
        trainer.fit()


if __name__ == "__main__":
    typer.run(main)
