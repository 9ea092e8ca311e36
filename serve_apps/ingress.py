"""The HTTP front door: auth, validation, request ids, error mapping. Holds no model."""

import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.auth import KeyStore, require_api_key
from serve_apps.schemas import CurrentModel, ErrorResponse, PredictRequest, PredictResponse

REQUEST_ID_HEADER = "X-Request-ID"
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    422: {"model": ErrorResponse, "description": "invalid request; details name each field"},
    503: {"model": ErrorResponse, "description": "no model loaded yet"},
}


def request_id_of(request: Request) -> str:
    existing: str | None = getattr(request.state, "request_id", None)
    if existing:
        return existing
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    # Accept a caller's id only when it is short and printable, so it is safe to log and echo.
    rid = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
    request.state.request_id = rid
    return rid


def error_response(
    request: Request, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    rid = request_id_of(request)
    body: dict[str, Any] = {"code": code, "message": message, "request_id": rid}
    if details is not None:
        body["details"] = details
    # Serve's proxy echoes the request id in the X-Request-ID response header; the body carries it too.
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return error_response(
        request,
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        headers=dict(exc.headers) if exc.headers else None,
    )


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type")} for e in exc.errors()]
    fields = ", ".join(".".join(str(p) for p in d["loc"]) for d in details[:5])
    message = f"invalid request: {fields}"
    if any(d["loc"] == ["body"] for d in details):
        message += " (send a JSON object with Content-Type: application/json)"
    return error_response(request, 422, "validation_error", message, details)


api = FastAPI(
    title="Ray cluster inference API",
    version="1.0.0",
    description="Predictions from the champion model, served by Ray Serve. Authenticate with "
    "`Authorization: Bearer <key>` or `X-API-Key: <key>`.",
)
api.add_exception_handler(StarletteHTTPException, _http_error)
api.add_exception_handler(RequestValidationError, _validation_error)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle[Any], key_hashes: list[str], max_rows: int) -> None:
        self._model = model
        self._max_rows = max_rows
        api.state.key_store = KeyStore(key_hashes)

    @api.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers. No authentication."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz(self, request: Request) -> Any:
        """Readiness: 200 once a model is loaded and can answer, 503 before."""
        status = await self._model.status.remote()
        if not status["ready"]:
            return error_response(
                request,
                503,
                "not_ready",
                "no model loaded yet",
                details=[{"msg": status["last_error"] or "waiting for a champion"}],
            )
        return {"status": "ready", "model": status["model"]}

    @api.post(
        "/v1/predict",
        tags=["inference"],
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=_ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def predict(self, body: PredictRequest, request: Request) -> Any:
        """Predict a label and its probability for each instance."""
        if len(body.instances) > self._max_rows:
            return error_response(
                request,
                422,
                "validation_error",
                f"instances: at most {self._max_rows} per request",
                [
                    {
                        "loc": ["body", "instances"],
                        "msg": f"at most {self._max_rows} instances per request, got {len(body.instances)}",
                        "type": "too_long",
                    }
                ],
            )
        result = await self._model.predict.remote(body.instances)
        status = result.get("status", 500)
        if status != 200:
            code = "validation_error" if status == 422 else "not_ready"
            return error_response(request, status, code, result.get("message", "error"), result.get("details"))
        return {"request_id": request_id_of(request), "model": result["model"], "predictions": result["predictions"]}

    @api.get(
        "/v1/models/current",
        tags=["models"],
        response_model=CurrentModel,
        responses=_ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def current_model(self, request: Request) -> Any:
        """The model version being served, its schema and test metrics."""
        current = await self._model.current.remote()
        if current is None:
            return error_response(request, 503, "not_ready", "no model loaded yet")
        return current
