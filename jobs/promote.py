"""The promotion gate: a version becomes `champion` only if it beats the champion.

Both models are scored on the same held-out test set (the candidate's), so a champion trained on
another split is never compared by a number it computed itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import mlflow
import pandas as pd
import typer
from mlflow.tracking import MlflowClient

from cluster.settings import Settings, get_settings
from jobs.config import JobConfig
from jobs.data.loading import load_test_frame
from jobs.evaluate import evaluate, is_higher_better
from jobs.predictor import TabularPredictor
from jobs.registry import champion_version, load_predictor, run_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    margin: float
    candidate_score: float
    champion_score: float | None
    champion_version: str | None
    reason: str


def decide(
    metric: str,
    candidate: float,
    champion: float | None,
    margin: float,
    champion_version: str | None = None,
    force: bool = False,
) -> Decision:
    """Promote when the candidate improves on the champion by more than `margin`.

    The improvement is signed so that positive is better whichever way the metric points; a tie
    never promotes, so retraining on identical data does not churn the serving model.
    """
    if force:
        reason = "forced by operator"
        promote = True
    elif champion is None:
        reason = "no champion to beat"
        promote = True
    else:
        improvement = candidate - champion if is_higher_better(metric) else champion - candidate
        promote = improvement > margin
        verb = "beats" if promote else "does not beat"
        reason = f"{metric} {candidate:.5f} {verb} champion {champion:.5f} by more than {margin}"
    return Decision(promote, metric, margin, candidate, champion, champion_version, reason)


def _score(predictor: TabularPredictor, metric: str, test: pd.DataFrame) -> float | None:
    missing = set(predictor.schema.feature_names) - set(test.columns)
    if missing:
        log.warning("champion cannot be scored on this test set: missing %s", sorted(missing))
        return None
    return evaluate(predictor, test).get(metric)


def gate(
    client: MlflowClient,
    model_name: str,
    alias: str,
    version: str,
    candidate: TabularPredictor,
    config: JobConfig,
    test: pd.DataFrame,
    margin: float | None = None,
    force: bool = False,
) -> Decision:
    """Score candidate and champion on `test`, move the alias if the rule says so, log both."""
    metric = config.promotion_metric
    margin = config.promotion.margin if margin is None else margin
    candidate_score = _score(candidate, metric, test)
    if candidate_score is None:
        raise ValueError(f"candidate version {version} cannot be scored with {metric}")
    current = champion_version(client, model_name, alias)
    if current is not None and current.version == version:
        return Decision(False, metric, margin, candidate_score, candidate_score, version, "already champion")
    champion_score = None
    if current is not None:
        champion = load_predictor(f"models:/{model_name}/{current.version}")
        champion_score = _score(champion, metric, test)
    decision = decide(
        metric,
        candidate_score,
        champion_score,
        margin,
        champion_version=current.version if current else None,
        force=force,
    )
    if decision.promote:
        client.set_registered_model_alias(model_name, alias, version)
    _record(client, model_name, version, decision)
    log.info("promotion of %s v%s: %s", model_name, version, decision.reason)
    return decision


def _record(client: MlflowClient, model_name: str, version: str, decision: Decision) -> None:
    mv = client.get_model_version(model_name, version)
    tags = {
        "promotion.decision": "promoted" if decision.promote else "rejected",
        "promotion.reason": decision.reason,
        "promotion.metric": decision.metric,
        "promotion.candidate_score": f"{decision.candidate_score:.6f}",
        "promotion.champion_score": "" if decision.champion_score is None else f"{decision.champion_score:.6f}",
        "promotion.champion_version": decision.champion_version or "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if mv.run_id:
        for key, value in tags.items():
            client.set_tag(mv.run_id, key, value)
        client.log_metric(mv.run_id, "promotion_candidate_score", decision.candidate_score)
        if decision.champion_score is not None:
            client.log_metric(mv.run_id, "promotion_champion_score", decision.champion_score)


def promote_version(
    version: str,
    settings: Settings | None = None,
    margin: float | None = None,
    force: bool = False,
) -> Decision:
    """Run the gate for an already registered version, using the config its run logged."""
    settings = settings or get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    mv = client.get_model_version(settings.model_name, version)
    if not mv.run_id:
        raise ValueError(f"version {version} has no run to read its config from")
    config = JobConfig.model_validate(run_config(mv.run_id))
    candidate = load_predictor(f"models:/{settings.model_name}/{version}")
    test = load_test_frame(config, settings)
    return gate(client, settings.model_name, settings.champion_alias, version, candidate, config, test, margin, force)


def main(
    version: str = typer.Option(..., "--version", help="registered model version to consider"),
    margin: float | None = typer.Option(None, help="override the config's margin"),
    force: bool = typer.Option(False, help="promote regardless of scores (logged as forced)"),
) -> None:
    """Promote VERSION to champion if it beats the current one on the held-out test set."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    decision = promote_version(version, margin=margin, force=force)
    typer.echo(json.dumps(asdict(decision)))
    if not decision.promote:
        raise typer.Exit(code=3)


if __name__ == "__main__":
    # Plain tracebacks: they end up in Ray job logs, where rich's boxes are noise.
    cli = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    cli.command()(main)
    cli()
