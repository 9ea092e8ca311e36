"""What a batch inference job is asked to do (the model, the input, the output) and where a job may
read and write. Light on purpose: the training-jobs API validates requests with it without loading
Ray, MLflow or torch; jobs/batch_predict.py runs the job (docs/batch-inference.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.settings import REPO_ROOT, Settings
from jobs.config import apply_overrides, read_config_file

# Not in jobs/configs itself: every file there is a training config (retraining looks them all up).
BATCH_CONFIG_DIR = REPO_ROOT / "jobs" / "configs" / "batch"
DEFAULT_CONFIG_PATH = BATCH_CONFIG_DIR / "batch-predict.yaml"
InputFormat = Literal["csv", "parquet"]
# A model reference: NAME (its champion), NAME@alias or NAME/version.
# The name is a registered model's (jobs.config.MODEL_NAME_PATTERN), the alias one MLflow accepts.
_MODEL_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<alias>[A-Za-z0-9_-]{1,255})|/(?P<version>[1-9][0-9]{0,9}))?$"
)
# Larger model calls only cost memory: a batch's rows are held several times over in an actor.
MAX_BATCH_SIZE = 1_048_576
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".br")
_FORMAT_SUFFIXES: dict[InputFormat, tuple[str, ...]] = {"csv": (".csv",), "parquet": (".parquet", ".pq")}


class BatchRefusedError(ValueError):
    """The job cannot run as asked (an unknown model, an input it cannot read or reconcile with the
    model, an output that exists): running it again would fail the same way. `details` holds what
    the job had learnt by then (the model version, the MLflow run) for its result line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.details: dict[str, str] = {}


@dataclass(frozen=True)
class ModelRef:
    """Which registered version a job scores with; exactly one of alias and version is set."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str, default_alias: str = "champion") -> ModelRef:
        """`NAME` (its `default_alias`), `NAME@alias` or `NAME/version`."""
        match = _MODEL_REF.match(text)
        if match is None:
            raise ValueError(
                f"{text[:200]!r} is not a model reference: NAME, NAME@alias or NAME/version "
                "(a registered model's name, letters, digits, '.', '_' and '-')"
            )
        if match["version"] is not None:
            return cls(match["name"], version=match["version"])
        return cls(match["name"], alias=match["alias"] or default_alias)

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CsvOptions(_Strict):
    # Cells that stand for a missing value besides the empty cell, e.g. ["?", "NA"]: they are
    # null to the model (refused where its feature may not be null).
    null_values: list[str] = Field(default_factory=list, max_length=100)
    delimiter: str = Field(default=",", min_length=1, max_length=1)


class BatchConfig(_Strict):
    """A batch job: jobs/configs/batch/batch-predict.yaml holds the defaults, a request or the CLI the rest."""

    model: str | None = None  # NAME, NAME@alias or NAME/version
    input: str | None = None  # a file or a folder of files: a local path or s3://bucket/key
    output: str | None = None  # the Parquet folder written, with its rejects next to it
    input_format: InputFormat | None = None  # default: from the input's name
    # Input columns copied to every output and reject row. Default: every column that is not one of
    # the model's features, or `input_file` and `input_row` when all of them are.
    keys: list[str] | None = Field(default=None, max_length=200)
    overwrite: bool = False  # replace an existing output (and its rejects) when the job commits
    batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)  # default: BATCH_BATCH_SIZE
    actors: int | None = Field(default=None, ge=1)  # default: BATCH_ACTORS
    csv: CsvOptions = Field(default_factory=CsvOptions)

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str | None) -> str | None:
        if value is not None:
            ModelRef.parse(value)
        return value

    @field_validator("input", "output")
    @classmethod
    def _uri_text(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty")
        if len(value) > 1024 or not value.isprintable():
            raise ValueError("must be printable text of at most 1024 characters")
        return value

    @field_validator("keys")
    @classmethod
    def _distinct_keys(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if any(not name or not name.isprintable() for name in value):
            raise ValueError("key columns must be non-empty printable names")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"key columns named more than once: {repeated}")
        return value

    def missing(self) -> list[str]:
        """The required fields left unset, in the order a user reads them."""
        return [name for name in ("model", "input", "output") if getattr(self, name) is None]

    def model_ref(self, default_alias: str) -> ModelRef:
        assert self.model is not None, "a complete config names its model"
        return ModelRef.parse(self.model, default_alias)

    @property
    def resolved_format(self) -> InputFormat:
        """The input's format (ValueError when neither declared nor told by its name)."""
        assert self.input is not None
        return format_of(self.input, self.input_format)

    def with_overrides(self, overrides: dict[str, Any]) -> BatchConfig:
        """Apply dotted overrides such as {"csv.null_values": ["?"]}."""
        return BatchConfig.model_validate(apply_overrides(self.model_dump(), overrides))


def load_batch_config(path: str | Path = DEFAULT_CONFIG_PATH) -> BatchConfig:
    return BatchConfig.model_validate(read_config_file(path, "batch config") or {})


def _bare_name(uri: str) -> str:
    name = uri.lower().rstrip("/")
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def format_of(uri: str, declared: InputFormat | None = None) -> InputFormat:
    """The input's format: declared, else from its name (`.csv`, `.csv.gz`, `.parquet`, `.pq`)."""
    if declared is not None:
        return declared
    bare = _bare_name(uri)
    for name, suffixes in _FORMAT_SUFFIXES.items():
        if bare.endswith(suffixes):
            return name
    raise ValueError(f"cannot tell the format of {uri[:200]!r} from its name: set input_format to csv or parquet")


def is_input_file(name: str, fmt: InputFormat) -> bool:
    """Whether a file found in an input folder is one to read: of the format, not hidden, not a
    marker (`_SUCCESS`) or a job's temporary folder."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(("_", ".")) and _bare_name(base).endswith(_FORMAT_SUFFIXES[fmt])


@dataclass(frozen=True)
class Target:
    """A location a job reads or writes: `path` is what a pyarrow file system of `scheme` opens (an
    absolute local path, or bucket/key)."""

    scheme: Literal["file", "s3"]
    path: str

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    def contains(self, other: Target) -> bool:
        """Whether `other` is this location or inside it."""
        return self.scheme == other.scheme and (
            other.path == self.path or other.path.startswith(self.path.rstrip("/") + "/")
        )


def rejects_target(output: Target) -> Target:
    """Where the rejects of `output` go: `scores.parquet` -> `scores.rejects.parquet`, else `<output>.rejects`."""
    path = output.path.rstrip("/")
    if path.lower().endswith(".parquet"):
        return Target(output.scheme, path[: -len(".parquet")] + ".rejects.parquet")
    return Target(output.scheme, path + ".rejects")


@dataclass(frozen=True)
class Locations:
    """Where batch jobs may read and write: files under `data_dir`, objects in `buckets`."""

    data_dir: Path
    buckets: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Locations:
        return cls(data_dir=settings.batch_data_dir, buckets=tuple(settings.batch_buckets))

    def describe(self) -> str:
        local = f"files under the batch data folder {self.data_dir} (BATCH_DATA_DIR)"
        if not self.buckets:
            return local
        return f"{local} or objects in s3://{', s3://'.join(self.buckets)} (BATCH_BUCKETS)"

    def resolve(self, uri: str) -> Target:
        """The location `uri` names; ValueError saying why it may not be used."""
        if "%" in uri:
            # Readers take `%2e%2e` literally or decode it, depending on the file system: refused,
            # there is no doubt about what is read.
            raise ValueError("contains percent-encoding")
        if uri.startswith("s3://"):
            return self._s3(uri)
        text = uri.removeprefix("file://")
        scheme = _SCHEME.match(text)
        if scheme:
            raise ValueError(f"uses the {scheme['scheme']!r} scheme; only local paths and s3:// URIs are read")
        return self._local(text)

    def _local(self, text: str) -> Target:
        path = PurePosixPath(text)
        if ".." in path.parts:
            raise ValueError("contains '..'")
        root = self.data_dir
        full = root / path  # an absolute path replaces the root
        if not full.is_relative_to(root) or full == root:
            raise ValueError(f"is not inside the batch data folder {root}")
        try:
            inside = full.resolve().is_relative_to(root.resolve())
        except (OSError, RuntimeError):  # a symlink loop, an unreadable folder
            raise ValueError("cannot be resolved") from None
        if not inside:
            raise ValueError(f"leads out of the batch data folder {root} through a symlink")
        return Target("file", str(full.resolve()))

    def _s3(self, uri: str) -> Target:
        if not self.buckets:
            raise ValueError(
                "names the object store, which batch jobs may not use while BATCH_BUCKETS and S3_BUCKET are unset"
            )
        parsed = urlparse(uri)
        if parsed.query or parsed.fragment or parsed.params:
            raise ValueError("carries a query or a fragment")
        bucket, key = parsed.netloc, parsed.path.lstrip("/").rstrip("/")
        if not bucket or not key:
            raise ValueError("is not an s3://bucket/key URI")
        if bucket not in self.buckets:
            raise ValueError(f"names the bucket {bucket!r}; batch jobs may use only {', '.join(self.buckets)}")
        if any(segment in {"", ".", ".."} for segment in key.split("/")):
            # Some S3-compatible servers normalise such keys: the key used could be another.
            raise ValueError("has an empty, '.' or '..' path segment")
        return Target("s3", f"{bucket}/{key}")


class LocationError(ValueError):
    """A config's input or output may not be used; `field` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Plan:
    """A complete job's locations, checked: what it reads (in which format), and the two folders it writes."""

    input: Target
    format: InputFormat
    output: Target
    rejects: Target


def plan(config: BatchConfig, locations: Locations) -> Plan:
    """The locations of a complete config; LocationError naming the field at fault."""
    missing = config.missing()
    if missing:
        raise LocationError(missing[0], "required: a batch job needs a model, an input and an output")
    assert config.input is not None and config.output is not None
    targets: dict[str, Target] = {}
    for field in ("input", "output"):
        uri = getattr(config, field)
        try:
            targets[field] = locations.resolve(uri)
        except ValueError as exc:
            raise LocationError(field, f"{uri[:200]!r} {exc}; batch jobs use only {locations.describe()}") from None
    try:
        fmt = config.resolved_format
    except ValueError as exc:
        raise LocationError("input", str(exc)) from None
    source, output = targets["input"], targets["output"]
    rejects = rejects_target(output)
    for written in (output, rejects):
        if written.contains(source) or source.contains(written):
            raise LocationError("output", f"{written.uri[:200]!r} overlaps the input {source.uri[:200]!r}")
    return Plan(input=source, format=fmt, output=output, rejects=rejects)
