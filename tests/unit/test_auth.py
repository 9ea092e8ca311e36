import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from core.keys import KeyStore, hash_api_key
from serve_apps.auth import require_api_key


@pytest.fixture
def client():
    app = FastAPI()
    app.state.key_store = KeyStore([hash_api_key("good-key"), hash_api_key("other-key")])

    @app.get("/private", dependencies=[Depends(require_api_key)])
    def private() -> dict[str, str]:
        return {"ok": "yes"}

    return TestClient(app)


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer good-key"}, {"X-API-Key": "good-key"}, {"X-API-Key": "other-key"}],
)
def test_valid_keys_pass(client, headers):
    assert client.get("/private", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic good-key"},
        {"X-API-Key": ""},
    ],
)
def test_missing_or_wrong_keys_get_401(client, headers):
    response = client.get("/private", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_key_store_refuses_to_exist_without_keys():
    with pytest.raises(ValueError, match="no API keys"):
        KeyStore([])


def test_keys_are_not_kept_in_plain_text():
    store = KeyStore([hash_api_key("secret-key")])
    assert "secret-key" not in repr(vars(store))
    assert store.verify("secret-key") and not store.verify("secret-ke")


def test_serve_app_refuses_to_build_without_keys(monkeypatch):
    from core.settings import Settings, get_settings
    from serve_apps.app import MissingApiKeysError, build_app

    monkeypatch.delenv("API_KEYS", raising=False)
    monkeypatch.setitem(Settings.model_config, "env_file", None)  # no .env to pick a key up from
    get_settings.cache_clear()
    try:
        with pytest.raises(MissingApiKeysError, match="API_KEYS is not set"):
            build_app({})
    finally:
        get_settings.cache_clear()
