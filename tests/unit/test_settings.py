import pytest

from core.settings import Settings, environment_variables


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Settings come from the environment: start each test from none of ours."""
    for name, _, _ in environment_variables():
        monkeypatch.delenv(name, raising=False)


def test_embedded_defaults(tmp_path):
    settings = Settings(_env_file=None, state_dir=tmp_path)
    assert settings.resolved_backend_store_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.resolved_artifacts_destination == str(tmp_path / "mlartifacts")
    assert settings.ray.gcs_port == 6380  # Redis holds 6379 here
    assert settings.api.key_list() == []


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
    assert settings.api.key_list() == ["k1", "k2"]
    assert "k1" not in repr(settings)


def test_tracking_uri_follows_the_mlflow_port_unless_set(monkeypatch):
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_PORT", "5099")
    assert Settings().mlflow.tracking_uri == "http://127.0.0.1:5099"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert Settings().mlflow.tracking_uri == "http://mlflow.internal:5000"


def test_each_group_reads_the_variables_of_its_prefix(monkeypatch):
    monkeypatch.setenv("RAY_GCS_PORT", "7001")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/x")
    monkeypatch.setenv("SERVE_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("NGINX_SERVE_UPSTREAMS", '["10.0.0.1:8000", "10.0.0.2:8000"]')
    monkeypatch.setenv("MAX_BATCH_ROWS", "50")
    # Ray's own variables share the prefix and are not ours.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    settings = Settings(_env_file=None)
    assert settings.ray.gcs_port == 7001 and settings.ray.gcs_address == "127.0.0.1:7001"
    assert settings.database.value() == "postgresql://u@db/x"
    assert settings.serve.max_batch_size == 32 and settings.max_batch_rows == 50
    assert settings.nginx.serve_upstreams == ["10.0.0.1:8000", "10.0.0.2:8000"]


def test_a_blank_secret_or_url_switches_its_feature_off(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("AMQP_URL", "  ")
    monkeypatch.setenv("ALERT_WEBHOOK_TOKEN", "")
    settings = Settings(_env_file=None)
    assert settings.database.url is None and settings.amqp.url is None and settings.alert.webhook_token is None
    assert not settings.training_jobs_enabled


def test_a_group_given_in_code_keeps_the_rest_of_its_environment(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    settings = Settings(_env_file=None, ray={"gcs_port": 7002})
    assert settings.ray.gcs_port == 7002 and settings.ray.auth_headers() == {"Authorization": "Bearer tok"}


def test_every_variable_name_is_unique_and_prefixed_by_its_group():
    names = [name for name, _, _ in environment_variables()]
    assert len(names) == len(set(names))
    for name, path, _ in environment_variables():
        assert name == path.replace(".", "_").upper()
