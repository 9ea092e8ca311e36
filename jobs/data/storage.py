"""Reading and writing data set files on local disk or an S3-compatible object store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from core.settings import REPO_ROOT, Settings, get_settings

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    from mypy_boto3_s3 import S3Client  # pragma: no cover
else:
    S3Client = Any


# How long an Arrow filesystem waits to connect to the object store, and how many times it tries a
# request, before the caller sees the error.
S3_CONNECT_TIMEOUT_S = 5.0
S3_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Blob:
    uri: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_client(settings: Settings | None = None) -> S3Client:
    import boto3
    from botocore.config import Config

    settings = settings or get_settings()
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"})
    return boto3.client("s3", config=config, **settings.s3_client_kwargs())


def s3_filesystem(settings: Settings) -> pafs.S3FileSystem:
    """The object store of the project's S3 settings (S3_ENDPOINT_URL, S3_REGION, AWS_*) as an
    Arrow filesystem (Ray Data, Ray Train and Tune read and write through one), reaching it as the
    boto3 client above does."""
    import pyarrow.fs as pafs

    kwargs = settings.s3_client_kwargs()
    endpoint = kwargs.get("endpoint_url")
    scheme, override = "https", None
    if endpoint:
        parsed = urlparse(endpoint)
        scheme, override = (parsed.scheme or "https"), (parsed.netloc or endpoint)
    return pafs.S3FileSystem(
        access_key=kwargs.get("aws_access_key_id"),
        secret_key=kwargs.get("aws_secret_access_key"),
        region=kwargs["region_name"],
        endpoint_override=override,
        scheme=scheme,
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
        # A store that does not answer fails the caller within seconds instead of hanging a
        # training run's checkpoint upload (the SDK's own retries still cover a blip).
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    )


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve_local(uri: str) -> Path:
    """A relative path is tried against the working directory, then the repository root."""
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def read_uri(uri: str, settings: Settings | None = None) -> Blob:
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        try:
            body = s3_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore raises many types; the message is what a user needs
            raise FileNotFoundError(f"cannot read {uri}: {exc}") from exc
        return Blob(uri=uri, data=body)
    path = resolve_local(uri)
    if not path.is_file():
        raise FileNotFoundError(f"data set file {uri} not found (looked at {path})")
    return Blob(uri=uri, data=path.read_bytes())


def push_file(path: Path, name: str | None = None, settings: Settings | None = None) -> str:
    """Upload a data set file under its digest; returns the s3:// URI a job config names.

    Content addressing makes a pushed version immutable: the same bytes always get the same URI
    and a different version can never overwrite it.
    """
    settings = settings or get_settings()
    if not settings.s3.bucket:
        raise ValueError("S3_BUCKET is not set: configure the object store before pushing data")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    dataset = name or path.name.split(".")[0]
    key = f"datasets/{dataset}/{digest}/{path.name}"
    client = s3_client(settings)
    ensure_bucket(client, settings.s3.bucket)
    client.put_object(
        Bucket=settings.s3.bucket,
        Key=key,
        Body=data,
        ChecksumAlgorithm="SHA256",
        Metadata={"sha256": digest},
    )
    return f"s3://{settings.s3.bucket}/{key}"


def ensure_bucket(client: S3Client, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)
