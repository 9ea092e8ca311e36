import pytest

from core.settings import Settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Settings come from the environment: start each test from none of ours."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_embedded_defaults(tmp_path):
    settings = Settings(_env_file=None, state_dir=tmp_path)
    assert settings.resolved_backend_store_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.resolved_artifacts_destination == str(tmp_path / "mlartifacts")
    assert settings.ray_gcs_port == 6380  # Redis holds 6379 here
    assert settings.api_key_list() == []


def test_postgres_and_s3_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("S3_BUCKET", "platform")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    settings = Settings(_env_file=None, state_dir=tmp_path)
    assert settings.resolved_backend_store_uri.startswith("postgresql+psycopg://")
    assert settings.resolved_artifacts_destination == "s3://platform/mlflow"
    assert settings.s3_client_kwargs()["endpoint_url"] == "http://127.0.0.1:9000"
    assert settings.s3_environment()["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "s3cr3t-value" not in repr(settings)  # secrets never print


def test_api_keys_are_split_and_never_printed(monkeypatch):
    monkeypatch.setenv("API_KEYS", " k1 , k2,, ")
    settings = Settings(_env_file=None)
    assert settings.api_key_list() == ["k1", "k2"]
    assert "k1" not in repr(settings)


def test_tracking_uri_follows_the_mlflow_port_unless_set(monkeypatch):
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_PORT", "5099")
    assert Settings().mlflow_tracking_uri == "http://127.0.0.1:5099"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert Settings().mlflow_tracking_uri == "http://mlflow.internal:5000"
