"""The Gradio UI that `cluster up` starts, driven over HTTP with gradio_client as a user's
script would, and once in headless Chromium as a person would; and the key of its own that
`cluster up` registers for it in PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import ssl
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from gradio_client import Client
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from cluster.apps import ui_environment
from cluster.demo import wait_for_version
from cluster.sandbox import Stack, free_port, temporary_database
from core.health import check, wait_until
from core.keys import ApiKeyRecord, ApiKeyTable, Scope, hash_api_key
from core.settings import REPO_ROOT, Settings, environment_variables
from serve_apps.schemas import EXAMPLE_ROW
from tests.conftest import UI_PASSWORD
from tests.training_jobs_helpers import QUICK

ARTIFACTS = REPO_ROOT / ".state" / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
T = TypeVar("T")


@pytest.fixture(scope="module")
def served(stack: Stack, trained: dict[str, Any]) -> dict[str, Any]:
    """The champion the API serves once the first model is trained: what the UI must show."""
    assert wait_for_version(stack.settings, str(trained["model_version"]), 60)
    response = stack.http.get("/v1/models/current", headers=stack.auth)
    assert response.status_code == 200, response.text
    current: dict[str, Any] = response.json()
    return current


def ui_client(stack: Stack, password: str) -> Client:
    """gradio_client as a script would use it; it takes a verify value for every call it makes, so
    the edge's local CA goes in as an SSL context (the parameter is typed bool)."""
    verify: bool | ssl.SSLContext = True
    if isinstance(stack.verify, str):
        verify = ssl.create_default_context(cafile=stack.verify)
    auth = (stack.settings.ui.username, password)
    return Client(ui_url(stack), auth=auth, verbose=False, ssl_verify=verify)


def ui_url(stack: Stack) -> str:
    """Where people reach the UI: under /ui/ through Nginx (https) when the edge runs."""
    return f"{stack.api_url}/ui" if stack.edge else stack.settings.ui.url


@pytest.fixture(scope="module")
def ui(stack: Stack, served: dict[str, Any]) -> Client:
    assert check(f"{stack.settings.ui.url}/")[0], "cluster up did not start the UI"
    return ui_client(stack, UI_PASSWORD)


def test_ui_refuses_a_wrong_login(stack: Stack):
    url = ui_url(stack)
    with pytest.raises(ValueError, match="Could not login"):
        ui_client(stack, "not-the-password")
    # Nothing but the login page without it.
    assert httpx.get(f"{url}/config", timeout=10, verify=stack.verify).status_code == 401
    login = httpx.post(f"{url}/login", data={"username": "admin", "password": "nope"}, timeout=10, verify=stack.verify)
    assert login.status_code == 400


def test_form_follows_the_served_schema(ui: Client, served: dict[str, Any]):
    schema = ui.predict(api_name="/form_schema")
    assert schema["model"] == f"{served['name']} v{served['version']}"
    fields = {f["name"]: f for f in schema["fields"]}
    assert list(fields) == [f["name"] for f in served["features"]]
    for feature in served["features"]:
        field = fields[feature["name"]]
        if feature["kind"] == "numeric":
            assert field["kind"] == "numeric"
        else:
            assert field["kind"] == "categorical" and field["choices"] == feature["categories"]
    # Starting values are the example of the API's OpenAPI description.
    assert fields["workclass"]["default"] == EXAMPLE_ROW["workclass"] and fields["age"]["default"] == 39
    assert schema["classes"] == served["classes"]


def test_prediction_matches_the_api(ui: Client, stack: Stack, served: dict[str, Any]):
    through_ui = ui.predict(EXAMPLE_ROW, api_name="/predict")
    assert "error" not in through_ui, through_ui
    direct = stack.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers=stack.auth).json()
    expected = direct["predictions"][0]
    assert through_ui["label"] == expected["label"] and through_ui["label"] in served["classes"]
    assert through_ui["probability"] == pytest.approx(expected["probability"])
    assert through_ui["model_version"] == direct["model"]["version"] == served["version"]
    assert through_ui["run_id"] == served["run_id"]
    assert through_ui["request_id"] and through_ui["request_id"] != direct["request_id"]


def test_the_model_picker_names_the_served_models(ui: Client, served: dict[str, Any]):
    assert ui.predict(api_name="/models")["models"][0] == served["name"]
    chosen = ui.predict(EXAMPLE_ROW, served["name"], api_name="/predict")
    assert chosen["model_version"] == served["version"], chosen
    missing = ui.predict(EXAMPLE_ROW, "no-such-model", api_name="/predict")
    assert "no model 'no-such-model' is served" in missing["error"]


def test_invalid_input_comes_back_readable(ui: Client):
    refused = ui.predict({**EXAMPLE_ROW, "age": "forty"}, api_name="/predict")
    assert refused["error"].startswith("The API rejected the input (422)") and "age" in refused["error"]


def test_feedback_is_recorded(ui: Client, stack: Stack):
    prediction = ui.predict(EXAMPLE_ROW, api_name="/predict")
    other = next(c for c in ("<=50K", ">50K") if c != prediction["label"])
    recorded = ui.predict(prediction["request_id"], other, api_name="/feedback")
    assert recorded["outcome"] == "recorded" and recorded["index"] == 0, recorded
    assert recorded["predicted"] == prediction["label"] and recorded["correct"] is False
    # The API has it: a second label for the same row is a duplicate, and the first one stays.
    again = stack.http.post(
        "/v1/feedback",
        json={"request_id": prediction["request_id"], "index": 0, "label": prediction["label"]},
        headers=stack.auth,
        timeout=30,
    )
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate" and again.json()["label"] == other


def test_model_card_shows_the_served_model(ui: Client, served: dict[str, Any], trained: dict[str, Any]):
    text, losses, _scores, promotions, card = ui.predict(api_name="/model_card")
    assert card["version"] == served["version"] and card["run_id"] == served["run_id"], card.get("notes")
    assert card["metrics"] == served["metrics"] and f"v{served['version']}" in text
    # Per-epoch curves from MLflow's metric history of the run (2 epochs were trained).
    assert len(card["curves"]["val_loss"]) >= 1 and {"train_loss", "val_loss"} <= set(card["curves"])
    assert {row[2] for row in losses["data"]} >= {"train_loss", "val_loss"}
    champion = next(p for p in card["promotions"] if p["version"] == served["version"])
    assert champion["decision"] == "promoted" and "champion" in champion["aliases"]
    assert int(promotions["data"][0][0]) == max(int(p["version"]) for p in card["promotions"])  # newest first
    assert card["notes"] == []


def test_training_job_started_and_followed_from_the_ui(ui: Client, stack: Stack):
    # Promotion off: this job must not replace the champion other tests rely on.
    overrides = json.dumps({**QUICK, "promotion.enabled": False})
    job_id, text, job = ui.predict("train", "adult", overrides, api_name="/start_job")
    assert job_id and job["state"] == "queued" and "**queued**" in text, job
    state: dict[str, Any] = {}

    def finished() -> bool:
        _, state["job"] = ui.predict(job_id, api_name="/job_status")
        return state["job"].get("state") in {"succeeded", "failed", "dead_lettered"}

    assert wait_until(finished, 600, max_wait_s=3), state
    assert state["job"]["state"] == "succeeded" and state["job"]["model_version"], state["job"]
    assert not state["job"]["promoted"]  # no gate ran: the champion stays
    table, _ = ui.predict(api_name="/recent_jobs")
    assert next(row for row in table["data"] if row[0] == job_id)[3] == "succeeded"


def test_a_job_is_cancelled_from_the_ui_with_the_ui_s_own_key(ui: Client, stack: Stack):
    overrides = json.dumps({**QUICK, "promotion.enabled": False})
    job_id, _, job = ui.predict("train", "adult", overrides, api_name="/start_job")
    assert job_id and "error" not in job, job
    # Started with the key `cluster up` registered for the UI, not with an admin key of API_KEYS.
    stored = json.loads((stack.settings.state_dir / "ui.key").read_text())
    assert (job["created_by"]["kind"], job["created_by"]["name"]) == ("api_key", stored["name"]), job
    cancelled = ui.predict(job_id, api_name="/cancel_job")
    assert cancelled["state"] == "cancelled", cancelled
    assert ui.predict(job_id, api_name="/cancel_job")["state"] == "cancelled"  # a second cancel changes nothing
    text, shown = ui.predict(job_id, api_name="/job_status")
    assert shown["state"] == "cancelled" and f"Started by key {stored['name']}" in text, text


# The UI's own key: `cluster up` against this machine's PostgreSQL --------------------------------

ADMIN_KEY = "admin-key-from-api-keys"
UI_SCOPES = frozenset({Scope.PREDICT, Scope.FEEDBACK, Scope.TRAIN})
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def dsn(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database; the session's stack settings stay out of the settings these tests build."""
    for name, _, _ in environment_variables():
        monkeypatch.delenv(name, raising=False)
    with temporary_database("ui_key_test") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


def _settings(dsn: str, state_dir: Path) -> Settings:
    return Settings(_env_file=None, api={"keys": ADMIN_KEY}, database={"url": dsn}, state_dir=state_dir)


def _ui_key(settings: Settings) -> str:
    return ui_environment(settings, {"X": "1"}, now=lambda: NOW)["UI_API_KEY"]


def _table(dsn: str, op: Callable[[ApiKeyTable], Awaitable[T]]) -> T:
    return asyncio.run(ApiKeyTable(dsn).run_once(op))


def _records(dsn: str) -> dict[str, ApiKeyRecord]:
    return {record.name: record for record in _table(dsn, lambda table: table.records())}


def _active_name(dsn: str, key: str) -> str | None:
    principal = _table(dsn, lambda table: table.keys()).active.get(hash_api_key(key))
    return None if principal is None else principal.name


def test_cluster_up_registers_a_ui_key_with_only_the_scopes_the_ui_uses(dsn, tmp_path):
    settings = _settings(dsn, tmp_path)
    key = _ui_key(settings)
    assert key != ADMIN_KEY
    (record,) = _records(dsn).values()
    assert record.name == "ui-20260102030405" and _active_name(dsn, key) == record.name
    assert record.scopes == UI_SCOPES and record.models is None and record.revoked_at is None
    stored = tmp_path / "ui.key"
    assert json.loads(stored.read_text()) == {"name": "ui-20260102030405", "key": key}
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".ui.key*")), "no staging file left behind"
    # The next `cluster up` hands the UI the same key and registers nothing.
    assert _ui_key(settings) == key
    assert list(_records(dsn)) == ["ui-20260102030405"]


def test_a_ui_key_revoked_by_an_operator_is_replaced(dsn, tmp_path):
    settings = _settings(dsn, tmp_path)
    first = _ui_key(settings)
    _table(dsn, lambda table: table.revoke("ui-20260102030405"))
    second = _ui_key(settings)
    assert second not in {first, ADMIN_KEY}
    # Names are never reused: the same second takes a suffix.
    assert _active_name(dsn, second) == "ui-20260102030405-1" and _active_name(dsn, first) is None
    assert _records(dsn)["ui-20260102030405-1"].scopes == UI_SCOPES
    assert json.loads((tmp_path / "ui.key").read_text()) == {"name": "ui-20260102030405-1", "key": second}
    assert _ui_key(settings) == second


def test_a_stored_key_that_is_not_the_ui_s_any_more_is_revoked_and_replaced(dsn, tmp_path):
    settings = _settings(dsn, tmp_path)
    # Under the name the file gives, but with other scopes: an older UI's key, or a mix-up.
    _table(dsn, lambda table: table.add("ui-old", hash_api_key("old-key"), frozenset({Scope.PREDICT})))
    (tmp_path / "ui.key").write_text(json.dumps({"name": "ui-old", "key": "old-key"}))
    key = _ui_key(settings)
    records = _records(dsn)
    assert records["ui-old"].revoked_at is not None and _active_name(dsn, key) == "ui-20260102030405"
    # A file that is not the UI's: a new key, and nothing else revoked.
    (tmp_path / "ui.key").write_text("not json")
    replaced = _ui_key(settings)
    assert replaced != key and _active_name(dsn, replaced) == "ui-20260102030405-1"
    assert _records(dsn)["ui-20260102030405"].revoked_at is None


# Headless Chromium ---------------------------------------------------------------------------


class Browser:
    """Chromium's DevTools protocol, just enough to sign in, read the page and take a picture."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=60))
            if message.get("id") == call_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''") or "")


def _pinned_certificate(stack: Stack) -> list[str]:
    """Chromium trusts exactly the edge's certificate (its public key), not every certificate."""
    if not stack.edge:
        return []
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    server = stack.settings.state_dir / "tls" / "server.pem"
    leaf = x509.load_pem_x509_certificates(server.read_bytes())[0]
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return [f"--ignore-certificate-errors-spki-list={base64.b64encode(digest.finalize()).decode()}"]


@pytest.fixture
def browser(tmp_path: Path, stack: Stack) -> Iterator[Browser]:
    port = free_port()
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", f"--remote-debugging-port={port}", "--window-size=1280,1600",
        *_pinned_certificate(stack), "about:blank",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: check(f"http://127.0.0.1:{port}/json/version")[0], 60), "chromium did not start"
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20) as socket:
            yield Browser(socket)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _sign_in(browser: Browser, stack: Stack) -> None:
    """Gradio's login sets its session cookies; the browser gets the same ones."""
    url = ui_url(stack)
    credentials = {"username": stack.settings.ui.username, "password": UI_PASSWORD}
    login = httpx.post(f"{url}/login", data=credentials, verify=stack.verify)
    assert login.status_code == 200, login.text
    for name, value in login.cookies.items():
        browser.call("Network.setCookie", name=name, value=value, url=url)


def _assert_real_picture(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == 1280 and image.height >= 800
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, f"{path} is nearly blank ({len(colours)} colours)"
    background = max(colours)[0] / sum(count for count, _ in colours)
    assert background < 0.97, f"{path} is {background:.0%} one colour"


def test_page_renders_the_form_and_predicts(browser: Browser, stack: Stack, served: dict[str, Any]):
    _sign_in(browser, stack)
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{ui_url(stack)}/")
    names = [f["name"] for f in served["features"]]
    assert wait_until(lambda: all(name in browser.text() for name in names), 60), browser.text()[:2000]
    assert f"{served['name']} v{served['version']}" in browser.text()
    # The form works as a person uses it: press Predict, read the answer.
    assert browser.evaluate("(() => { const b = document.getElementById('predict-button'); b?.click(); return !!b })()")
    assert wait_until(lambda: "Prediction:" in browser.text(), 60), browser.text()[:2000]
    assert f"v{served['version']}" in browser.text().split("Prediction:", 1)[1]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-prediction.png"
    shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    _assert_real_picture(shot)
