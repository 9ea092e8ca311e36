"""Data set versions in an S3-compatible object store, over real HTTP (moto in server mode)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import REPO_ROOT, Settings
from jobs.config import load_config
from jobs.data.loading import load_splits
from jobs.data.storage import read_uri
from tests.local_http import moto_s3_server


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    values = {
        "S3_ENDPOINT_URL": s3_server,
        "S3_BUCKET": "datasets-test",
        "AWS_ACCESS_KEY_ID": "testing-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def push(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs.data", "push", str(path), "--name", "adult"],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_push_prints_a_content_addressed_uri_and_reads_back(s3_env, adult_paths):
    train, _ = adult_paths
    result = push(train, s3_env)
    assert result.returncode == 0, result.stderr
    uri = result.stdout.strip().splitlines()[-1]
    digest = hashlib.sha256(train.read_bytes()).hexdigest()
    assert uri == f"s3://datasets-test/datasets/adult/{digest}/adult.data.gz"
    blob = read_uri(uri, Settings(_env_file=None))
    assert blob.data == train.read_bytes() and blob.sha256 == digest
    # Pushing the same bytes again is idempotent: same URI.
    assert push(train, s3_env).stdout.strip().splitlines()[-1] == uri


def test_a_job_config_can_name_s3_uris(s3_env, adult_paths):
    train, test = adult_paths
    train_uri = push(train, s3_env).stdout.strip().splitlines()[-1]
    test_uri = push(test, s3_env).stdout.strip().splitlines()[-1]
    local = load_config("jobs/configs/adult.yaml")
    remote = local.with_overrides({"data.train_uri": train_uri, "data.test_uri": test_uri})
    a, b = load_splits(local), load_splits(remote, Settings(_env_file=None))
    assert len(a.train) == len(b.train) and len(a.test) == len(b.test)
    assert list(b.digests.values()) == list(a.digests.values())


def test_missing_object_is_a_clear_error(s3_env):
    with pytest.raises(FileNotFoundError, match=r"cannot read s3://datasets-test/nope\.csv"):
        read_uri("s3://datasets-test/nope.csv", Settings(_env_file=None))


def test_push_without_a_bucket_says_what_to_set(adult_paths, monkeypatch):
    monkeypatch.delenv("S3_BUCKET", raising=False)
    result = push(adult_paths[0], {"S3_BUCKET": ""})
    assert result.returncode == 1
    assert "S3_BUCKET is not set" in result.stderr
