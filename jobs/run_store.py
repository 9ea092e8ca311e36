"""Where Ray Train and Tune keep a run's checkpoints and results (the run store): RAY_STORAGE_PATH,
else the object store's bucket when S3_BUCKET is set (`s3://<bucket>/ray-results`), else the state
directory. On S3 they go through an Arrow filesystem built from the project's S3 settings, so a
custom endpoint (MinIO, any S3-compatible server) and its keys reach every Train worker and the
controller, not only this process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.settings import Settings
from jobs.data.storage import s3_filesystem, split_s3_uri

if TYPE_CHECKING:
    import pyarrow.fs as pafs


class RunStoreUnreachableError(RuntimeError):
    """The run store cannot be read or written: training cannot checkpoint, so it must not go on."""


@dataclass(frozen=True)
class RunStore:
    uri: str  # as users name it (s3://bucket/prefix, or a local path)
    path: str  # as Ray is handed it: without the scheme when `filesystem` is given
    filesystem: pafs.FileSystem | None

    @property
    def remote(self) -> bool:
        return self.filesystem is not None

    def run_config_kwargs(self) -> dict[str, Any]:
        """`storage_path` and `storage_filesystem` for a Train or Tune `RunConfig`."""
        return {"storage_path": self.path, "storage_filesystem": self.filesystem}


def run_store(settings: Settings) -> RunStore:
    uri = settings.resolved_storage_path
    if not uri.startswith("s3://"):
        return RunStore(uri=uri, path=uri, filesystem=None)
    bucket, key = split_s3_uri(uri.rstrip("/") + "/_")
    prefix = key.rsplit("/", 1)[0] if "/" in key else ""
    return RunStore(uri=uri, path=f"{bucket}/{prefix}".rstrip("/"), filesystem=s3_filesystem(settings))


def unreachable_reason(store: RunStore) -> str | None:
    """Why the run store cannot be used, or None when its bucket answers. Only a remote store is
    probed: a local one is created by Ray where it is missing."""
    if store.filesystem is None:
        return None
    import pyarrow.fs as pafs

    bucket = store.path.split("/", 1)[0]
    try:
        info = store.filesystem.get_file_info(bucket)
    except OSError as exc:
        detail = str(exc).strip() or repr(exc)
        return f"{type(exc).__name__}: {detail.splitlines()[0]}"
    if info.type == pafs.FileType.NotFound:
        return f"bucket {bucket!r} does not exist"
    return None


def require_run_store(store: RunStore) -> None:
    """Refuse to start training against a run store that cannot take its checkpoints."""
    reason = unreachable_reason(store)
    if reason is not None:
        raise RunStoreUnreachableError(unreachable_message(store, reason))


def unreachable_message(store: RunStore, reason: str) -> str:
    return (
        f"the run store {store.uri} is not reachable ({reason}); training cannot keep its checkpoints there, "
        "so the job stops and registers nothing: check S3_ENDPOINT_URL, S3_BUCKET and the access keys"
    )
