"""Serve application builder, named by the Serve config: `serve_apps.app:build_app`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from core.keys import hash_api_key
from core.settings import get_settings
from serve_apps.ingress import Ingress, ModelOptions


class MissingApiKeysError(RuntimeError):
    pass


class AppArgs(BaseModel):
    """Arguments from the Serve config's `args:`; anything left out comes from the settings."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str | None = None
    alias: str | None = None
    tracking_uri: str | None = None
    poll_interval_s: float | None = None
    max_rows: int | None = None
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = Field(default=None, ge=0)
    torch_threads: int | None = None


def build_app(args: dict[str, object]) -> Application:
    parsed = AppArgs.model_validate(args or {})
    settings = get_settings()
    key_hashes = [hash_api_key(k) for k in settings.api.key_list()]
    if not key_hashes:
        raise MissingApiKeysError(
            "API_KEYS is not set: the inference API will not start without at least one key. "
            "Add API_KEYS=<key>[,<key>...] to .env or the environment (`make demo` generates one)."
        )
    model = ModelOptions(
        model_name=parsed.model_name or settings.model.name,
        alias=parsed.alias or settings.champion_alias,
        tracking_uri=parsed.tracking_uri or settings.mlflow.tracking_uri,
        poll_interval_s=parsed.poll_interval_s or settings.model.poll_interval_s,
        max_batch_size=parsed.max_batch_size or settings.serve.max_batch_size,
        batch_wait_timeout_s=(
            settings.serve.batch_wait_timeout_s if parsed.batch_wait_timeout_s is None else parsed.batch_wait_timeout_s
        ),
        torch_threads=parsed.torch_threads or settings.serve.torch_threads,
    )
    alert_tokens = (
        [hash_api_key(settings.alert.webhook_token.get_secret_value())] if settings.alert.webhook_token else []
    )
    return Ingress.bind(  # type: ignore[attr-defined]
        model, key_hashes, parsed.max_rows or settings.max_batch_rows, alert_tokens
    )
