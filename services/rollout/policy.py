"""The rollout rule (docs/rollout.md): pure functions from the figures of a window to a decision.

Shadow and canary: the figures are those of the paired rows (a served row and the other version's
answer to it) since the step began. Probation: those of the new champion since it took over and of
the previous champion over as long a time before. Every decision carries a reason that quotes the
figures it was made on; it is recorded on the version, the rollout and the training job.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

from core.settings import ProbationSettings, RolloutSettings
from jobs.config import RolloutPolicy
from services.feedback.store import PairedFigures, VersionWindow

# Shares are ratios of counts: a figure exactly at a threshold (0.80 - 0.78 against a 0.02 margin)
# must read as at it, not past it by a rounding error.
EPSILON = 1e-9


def significantly_lower(
    previous: float, n_previous: int, new: float, n_new: int, margin: float, confidence: float
) -> bool:
    """Whether `new` is below `previous` by more than `margin`, and by enough that chance alone
    (two binomial proportions, one-sided, at `confidence`) does not explain it: on a few dozen
    labels two equally good models differ by several points, and a rollback or a rejection on such
    noise would churn the serving model. A confidence of 0.5 is the plain comparison."""
    drop = previous - new
    if drop <= margin + EPSILON:
        return False
    critical = NormalDist().inv_cdf(confidence)
    spread = math.sqrt(previous * (1 - previous) / max(n_previous, 1) + new * (1 - new) / max(n_new, 1))
    return critical <= 0 or spread == 0 or (drop - margin) / spread >= critical


@dataclass(frozen=True)
class WindowRule:
    """What a shadow window or a canary step is judged by: the rollout's policy where it sets a
    value, else the ROLLOUT_* settings."""

    window_requests: int
    window_s: float
    min_rows: int
    min_agreement: float
    min_labels: int
    max_accuracy_drop: float
    regression_tolerance: float
    # How sure the accuracy comparison must be that the challenger is worse (0.5: not at all).
    confidence: float = 0.5

    @classmethod
    def of(cls, policy: RolloutPolicy, settings: RolloutSettings) -> WindowRule:
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return cls(
            window_requests=pick(policy.window_requests, settings.window_requests),
            window_s=pick(policy.window_s, settings.window_s),
            min_rows=settings.min_rows,
            min_agreement=pick(policy.min_agreement, settings.min_agreement),
            min_labels=settings.min_labels,
            max_accuracy_drop=pick(policy.max_accuracy_drop, settings.max_accuracy_drop),
            regression_tolerance=settings.regression_tolerance,
            confidence=settings.confidence,
        )


class Action(enum.StrEnum):
    CONTINUE = "continue"  # the window is still open and nothing is worse yet
    NEXT_STEP = "next_step"  # canary: the step passed, the challenger answers a larger share
    PROMOTE = "promote"
    REJECT = "reject"


@dataclass(frozen=True)
class RolloutDecision:
    action: Action
    reason: str
    next_share: float | None = None  # NEXT_STEP: the share of the next step


def _share(value: float) -> str:
    return f"{value:.0%}" if round(value * 100, 6) == round(value * 100) else f"{value:.2%}"


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def describe(figures: PairedFigures) -> str:
    """The figures of a window in words, for reasons and logs."""
    text = f"{figures.rows} paired rows of {figures.requests} requests, agreement {_figure(figures.agreement)}"
    if figures.regression:
        return f"{text} (regression outputs)"
    if figures.labelled:
        text += (
            f", {figures.labelled} labelled: accuracy champion {_figure(figures.champion_accuracy)},"
            f" challenger {_figure(figures.challenger_accuracy)}"
        )
    else:
        text += ", none labelled"
    return text


def window_complete(figures: PairedFigures, elapsed_s: float, rule: WindowRule) -> bool:
    """A window ends after `window_requests` paired requests or `window_s`, whichever comes first."""
    return figures.requests >= rule.window_requests or elapsed_s >= rule.window_s


def worse(figures: PairedFigures, rule: WindowRule) -> str | None:
    """Why the challenger is worse than the champion on these figures, or None when it is not
    (or there is not enough to tell). Labels decide when there are enough of them; agreement
    decides otherwise, once there are enough paired rows."""
    champion, challenger = figures.champion_accuracy, figures.challenger_accuracy
    if figures.labelled >= rule.min_labels and champion is not None and challenger is not None:
        n = figures.labelled
        if significantly_lower(champion, n, challenger, n, rule.max_accuracy_drop, rule.confidence):
            return (
                f"challenger accuracy {challenger:.3f} is below the champion's {champion:.3f} by more than"
                f" {rule.max_accuracy_drop:.3f} on the same {figures.labelled} labelled rows"
                f" (of {figures.rows} paired rows; confidence {rule.confidence:.0%})"
            )
        return None
    agreement = figures.agreement
    if figures.rows >= rule.min_rows and agreement is not None and agreement < rule.min_agreement - EPSILON:
        how = (
            f"within {rule.regression_tolerance:.0%} of the champion's value"
            if figures.regression
            else "the champion's label"
        )
        return (
            f"agreement with the champion {agreement:.3f} ({how}) is below {rule.min_agreement:.3f} on"
            f" {figures.rows} paired rows ({figures.labelled} labelled, fewer than the {rule.min_labels}"
            " that would compare accuracies)"
        )
    return None


def _why_not_worse(figures: PairedFigures, rule: WindowRule) -> str:
    if figures.labelled >= rule.min_labels:
        return (
            f"challenger accuracy {_figure(figures.challenger_accuracy)} against the champion's"
            f" {_figure(figures.champion_accuracy)} on the same {figures.labelled} labelled rows"
            f" (max drop {rule.max_accuracy_drop:.3f}), agreement {_figure(figures.agreement)}"
            f" on {figures.rows} paired rows"
        )
    return (
        f"agreement {_figure(figures.agreement)} >= {rule.min_agreement:.3f} on {figures.rows} paired rows"
        f" ({figures.labelled} labelled, fewer than {rule.min_labels})"
    )


def _window_end(figures: PairedFigures, elapsed_s: float, rule: WindowRule) -> str:
    if figures.requests >= rule.window_requests:
        return f"after {figures.requests} paired requests (window {rule.window_requests})"
    return f"after {elapsed_s:.0f} s (window {rule.window_s:.0f} s) with {figures.requests} paired requests"


def rollout_decision(
    kind: Literal["shadow", "canary"],
    figures: PairedFigures,
    elapsed_s: float,
    rule: WindowRule,
    step: int = 0,
    judged_steps: list[float] | None = None,
) -> RolloutDecision:
    """The decision on a shadow window or canary step (`step` indexes `judged_steps`, the shares
    below 1.0 of the policy) after `elapsed_s` of it.

    A challenger that is worse is rejected at any tick with enough rows (harm stops early);
    otherwise nothing happens until the window ends. Then too few rows to judge is a rejection
    (fail closed), and a challenger not worse is promoted (shadow, canary's last step) or moves to
    the canary's next step."""
    steps = judged_steps or []
    label = "shadow"
    if kind == "canary":
        label = f"canary step {step + 1}" + (f" ({_share(steps[step])} of traffic)" if step < len(steps) else "")
    if figures.rows >= rule.min_rows and (why := worse(figures, rule)) is not None:
        return RolloutDecision(Action.REJECT, f"{label}: {why}")
    if not window_complete(figures, elapsed_s, rule):
        return RolloutDecision(
            Action.CONTINUE,
            f"{label}: window open ({figures.requests} of {rule.window_requests} paired requests,"
            f" {elapsed_s:.0f} of {rule.window_s:.0f} s): {describe(figures)}",
        )
    ended = _window_end(figures, elapsed_s, rule)
    if figures.rows < rule.min_rows:
        return RolloutDecision(
            Action.REJECT,
            f"{label}: window ended {ended} with {figures.rows} paired rows, fewer than the {rule.min_rows}"
            " needed to judge: too few mirrored rows to judge (fail closed)",
        )
    # Enough rows: `worse` was judged above, so the challenger is not worse.
    passed = f"{label}: window ended {ended}: {_why_not_worse(figures, rule)}"
    if kind == "canary" and step + 1 < len(steps):
        following = steps[step + 1]
        return RolloutDecision(Action.NEXT_STEP, f"{passed}; next step: {_share(following)}", following)
    return RolloutDecision(Action.PROMOTE, f"{passed}; promoted")


def paired_document(figures: PairedFigures, elapsed_s: float, rule: WindowRule) -> dict[str, Any]:
    """The figures of a window as stored on the rollout and tagged on the version."""
    return {
        "rows": figures.rows,
        "requests": figures.requests,
        "agreement": figures.agreement,
        "labelled": figures.labelled,
        "champion_accuracy": figures.champion_accuracy,
        "challenger_accuracy": figures.challenger_accuracy,
        "challenger_served_rows": figures.challenger_served_rows,
        "task": "regression" if figures.regression else "classification",
        "elapsed_s": round(elapsed_s, 3),
        "window_requests": rule.window_requests,
        "window_s": rule.window_s,
        "min_rows": rule.min_rows,
        "min_agreement": rule.min_agreement,
        "min_labels": rule.min_labels,
        "max_accuracy_drop": rule.max_accuracy_drop,
    }


# Probation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbationRule:
    window_s: float
    min_labels: int
    min_rows: int
    max_drop: float
    use_estimate: bool
    confidence: float = 0.5  # as WindowRule.confidence

    @classmethod
    def of(cls, settings: ProbationSettings) -> ProbationRule:
        return cls(
            settings.window_s,
            settings.min_labels,
            settings.min_rows,
            settings.max_drop,
            settings.use_estimate,
            settings.confidence,
        )


Basis = Literal["labels", "estimate"]


class ProbationAction(enum.StrEnum):
    CONTINUE = "continue"
    ROLL_BACK = "roll_back"
    PASSED = "passed"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class ProbationDecision:
    action: ProbationAction
    reason: str
    basis: Basis | None = None
    # The basis figure of the previous champion minus the new one's (positive: the new is worse).
    drop: float | None = None


def probation_windows(elapsed_s: float, rule: ProbationRule) -> float:
    """How long both sides are compared over: the new champion's time so far, at most the window."""
    return max(0.0, min(elapsed_s, rule.window_s))


def probation_basis(new: VersionWindow, previous: VersionWindow, rule: ProbationRule) -> Basis | None:
    """Labels when both sides have enough; else the estimated accuracy (mean calibrated top-class
    probability) when allowed and both have enough rows with one; else nothing to compare by."""
    if new.labelled >= rule.min_labels and previous.labelled >= rule.min_labels:
        return "labels"
    if rule.use_estimate and new.probability_rows >= rule.min_rows and previous.probability_rows >= rule.min_rows:
        return "estimate"
    return None


def _basis_figure(window: VersionWindow, basis: Basis) -> float | None:
    return window.accuracy if basis == "labels" else window.estimated_accuracy


def _n(window: VersionWindow, basis: Basis) -> int:
    return window.labelled if basis == "labels" else window.probability_rows


def _count(window: VersionWindow, basis: Basis) -> str:
    return f"{window.labelled} labelled rows" if basis == "labels" else f"{window.probability_rows} rows"


def _side(name: str, window: VersionWindow, rule: ProbationRule) -> str:
    estimate = "no class probabilities" if window.estimated_accuracy is None else f"{window.probability_rows} rows"
    return (
        f"{name}: {window.labelled} labelled rows (needs {rule.min_labels}), estimate from {estimate}"
        f" (needs {rule.min_rows})"
    )


def probation_decision(
    new: VersionWindow,
    previous: VersionWindow,
    elapsed_s: float,
    rule: ProbationRule,
    basis_seen: bool,
    new_name: str = "the new champion",
    previous_name: str = "the previous champion",
) -> ProbationDecision:
    """Judge a new champion `elapsed_s` into its probation. `new` holds its predictions so far
    (at most the window), `previous` those of the champion it replaced over as long a time
    before; `basis_seen` is whether any earlier tick had figures to compare by.

    A breach (the previous champion's figure above the new one's by more than `max_drop`) rolls
    back at once; a window that ends without one passes, or is inconclusive when no tick ever
    had figures to compare by (the champion stays either way)."""
    over = elapsed_s >= rule.window_s
    basis = probation_basis(new, previous, rule)
    if basis is not None:
        figure_new, figure_previous = _basis_figure(new, basis), _basis_figure(previous, basis)
        if figure_new is not None and figure_previous is not None:
            drop = figure_previous - figure_new
            what = "live accuracy" if basis == "labels" else "estimated accuracy"
            compared = (
                f"{what} of {new_name} {figure_new:.3f} on {_count(new, basis)} against {previous_name}'s"
                f" {figure_previous:.3f} on {_count(previous, basis)}"
                f" over the {probation_windows(elapsed_s, rule):.0f} s before it"
            )
            n_new, n_previous = _n(new, basis), _n(previous, basis)
            if significantly_lower(figure_previous, n_previous, figure_new, n_new, rule.max_drop, rule.confidence):
                return ProbationDecision(
                    ProbationAction.ROLL_BACK,
                    f"{compared}: lower by {drop:.3f}, more than {rule.max_drop:.3f}"
                    f" (confidence {rule.confidence:.0%})",
                    basis,
                    drop,
                )
            if over:
                return ProbationDecision(
                    ProbationAction.PASSED,
                    f"probation of {rule.window_s:.0f} s passed: {compared} (max drop {rule.max_drop:.3f})",
                    basis,
                    drop,
                )
            return ProbationDecision(ProbationAction.CONTINUE, f"probation continues: {compared}", basis, drop)
    if not over:
        return ProbationDecision(
            ProbationAction.CONTINUE,
            f"probation continues ({elapsed_s:.0f} of {rule.window_s:.0f} s), nothing to compare by yet:"
            f" {_side(new_name, new, rule)}; {_side(previous_name, previous, rule)}",
        )
    if basis_seen:
        return ProbationDecision(
            ProbationAction.PASSED,
            f"probation of {rule.window_s:.0f} s passed without a breach; at its end too few figures to compare:"
            f" {_side(new_name, new, rule)}; {_side(previous_name, previous, rule)}",
        )
    return ProbationDecision(
        ProbationAction.INCONCLUSIVE,
        f"probation of {rule.window_s:.0f} s ended inconclusive, never enough figures to compare"
        f" ({_side(new_name, new, rule)}; {_side(previous_name, previous, rule)}); {new_name} stays champion",
    )


def window_document(window: VersionWindow) -> dict[str, Any]:
    return {
        "rows": window.rows,
        "labelled": window.labelled,
        "accuracy": window.accuracy,
        "estimated_accuracy": window.estimated_accuracy,
        "probability_rows": window.probability_rows,
    }
