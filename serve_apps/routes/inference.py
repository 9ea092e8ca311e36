"""Predictions from the champion of each served model, batched across requests inside the replica;
during a canary a share of the callers get the challenger's, and during a shadow or canary rollout
every answered request is mirrored to the other version after the fact (serve_apps/shadow.py).

The rows come as JSON `instances` (an object per row) or `columns` (a list per feature), as an
Arrow IPC stream or as a Parquet file (by Content-Type), and are validated alike
(serve_apps/validation.py). The routes read the body themselves: orjson, and no pydantic model per
row, for the common case; anything orjson cannot read or that is not the expected envelope goes
through the standard library and pydantic exactly as FastAPI's body parameter did, so that every
malformed body gets the answer it always got.
"""

from __future__ import annotations

import contextlib
import email.message
import functools
import gc
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Body, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from core.keys import Principal
from serve_apps.champion import BatchResult, ChampionModel, LoadedModel, RecordLines
from serve_apps.dependencies import ModelName, Predictor, ReplicaDep, visible_model
from serve_apps.errors import MODEL_RESPONSES, PREDICT_RESPONSES, error_response, request_id_of
from serve_apps.fleet import Routed
from serve_apps.replica import Replica
from serve_apps.rollout import route
from serve_apps.schemas import (
    ARROW_STREAM,
    PARQUET_TYPES,
    PREDICT_REQUEST_BODY,
    ColumnsRequest,
    PredictRequest,
    PredictResponse,
)
from serve_apps.validation import FeatureBatch, RowValidator, UnreadableBodyError, table_rows
from services.feedback.store import PredictionBatch

if TYPE_CHECKING:
    import pyarrow as pa

router = APIRouter(tags=["inference"], responses=PREDICT_RESPONSES)
_tracer = trace.get_tracer("serve_apps.ingress")
# A Parquet body may be compressed: this much decoded data at most (the edge caps the body itself).
MAX_PARQUET_DECODED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BodyRows:
    """A request body's rows in the form they came in, not yet validated against a model."""

    form: str  # "instances", "columns" or "table"
    size: int
    instances: list[Any] | None = None
    columns: dict[str, list[Any]] | None = None
    table: pa.Table | None = None

    @property
    def loc(self) -> list[str]:
        """Where the rows are in the body, for the errors about all of them."""
        return ["body"] if self.form == "table" else ["body", self.form]


# Reading the body ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _media_type(content_type: str | None) -> tuple[str, str] | None:
    """(main type, subtype) as FastAPI reads them (email.message); None without the header."""
    if not content_type:
        return None
    message = email.message.Message()
    message["content-type"] = content_type
    return message.get_content_maintype(), message.get_content_subtype()


def _is_json(media: tuple[str, str] | None) -> bool:
    return media is not None and media[0] == "application" and (media[1] == "json" or media[1].endswith("+json"))


def _fast_json(body: bytes) -> BodyRows | None:
    """The common envelopes, read by orjson; None for anything else (the standard path decides)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # NaN, integers beyond 64 bits, lone surrogates, BOMs...: as the standard library reads them
    if type(parsed) is not dict or len(parsed) != 1:
        return None
    instances = parsed.get("instances")
    # Rows that are not all objects get pydantic's error for them, as before.
    if type(instances) is list and instances and set(map(type, instances)) == {dict}:
        return BodyRows("instances", len(instances), instances=instances)
    columns = parsed.get("columns")
    if type(columns) is dict and columns and all(type(values) is list for values in columns.values()):
        sizes = set(map(len, columns.values()))
        if len(sizes) == 1 and (size := sizes.pop()) > 0:
            return BodyRows("columns", size, columns=columns)
    return None


def _standard_json(body: bytes, media: tuple[str, str] | None) -> Any:
    """The body as FastAPI's body parameter reads it: JSON content types through the standard
    library, any other body left as bytes (which then fails the model's validation)."""
    if not _is_json(media):
        return body
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "ctx": {"error": exc.msg}}]
        ) from exc
    except Exception as exc:  # RecursionError, UnicodeDecodeError, ValueError: errors.py names them
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc


def _validated(model: type[BaseModel], value: Any) -> Any:
    try:
        # As FastAPI validates a body parameter (the errors it gives for a body that is no object).
        return model.model_validate(value, from_attributes=True)
    except ValidationError as exc:
        raise RequestValidationError(
            [{"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)]
        ) from exc


def _standard_envelope(body: bytes, media: tuple[str, str] | None) -> BodyRows:
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    parsed = _standard_json(body, media)
    if isinstance(parsed, dict) and "columns" in parsed and "instances" not in parsed:
        columns: dict[str, list[Any]] = _validated(ColumnsRequest, parsed).columns
        sizes = {name: len(values) for name, values in columns.items()}
        size = next(iter(sizes.values()))
        uneven = next((name for name, n in sizes.items() if n != size), None)
        if uneven is not None:
            raise RequestValidationError(
                [
                    {
                        "type": "length_mismatch",
                        "loc": ("body", "columns", uneven),
                        "msg": f"every column must have the same length: {sizes[uneven]} values here, "
                        f"{size} in the first column",
                    }
                ]
            )
        if size == 0:
            raise RequestValidationError(
                [{"type": "too_short", "loc": ("body", "columns"), "msg": "the columns must hold at least 1 row"}]
            )
        return BodyRows("columns", size, columns=columns)
    instances: list[dict[str, Any]] = _validated(PredictRequest, parsed).instances
    return BodyRows("instances", len(instances), instances=instances)


def _table(body: bytes, media: tuple[str, str], max_rows: int) -> BodyRows:
    from serve_apps.validation import read_arrow_stream, read_parquet

    kind = "arrow" if f"{media[0]}/{media[1]}" == ARROW_STREAM else "parquet"
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        if kind == "arrow":
            read = read_arrow_stream(body, max_rows)
        else:
            read = read_parquet(body, max_rows, MAX_PARQUET_DECODED_BYTES)
    except UnreadableBodyError as exc:
        raise RequestValidationError([{"type": f"{kind}_invalid", "loc": ("body",), "msg": str(exc)}]) from exc
    if read.rows == 0:
        raise RequestValidationError(
            [{"type": "too_short", "loc": ("body",), "msg": "the table must hold at least 1 row"}]
        )
    return BodyRows("table", read.rows, table=read.table)


async def read_rows(request: Request, max_rows: int) -> BodyRows:
    """The request's rows, by its Content-Type; envelope errors raise (422 through errors.py)."""
    return read_body(await request.body(), request.headers.get("content-type"), max_rows)


def read_body(body: bytes, content_type: str | None, max_rows: int) -> BodyRows:
    media = _media_type(content_type)
    if media is not None and f"{media[0]}/{media[1]}" in (ARROW_STREAM, *PARQUET_TYPES):
        return _table(body, media, max_rows)
    if _is_json(media) and body:
        fast = _fast_json(body)
        if fast is not None:
            return fast
    return _standard_envelope(body, media)


# Validating the rows ---------------------------------------------------------------------------


def _python_rows(rows: BodyRows, validator: RowValidator) -> list[Any]:
    """The rows as Python objects, for the per-row checks that name the row and the field."""
    if rows.instances is not None:
        return rows.instances
    if rows.columns is not None:
        names = list(rows.columns)
        return [dict(zip(names, values, strict=True)) for values in zip(*rows.columns.values(), strict=True)]
    assert rows.table is not None
    return table_rows(rows.table, validator.longest_value)


def validate(rows: BodyRows, validator: RowValidator) -> FeatureBatch | list[dict[str, Any]]:
    """The validated batch, or the errors (each naming the row and the field)."""
    if rows.instances is not None:
        batch = validator.from_rows(rows.instances)
    elif rows.columns is not None:
        batch = validator.from_sequences(rows.columns, rows.size)
    else:
        assert rows.table is not None
        batch = validator.from_table(rows.table)
    if batch is not None:
        return batch
    python_rows = _python_rows(rows, validator)
    errors = validator.errors(python_rows)
    if errors:
        return errors
    # Valid after all (an Arrow dictionary's null, say): the batch of the rows as Python values.
    batch = validator.from_rows(python_rows)
    if batch is None:  # pragma: no cover - the per-row and per-column checks agree (tested)
        raise RuntimeError("rows valid one by one but not as columns")
    return batch


# The routes ------------------------------------------------------------------------------------


def _too_many_rows(request: Request, rows: BodyRows, max_rows: int) -> Response:
    noun = "instances" if rows.form == "instances" else "rows"
    details = [{"loc": rows.loc, "msg": f"at most {max_rows} {noun} per request, got {rows.size}", "type": "too_long"}]
    where = "instances" if rows.form == "instances" else "rows"
    return error_response(request, 422, "validation_error", f"{where}: at most {max_rows} per request", details)


# The predict routes read their body themselves (read_rows), so FastAPI's body parameter is not
# theirs. FastAPI documents a body, and lists its models among the schema's components (where the
# UI finds the example row), only for a route that declares one: each route below has a twin,
# registered after it and so never matched, that declares the body for the OpenAPI document.
PredictBody = Annotated[PredictRequest | ColumnsRequest, Body()]
_OTHER_BODIES = {"requestBody": PREDICT_REQUEST_BODY}


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """The cyclic garbage collector paused while a body is parsed and validated. Reading 1,000 JSON
    rows allocates some fifteen thousand containers at once: collections during that stretch move
    them, still referenced, to the older generations, and each time enough have moved the next
    collection walks every object of the replica (Ray's, torch's, the models'), a pause longer than
    many requests. Paused, they are freed by their reference counts when the rows are dropped,
    before any collection sees them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@router.post("/v1/predict", include_in_schema=False)
async def predict_default(request: Request, replica: ReplicaDep, principal: Predictor) -> Response:
    body = await request.body()
    champion = replica.champion
    with _no_collection():
        rows = read_body(body, request.headers.get("content-type"), replica.max_rows)
        visible_model(principal, champion.model_name, champion.alias)
        checked = _validated_rows(rows, request, replica, champion)
        del rows
    if isinstance(checked, Response):
        return checked
    return await _predict(*checked, request, replica, principal, champion, "/v1/predict")


@router.post("/v1/models/{name}/predict", include_in_schema=False)
async def predict_named(name: ModelName, request: Request, replica: ReplicaDep, principal: Predictor) -> Response:
    body = await request.body()
    with _no_collection():
        rows = read_body(body, request.headers.get("content-type"), replica.max_rows)
    visible_model(principal, name, replica.champion.alias)
    # A model served already answers without waiting; a first request waits for its load.
    champion = await replica.fleet.get(name)
    with _no_collection():
        checked = _validated_rows(rows, request, replica, champion)
        del rows
    if isinstance(checked, Response):
        return checked
    return await _predict(*checked, request, replica, principal, champion, "/v1/models/{name}/predict")


def _validated_rows(
    rows: BodyRows, request: Request, replica: Replica, champion: ChampionModel
) -> tuple[LoadedModel, FeatureBatch] | Response:
    """The champion loaded now and the rows validated against it, or the error response: too many
    rows, no model yet, a bad row."""
    if rows.size > replica.max_rows:
        return _too_many_rows(request, rows, replica.max_rows)
    model = champion.loaded
    if model is None:
        return error_response(request, 503, "not_ready", f"no {champion.alias} of {champion.model_name} is loaded yet")
    checked = validate(rows, model.validator)
    if not isinstance(checked, FeatureBatch):
        fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) for e in checked[:5])
        return error_response(request, 422, "validation_error", f"invalid instances: {fields}", checked)
    return model, checked


@router.post(
    "/v1/predict", response_model=PredictResponse, response_model_exclude_none=True, openapi_extra=_OTHER_BODIES
)
async def predict(body: PredictBody, replica: ReplicaDep, principal: Predictor) -> Any:  # pragma: no cover
    """Predict with the default model (`MODEL_NAME`): a label and its probability for each row.

    The rows come as JSON `instances` (an object per row) or `columns` (a list per feature), an
    Arrow IPC stream or a Parquet file (by Content-Type), at most MAX_BATCH_ROWS of them; a bad
    value is reported alike in every form, naming the row and the field."""
    raise AssertionError("documentation only: predict_default answers")


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=MODEL_RESPONSES,
    openapi_extra=_OTHER_BODIES,
)
async def predict_with(  # pragma: no cover
    name: ModelName, body: PredictBody, replica: ReplicaDep, principal: Predictor
) -> Any:
    """Predict with the champion of the registered model `name`: any model whose `champion` alias
    is set is served, from its first request on. The rows come as on /v1/predict."""
    raise AssertionError("documentation only: predict_named answers")


async def _predict(
    model: LoadedModel,
    batch: FeatureBatch,
    request: Request,
    replica: Replica,
    principal: Principal,
    champion: ChampionModel,
    path: str,
) -> Response:
    replica.metrics.request_rows.observe(batch.size, tags={"route": path, "model": champion.model_name})
    # The challenger accepts whatever the champion does (serve_apps/rollout.py refuses one that
    # does not), so the champion's validation stands for both.
    rollout = champion.rollout
    answering: LoadedModel = model
    mirror_to: LoadedModel | None = None
    if rollout is not None:
        answering, mirror_to = route(rollout, model, replica.canary_key, request, principal)
    # A child span for the model's share of the request (a no-op without Serve's tracing).
    with _tracer.start_as_current_span("model.predict") as span:
        result: BatchResult = await replica.predict_batch(Routed(champion, answering, batch))
        served = result.model
        span.set_attribute("model.name", served.name)
        span.set_attribute("model.version", served.version)
        span.set_attribute("model.rows", batch.size)
    trace.get_current_span().set_attribute("model.version", served.version)
    rid = request_id_of(request)
    # Encoded once from the model's outputs, without an object per row (serve_apps/champion.py).
    predictions = result.predictions_json()
    recorder = replica.prediction_recorder()
    if recorder is not None:
        # Recorded whole: the lines of its rows are written when the recorder flushes.
        lines = RecordLines(rid, served, result.numbers, batch)
        recorder.record([PredictionBatch(rid, served.name, served.version, batch.size, lines)])
    if mirror_to is not None and rollout is not None:
        if rollout.kind == "canary":
            replica.rollout_metrics.count_canary(served.name, served.version)
        replica.mirror(rollout.id, mirror_to, rid, model.validator.rows_of(batch))
    # Serialised here rather than by FastAPI's response model: re-validating a large answer would
    # cost more than the model (benchmarks/README.md).
    body = b'{"request_id":%b,"model":%b,"predictions":%b}' % (
        orjson.dumps(rid),
        orjson.dumps(served.ref),
        predictions,
    )
    return Response(body, media_type="application/json")
