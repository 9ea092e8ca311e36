"""The inference API as a FastAPI application: its routers, the error mapping and the request
context. The Serve deployment (serve_apps/ingress.py) puts the replica's state on `api.state`."""

from __future__ import annotations

from fastapi import FastAPI

from serve_apps.context import RequestContextMiddleware
from serve_apps.errors import install_error_handlers
from serve_apps.routes import alerts, feedback, health, inference, models, training_jobs

api = FastAPI(
    title="Ray cluster inference API",
    version="1.0.0",
    description="Predictions from the champion model, served by Ray Serve. Authenticate with "
    "`Authorization: Bearer <key>` or `X-API-Key: <key>`.",
)
install_error_handlers(api)
api.add_middleware(RequestContextMiddleware)
for router in (health.router, inference.router, feedback.router, alerts.router, models.router, training_jobs.router):
    api.include_router(router)
