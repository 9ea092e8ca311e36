"""The inference API as a FastAPI application: its routers, the error mapping and the request
context. Each Serve replica builds its own (serve_apps/ingress.py) and puts its state on it."""

from __future__ import annotations

from fastapi import FastAPI

from serve_apps.context import RequestContextMiddleware
from serve_apps.errors import install_error_handlers
from serve_apps.routes import alerts, feedback, health, inference, models, training_jobs


def create_api() -> FastAPI:
    app = FastAPI(
        title="Ray cluster inference API",
        version="1.0.0",
        description="Predictions from the champion model, served by Ray Serve. Authenticate with "
        "`Authorization: Bearer <key>` or `X-API-Key: <key>`. Each key has scopes: `predict`, `feedback`, "
        "`train` (its own training jobs) and `admin` (everything); a key without a route's scope gets a 403 "
        "`missing_scope` naming it.",
    )
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    for routes in (health, inference, feedback, alerts, models, training_jobs):
        app.include_router(routes.router)
    return app


# The API's shape, for its OpenAPI document and the tests that read it; replicas build their own.
api = create_api()
