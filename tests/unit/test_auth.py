import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from core.keys import KeyStore, Principal, Scope, bootstrap_principals, hash_api_key, key_id_of
from serve_apps.auth import authenticate, require
from serve_apps.errors import install_error_handlers

PREDICT_ONLY = hash_api_key("predict-key")


@pytest.fixture
def client():
    app = FastAPI()
    install_error_handlers(app)
    principals = bootstrap_principals([hash_api_key("good-key"), hash_api_key("other-key")])
    principals[PREDICT_ONLY] = Principal(key_id_of(PREDICT_ONLY), "reader", frozenset({Scope.PREDICT}))
    app.state.key_store = KeyStore(principals)

    @app.get("/private", dependencies=[Depends(authenticate)])
    async def private() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/train", dependencies=[Depends(require(Scope.TRAIN))])
    async def train() -> dict[str, str]:
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
    for path in ("/private", "/train"):
        response = client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_valid_key_without_the_scope_gets_403_naming_it(client):
    response = client.get("/train", headers={"X-API-Key": "predict-key"})
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "missing_scope" and "'train'" in error["message"] and "reader" in error["message"]
    assert error["details"][0]["ctx"] == {"scope": "train"}
    assert "predict-key" not in response.text


def test_api_keys_are_admin_keys(client):
    assert client.get("/train", headers={"X-API-Key": "good-key"}).status_code == 200
    principal = bootstrap_principals([hash_api_key("k")])[hash_api_key("k")]
    assert principal.admin and all(principal.allows(scope) for scope in Scope)
    assert principal.name == "API_KEYS[1]" and principal.key_id == hash_api_key("k")[:12]


def test_admin_holds_every_scope_and_others_only_theirs():
    reader = Principal("id", "reader", frozenset({Scope.PREDICT, Scope.FEEDBACK}))
    assert reader.allows(Scope.PREDICT) and reader.allows(Scope.FEEDBACK)
    assert not reader.allows(Scope.TRAIN) and not reader.allows(Scope.ADMIN)
    assert Principal("id", "root", frozenset({Scope.ADMIN})).allows(Scope.TRAIN)


def test_a_model_restriction_names_the_models_a_key_may_use():
    restricted = Principal("id", "team-a", frozenset({Scope.PREDICT}), frozenset({"adult-income"}))
    assert restricted.may_use_model("adult-income") and not restricted.may_use_model("other")
    assert Principal("id", "all", frozenset({Scope.PREDICT})).may_use_model("anything")


def test_key_store_refuses_to_exist_without_keys():
    with pytest.raises(ValueError, match="no API keys"):
        KeyStore({})


def test_keys_are_not_kept_in_plain_text():
    store = KeyStore(bootstrap_principals([hash_api_key("secret-key")]))
    assert "secret-key" not in repr(vars(store))
    assert store.verify("secret-key") is not None and store.verify("secret-ke") is None


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
