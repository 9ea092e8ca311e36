"""Serve application builder, named by the Serve config: `serve_apps.app:build_app`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from core.keys import hash_api_key
from core.settings import get_settings
from serve_apps.ingress import Ingress, ModelOptions


class MissingApiKeysError(RuntimeError):
    pass


class AppArgs(BaseModel):
    """Arguments from the Serve config's `args:`: which model this application serves (anything left
    out comes from the settings). Batching and limits are the deployment's `user_config`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str | None = None
    alias: str | None = None
    tracking_uri: str | None = None


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
        torch_threads=settings.serve.torch_threads,
    )
    token = settings.alert.webhook_token
    alert_tokens = [hash_api_key(token.get_secret_value())] if token else []
    return Ingress.bind(model, key_hashes, alert_tokens)  # type: ignore[attr-defined]
