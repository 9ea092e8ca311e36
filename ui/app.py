"""The Gradio page: three tabs over `UiActions`. The named endpoints (`api_name`, `gr.api`) are
what gradio_client callers, and the integration tests, use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import gradio as gr
import pandas as pd
from gradio.events import api as gradio_api

from ui.actions import ModelCard, UiActions
from ui.card import CURVE_COLUMNS, PROMOTION_COLUMNS, card_markdown, curves_by_metric, promotion_rows, split_curves
from ui.errors import ApiError
from ui.form import FieldSpec, FormSchema, row_from_values
from ui.http import NO_KEY_MESSAGE
from ui.jobs import JOB_COLUMNS, is_terminal, job_markdown, job_rows
from ui.monitoring import FEATURE_COLUMNS, feature_rows, monitoring_markdown, unavailable_markdown
from ui.prediction import error_markdown, feedback_markdown, prediction_markdown
from ui.rollout import EVENT_COLUMNS, event_rows, rollout_markdown
from ui.rollout import unavailable_markdown as rollout_unavailable

TITLE = "Ray cluster platform"
FOLLOW_EVERY_S = 3.0
FIELDS_PER_ROW = 2


FormRenderer = Callable[[FormSchema | None], None]


def render_on(state: gr.State) -> Callable[[FormRenderer], FormRenderer]:
    """`gr.render` with its types spelled out (Gradio leaves the decorator unannotated)."""
    return cast(Callable[[FormRenderer], FormRenderer], gr.render(inputs=state))


def place(*components: gr.components.Component) -> None:
    """Put components created with `render=False` here in the layout."""
    for component in components:
        component.render()  # type: ignore[no-untyped-call]  # Gradio leaves Block.render unannotated


class Loader(NamedTuple):
    """A tab's refresh: what to call, which components it fills, and what it reads (the model picker)."""

    fn: Callable[..., Any]
    outputs: list[Any]
    inputs: tuple[Any, ...] = ()


def problem_markdown(exc: ApiError) -> str:
    """A failed call where its result would be. A key without a scope is how this UI is set up,
    not a fault: it reads as what is unavailable, and the rest of the page works on."""
    if exc.missing_scope:
        return f"**Not available with this key:** {exc.message}"
    return error_markdown(exc.message)


def header_markdown(actions: UiActions) -> str:
    key = "configured" if actions.api.has_key else f"**missing**: {NO_KEY_MESSAGE}"
    return f"# {TITLE}\nInference API `{actions.api.base_url}` · API key {key} · MLflow `{actions.mlflow.base_url}`"


def model_choices(actions: UiActions, chosen: str | None) -> tuple[gr.Dropdown, str]:
    """The picker's choices (every served model) and a line on why it has no others."""
    try:
        names = actions.models()
    except ApiError as exc:
        fallback = gr.Dropdown(choices=[actions.model_name], value=chosen or actions.model_name)
        return fallback, problem_markdown(exc)
    value = chosen if chosen in names else (names[0] if names else actions.model_name)
    return gr.Dropdown(choices=names or [actions.model_name], value=value), ""


def build_app(actions: UiActions) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(header_markdown(actions))
        with gr.Row():
            picker = gr.Dropdown(
                choices=[actions.model_name],
                value=actions.model_name,
                label="Model",
                info="every served model; each tab works with the one chosen",
                elem_id="model-picker",
                # Its choices are filled in when the page loads; API clients may name any model.
                allow_custom_value=True,
                scale=2,
            )
            picker_status = gr.Markdown()
        with gr.Tabs():
            with gr.Tab("Prediction", elem_id="tab-prediction"):
                form = _predict_tab(actions, picker)
            with gr.Tab("Model", elem_id="tab-model") as model_tab:
                card, rollout, monitor = _model_tab(actions, picker)
            with gr.Tab("Training", elem_id="tab-training") as training_tab:
                jobs = _training_tab(actions)
        _register_api(actions)
        demo.load(
            lambda chosen: model_choices(actions, chosen),
            inputs=picker,
            outputs=[picker, picker_status],
            api_visibility="private",
        ).then(form.fn, inputs=list(form.inputs), outputs=form.outputs, api_visibility="private")
        picker.input(form.fn, inputs=list(form.inputs), outputs=form.outputs, api_visibility="private").then(
            card.fn, inputs=list(card.inputs), outputs=card.outputs, api_visibility="private"
        )
        for part in (rollout, monitor):
            picker.input(part.fn, inputs=list(part.inputs), outputs=part.outputs, api_visibility="private")
        # The other tabs fill in when opened: the card costs several MLflow requests. The rollout
        # and the monitoring report are one API call each, shown as soon as they are there.
        for part in (card, rollout, monitor):
            model_tab.select(part.fn, inputs=list(part.inputs), outputs=part.outputs, api_visibility="private")
        training_tab.select(jobs.fn, outputs=jobs.outputs, api_visibility="private")
    return demo


# Predict -----------------------------------------------------------------------------------


def field_input(spec: FieldSpec) -> gr.components.Component:
    info = "may be left empty" if spec.nullable else None
    key = f"field-{spec.name}"
    if spec.kind == "numeric":
        value = spec.default if isinstance(spec.default, int | float) else None
        return gr.Number(label=spec.name, value=value, info=info, key=key)
    if spec.kind == "categorical":
        return gr.Dropdown(label=spec.name, choices=list(spec.choices), value=spec.default, info=info, key=key)
    return gr.Textbox(label=spec.name, value=str(spec.default or ""), info=info, key=key)


def field_grid(fields: Sequence[FieldSpec], per_row: int = FIELDS_PER_ROW) -> list[gr.components.Component]:
    """The inputs in rows, so that a wide schema still fits on a screen above its button."""
    inputs: list[gr.components.Component] = []
    for start in range(0, len(fields), per_row):
        with gr.Row(equal_height=True):
            inputs += [field_input(spec) for spec in fields[start : start + per_row]]
    return inputs


def predict_outputs(actions: UiActions, schema: FormSchema, values: tuple[Any, ...]) -> tuple[str, str, Any, str]:
    """Result text, request id, the prediction as data, and a cleared feedback line."""
    try:
        view = actions.predict(row_from_values(schema.fields, values), schema.name or None)
    except ApiError as exc:
        return problem_markdown(exc), "", {"error": exc.message}, ""
    return prediction_markdown(view), str(view["request_id"]), view, ""


def feedback_output(actions: UiActions, request_id: str | None, label: str) -> str:
    try:
        return feedback_markdown(actions.feedback(request_id or "", label))
    except ApiError as exc:
        return problem_markdown(exc)


def load_form(actions: UiActions, model: str | None = None) -> tuple[FormSchema | None, str]:
    try:
        schema = actions.form(model)
    except ApiError as exc:
        return None, problem_markdown(exc)
    return schema, f"Form for **{schema.model}** ({schema.task}), built from the API's description of the served model."


def _predict_tab(actions: UiActions, picker: gr.Dropdown) -> Loader:
    form_state = gr.State(None)
    # Created first and placed below: the dynamic form's events write into them.
    result = gr.Markdown("Fill in the form and press **Predict**.", render=False)
    request_id = gr.Textbox(label="Request id", interactive=False, render=False)
    feedback_status = gr.Markdown(render=False)
    response = gr.JSON(label="Prediction", render=False)
    with gr.Row():
        form_status = gr.Markdown("Loading the served model's schema...")
        reload_form = gr.Button("Reload schema", size="sm", scale=0)
    with gr.Row():
        with gr.Column(scale=3):

            @render_on(form_state)
            def _form(schema: FormSchema | None) -> None:
                if schema is None:
                    gr.Markdown("The form appears once the API serves a model.")
                    return
                inputs = field_grid(schema.fields)
                gr.Button("Predict", variant="primary", elem_id="predict-button").click(
                    lambda *values: predict_outputs(actions, schema, values),
                    inputs=inputs,
                    outputs=[result, request_id, response, feedback_status],
                    api_visibility="private",
                )

        with gr.Column(scale=2):
            place(result, request_id)

            @render_on(form_state)
            def _feedback(schema: FormSchema | None) -> None:
                if schema is None or not schema.classes:
                    return
                gr.Markdown("Was it right? Send the true label:")
                with gr.Row():
                    for label in schema.classes:
                        gr.Button(label, size="sm", elem_classes=["feedback-button"]).click(
                            lambda rid, chosen=label: feedback_output(actions, rid, chosen),
                            inputs=request_id,
                            outputs=feedback_status,
                            api_visibility="private",
                        )

            place(feedback_status)
            with gr.Accordion("Response", open=False):
                place(response)
    loader = Loader(lambda model: load_form(actions, model), [form_state, form_status], (picker,))
    reload_form.click(loader.fn, inputs=list(loader.inputs), outputs=loader.outputs, api_visibility="private")
    return loader


# Model card --------------------------------------------------------------------------------


def card_data(card: ModelCard) -> dict[str, Any]:
    keys = ("name", "version", "run_id", "alias", "task", "target", "classes", "metrics")
    return {
        **{key: card.current.get(key) for key in keys},
        "curves": curves_by_metric(card.curves),
        "promotions": card.promotions,
        "notes": card.notes,
    }


def card_outputs(
    actions: UiActions, model: str | None = None
) -> tuple[str, pd.DataFrame, pd.DataFrame, list[list[str]], dict[str, Any]]:
    """Card text, loss curves, score curves, promotion table, and the card as data."""
    empty = pd.DataFrame(columns=pd.Index(CURVE_COLUMNS))
    try:
        card = actions.model_card(model)
    except ApiError as exc:
        return problem_markdown(exc), empty, empty, [], {"error": exc.message}
    losses, scores = split_curves(card.curves)
    text = card_markdown(card.current) + "".join(f"\n\n_{note}_" for note in card.notes)
    return text, losses, scores, promotion_rows(card.promotions), card_data(card)


def monitoring_outputs(actions: UiActions, model: str | None = None) -> tuple[str, list[list[str]]]:
    """The drift summary and the per-feature table. Without them (an API without the route, a
    key without the scope, the API away) a line says why; the card above is unaffected."""
    try:
        report = actions.monitoring(model)
    except ApiError as exc:
        return unavailable_markdown(exc.message), []
    return monitoring_markdown(report), feature_rows(report)


def rollout_outputs(actions: UiActions, model: str | None = None) -> tuple[str, list[list[str]]]:
    """The challenger, the champion on probation, and the rollout service's decisions (newest
    first). Without them (the API away, a key without the scope) a line says why."""
    try:
        described = actions.rollout(model)
    except ApiError as exc:
        return rollout_unavailable(exc.message), []
    return rollout_markdown(described), event_rows(described)


def _model_tab(actions: UiActions, picker: gr.Dropdown) -> tuple[Loader, Loader, Loader]:
    refresh = gr.Button("Refresh", size="sm")
    text = gr.Markdown("Open this tab to load the served model's card.")
    rollout = gr.Markdown(elem_id="model-rollout")
    decisions = gr.Dataframe(
        headers=EVENT_COLUMNS, label="Rollout decisions (newest first)", interactive=False, wrap=True
    )
    monitoring = gr.Markdown(elem_id="model-monitoring")
    drift = gr.Dataframe(
        headers=FEATURE_COLUMNS, label="Drift per feature (drifted first)", interactive=False, wrap=True
    )
    with gr.Row():
        plot = {"x": "epoch", "y": "value", "color": "metric", "x_title": "epoch", "y_title": "value"}
        losses = gr.LinePlot(title="Loss per epoch", **plot)  # type: ignore[arg-type]
        scores = gr.LinePlot(title="Other metrics per epoch", **plot)  # type: ignore[arg-type]
    promotions = gr.Dataframe(headers=PROMOTION_COLUMNS, label="Promotion history", interactive=False, wrap=True)
    with gr.Accordion("Card as data", open=False):
        data = gr.JSON(label="Card")
    loader = Loader(lambda model: card_outputs(actions, model), [text, losses, scores, promotions, data], (picker,))
    rolling = Loader(lambda model: rollout_outputs(actions, model), [rollout, decisions], (picker,))
    monitor = Loader(lambda model: monitoring_outputs(actions, model), [monitoring, drift], (picker,))
    refresh.click(loader.fn, inputs=list(loader.inputs), outputs=loader.outputs, api_name="model_card")
    for part in (rolling, monitor):
        refresh.click(part.fn, inputs=list(part.inputs), outputs=part.outputs, api_visibility="private")
    return loader, rolling, monitor


# Training jobs ------------------------------------------------------------------------------


def job_outputs(fetch: Callable[[], dict[str, Any]]) -> tuple[str, str, dict[str, Any]]:
    """Job id, job text, and the job as data."""
    try:
        job = fetch()
    except ApiError as exc:
        return "", problem_markdown(exc), {"error": exc.message}
    return str(job.get("id", "")), job_markdown(job), job


def jobs_outputs(actions: UiActions) -> tuple[list[list[str]], str]:
    try:
        jobs = actions.recent_jobs()
    except ApiError as exc:
        return [], problem_markdown(exc)
    return job_rows(jobs), f"{len(jobs)} most recent jobs, newest first."


def cancel_outputs(actions: UiActions, job_id: str | None) -> tuple[str, Any, Any]:
    """A line on the cancel, then the job's text and data. A job that has already ended is shown
    as it ended; on other failures (unknown job, no scope, API away) the job shown stays as it is,
    and so does its following."""
    try:
        job = actions.cancel_job(job_id or "")
    except ApiError as exc:
        if exc.code == "job_finished":
            _, text, data = job_outputs(lambda: actions.job(job_id or ""))
            return problem_markdown(exc), text, data
        return problem_markdown(exc), gr.skip(), gr.skip()
    return f"Job `{job.get('id')}` is **{job.get('state')}**.", job_markdown(job), job


def follow(job: dict[str, Any]) -> gr.Timer:
    """Poll a job's state until it ends."""
    return gr.Timer(active=bool(job.get("id")) and not is_terminal(job))


def tick(actions: UiActions, job_id: str) -> tuple[str, dict[str, Any], gr.Timer]:
    _, text, job = job_outputs(lambda: actions.job(job_id))
    return text, job, gr.Timer(active="error" not in job and not is_terminal(job))


def _training_tab(actions: UiActions) -> Loader:
    with gr.Row():
        kind = gr.Radio(["train", "tune"], value="train", label="Kind")
        config = gr.Textbox(label="Config", placeholder="empty: adult for train, adult-tune for tune")
    overrides = gr.Code(value="{}", language="json", label='Overrides (JSON, e.g. {"train.epochs": 5})', lines=3)
    start = gr.Button("Start job", variant="primary")
    with gr.Row():
        job_id = gr.Textbox(label="Job id", placeholder="started job, or paste one", scale=3)
        check = gr.Button("Refresh state", scale=0)
        cancel = gr.Button("Cancel job", variant="stop", scale=0, elem_id="cancel-job-button")
    cancel_status = gr.Markdown(elem_id="cancel-status")
    text = gr.Markdown()
    with gr.Accordion("Job as data", open=False):
        data = gr.JSON(label="Job")
    timer = gr.Timer(FOLLOW_EVERY_S, active=False)
    table = gr.Dataframe(headers=JOB_COLUMNS, label="Recent jobs (select a row to follow it)", interactive=False)
    with gr.Row():
        table_status = gr.Markdown()
        refresh = gr.Button("Refresh list", size="sm", scale=0)
    loader = Loader(lambda: jobs_outputs(actions), [table, table_status])

    started = start.click(
        lambda k, c, o: job_outputs(lambda: actions.start_job(k, c, o)),
        inputs=[kind, config, overrides],
        outputs=[job_id, text, data],
        api_name="start_job",
    )
    started.then(follow, inputs=data, outputs=timer, api_visibility="private")
    started.then(loader.fn, outputs=loader.outputs, api_visibility="private")
    checked = check.click(
        lambda j: job_outputs(lambda: actions.job(j))[1:], inputs=job_id, outputs=[text, data], api_name="job_status"
    )
    checked.then(follow, inputs=data, outputs=timer, api_visibility="private")
    cancelled = cancel.click(
        lambda j: cancel_outputs(actions, j),
        inputs=job_id,
        outputs=[cancel_status, text, data],
        # Scripts have `cancel_job` (see _register_api): this one's outputs may be left unchanged.
        api_visibility="private",
    )
    cancelled.then(follow, inputs=data, outputs=timer, api_visibility="private")
    cancelled.then(loader.fn, outputs=loader.outputs, api_visibility="private")
    timer.tick(lambda j: tick(actions, j), inputs=job_id, outputs=[text, data, timer], api_visibility="private")
    table.select(_selected_job, outputs=job_id, api_visibility="private").then(
        lambda j: job_outputs(lambda: actions.job(j))[1:], inputs=job_id, outputs=[text, data], api_visibility="private"
    ).then(follow, inputs=data, outputs=timer, api_visibility="private")
    refresh.click(loader.fn, outputs=loader.outputs, api_name="recent_jobs")
    return loader


def _selected_job(event: gr.SelectData) -> str:
    row = event.row_value or []
    return str(row[0]) if row else ""


# Endpoints for API clients -----------------------------------------------------------------


def _register_api(actions: UiActions) -> None:
    """Calls without the page's dynamic form: gradio_client sends a feature dict directly."""

    def predict(features: dict[str, Any], model: str = "") -> dict[str, Any]:
        """Predict one row (feature name -> value) with `model` (empty: the API's default model);
        returns label, probability, model version and request id, or `error` with the API's reason."""
        try:
            return actions.predict(features, model or None)
        except ApiError as exc:
            return {"error": exc.message}

    def models() -> dict[str, Any]:
        """The served models' names, the API's default one first."""
        try:
            return {"models": actions.models()}
        except ApiError as exc:
            return {"error": exc.message}

    def feedback(request_id: str, label: str) -> dict[str, Any]:
        """The true label of a prediction made through `predict` (its request id, row 0)."""
        try:
            return actions.feedback(request_id, label)
        except ApiError as exc:
            return {"error": exc.message}

    def form_schema(model: str = "") -> dict[str, Any]:
        """The fields the page's prediction form shows for `model` (empty: the API's default
        model), derived from its schema."""
        try:
            return actions.form(model or None).as_dict()
        except ApiError as exc:
            return {"error": exc.message}

    def model_monitoring(model: str = "") -> dict[str, Any]:
        """Drift and estimated accuracy of the served version of `model` (empty: the API's default
        model), as the API's monitor last judged them; or `error` with the API's reason."""
        try:
            return actions.monitoring(model or None)
        except ApiError as exc:
            return {"error": exc.message}

    def model_rollout(model: str = "") -> dict[str, Any]:
        """The rollout of `model` (empty: the API's default model) as the API reports it: the
        challenger in shadow or canary, the champion on probation, and the decisions, newest
        first (`rollout`, null when the API has none to report); or `error` with the API's
        reason."""
        try:
            described = actions.rollout(model or None)
        except ApiError as exc:
            return {"error": exc.message}
        reported = {key: described.get(key) for key in ("name", "version", "rollout")}
        if described.get("rollout_error"):
            reported["rollout_error"] = described["rollout_error"]
        return reported

    def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel a training job: the job, now `cancelled`, or `error` with the API's reason (it
        has already ended, or this UI's key cannot see it)."""
        try:
            return actions.cancel_job(job_id)
        except ApiError as exc:
            return {"error": exc.message}

    gradio_api(predict, api_name="predict")
    gradio_api(feedback, api_name="feedback")
    gradio_api(form_schema, api_name="form_schema")
    gradio_api(models, api_name="models")
    gradio_api(cancel_job, api_name="cancel_job")
    gradio_api(model_monitoring, api_name="model_monitoring")
    gradio_api(model_rollout, api_name="model_rollout")
