"""The files of a batch inference job: where they are (local disk or S3, with the project's S3
settings), reading the input as a Ray Data stream with a row id per row, and writing the output
and its rejects to a staging folder that becomes the output only when the job commits."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from core.settings import Settings
from jobs.batch_config import BatchRefusedError, CsvOptions, InputFormat, Target, is_input_file
from jobs.data.storage import s3_filesystem

# A row's id: the file (relative to the input folder, or the input file's name) and the row's
# position among the file's data rows, from 0 (a CSV header is not a row). The key of inputs whose
# every column is a feature.
FILE_COLUMN = "input_file"
ROW_COLUMN = "input_row"
ROW_ID_COLUMNS = (FILE_COLUMN, ROW_COLUMN)
# Their names in the stream, which no input column is expected to have (an input may well have
# an `input_row`: a job's output scored again); the scorer renames them where they are keys.
STREAM_NAMES = {FILE_COLUMN: "__batch_input_file", ROW_COLUMN: "__batch_input_row"}
# Marks a committed output (local or S3): JSON with the job's figures. Readers of the Parquet
# folder skip it, as they skip every name starting with "_" or ".".
SUCCESS_MARKER = "_SUCCESS"
# Bytes of CSV text parsed at a time (whole lines): a read hands on tables of about this much text.
CSV_BLOCK_BYTES = 4 * 1024**2


def filesystem_for(target: Target, settings: Settings) -> pafs.FileSystem:
    return s3_filesystem(settings) if target.scheme == "s3" else pafs.LocalFileSystem()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def input_files(fs: pafs.FileSystem, target: Target, fmt: InputFormat) -> list[str]:
    """The files a job reads: the input itself, or the files of its format in the input folder
    (and below it), in name order."""
    info = fs.get_file_info(target.path)
    if info.type == pafs.FileType.File:
        return [target.path]
    if info.type != pafs.FileType.Directory:
        raise BatchRefusedError(f"input: {target.uri} does not exist")
    base = PurePosixPath(target.path)
    files = []
    for found in fs.get_file_info(pafs.FileSelector(target.path, recursive=True)):
        relative = PurePosixPath(found.path).relative_to(base)
        hidden = any(part.startswith(("_", ".")) for part in relative.parts)
        if found.type == pafs.FileType.File and not hidden and is_input_file(found.path, fmt):
            files.append(found.path)
    if not files:
        raise BatchRefusedError(f"input: the folder {target.uri} holds no {fmt} files")
    return sorted(files)


def file_label(path: str, input_target: Target) -> str:
    """What `input_file` says for a file: its path within the input folder, or its name."""
    if path == input_target.path:
        return PurePosixPath(path).name
    return str(PurePosixPath(path).relative_to(PurePosixPath(input_target.path)))


def csv_header(fs: pafs.FileSystem, path: str, options: CsvOptions) -> pa.Schema:
    """The columns of a CSV file, from its header line (all of them text: see `BatchInput`)."""
    from pyarrow import csv

    with fs.open_input_stream(path, compression="detect") as stream:
        reader = csv.open_csv(
            stream,
            read_options=csv.ReadOptions(block_size=64 * 1024, use_threads=False),
            parse_options=csv.ParseOptions(delimiter=options.delimiter),
        )
        names = reader.schema.names
    return pa.schema([pa.field(name, pa.string()) for name in names])


def parquet_schema(fs: pafs.FileSystem, path: str) -> pa.Schema:
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).schema_arrow


def input_schema(fs: pafs.FileSystem, path: str, fmt: InputFormat, options: CsvOptions) -> pa.Schema:
    """The first input file's columns: what the job reconciles with the model before it starts."""
    try:
        return csv_header(fs, path, options) if fmt == "csv" else parquet_schema(fs, path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BatchRefusedError(f"input: cannot read {path} as {fmt}: {exc}") from exc


@dataclass(frozen=True)
class ReadSpec:
    """What each read takes from every input file."""

    input: Target
    format: InputFormat
    columns: tuple[str, ...]  # input columns to read: the features' and the keys'
    csv: CsvOptions
    batch_rows: int  # rows per Parquet batch read
    # Parquet text columns read dictionary-encoded (the categorical features'): a few distinct
    # values over many rows, which then travel and are checked as codes, not as a string per row.
    dictionary_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """What one read task reads: some of a Parquet file's row groups, or a run of whole lines of a
    CSV file (all of it when it is compressed, which cannot be read from the middle)."""

    path: str
    first_row: int  # the `input_row` of its first row (CSV: of its first line, blank lines counted)
    size_bytes: int  # Parquet: in memory, from the footer; CSV: on disk
    rows: int | None = None  # Parquet: known from the footer
    row_groups: tuple[int, ...] = ()
    start: int = 0  # CSV: where its first line starts
    end: int | None = None  # CSV: where its last line ends; None: at the end of the file
    header: bytes = b""  # CSV: the file's header line, which every piece is parsed with


def _compressed(path: str) -> bool:
    return path.lower().endswith((".gz", ".bz2", ".zst", ".lz4", ".br"))


def parquet_pieces(fs: pafs.FileSystem, path: str, target_bytes: int) -> list[Piece]:
    """Consecutive row groups of about `target_bytes` in memory each (at least one row group)."""
    with fs.open_input_file(path) as handle:
        metadata = pq.ParquetFile(handle).metadata
    pieces: list[Piece] = []
    groups: list[int] = []
    first = rows = size = 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        groups.append(index)
        rows += group.num_rows
        size += group.total_byte_size
        if size >= target_bytes:
            pieces.append(Piece(path, first, size, rows, tuple(groups)))
            first, groups, rows, size = first + rows, [], 0, 0
    if groups or not pieces:
        pieces.append(Piece(path, first, size, rows, tuple(groups)))
    return pieces


def _header(stream: pa.NativeFile) -> tuple[bytes, bytes]:
    """The header line (with its line break) and what was read after it."""
    buffered = b""
    while b"\n" not in buffered:
        chunk = stream.read(64 * 1024)
        if not chunk:
            return buffered, b""  # a header without data rows
        buffered += chunk
    cut = buffered.index(b"\n") + 1
    return buffered[:cut], buffered[cut:]


def csv_pieces(fs: pafs.FileSystem, path: str, target_bytes: int) -> list[Piece]:
    """Runs of whole lines of about `target_bytes`, found in one pass over the file that counts
    its lines (each piece's first row number). A compressed file is one piece."""
    if _compressed(path):
        return [Piece(path, 0, int(fs.get_file_info(path).size or 0))]
    pieces: list[Piece] = []
    with fs.open_input_stream(path) as stream:
        header, buffer = _header(stream)
        buffer_start = start = len(header)  # file offsets of `buffer` and of the current piece
        line = lines_in_piece = 0
        while buffer:
            scanned = 0
            while True:
                cut_from = max(start + target_bytes - buffer_start, scanned)
                newline = buffer.find(b"\n", cut_from) if cut_from < len(buffer) else -1
                if newline < 0:
                    break
                lines_in_piece += buffer.count(b"\n", scanned, newline + 1)
                end = buffer_start + newline + 1
                pieces.append(Piece(path, line, end - start, start=start, end=end, header=header))
                line, lines_in_piece, start, scanned = line + lines_in_piece, 0, end, newline + 1
            lines_in_piece += buffer.count(b"\n", scanned)
            buffer_start += len(buffer)
            buffer = stream.read(CSV_BLOCK_BYTES)
    if buffer_start > start or not pieces:
        pieces.append(Piece(path, line, buffer_start - start, start=start, header=header))
    return pieces


def plan_pieces(fs: pafs.FileSystem, files: list[str], fmt: InputFormat, target_bytes: int) -> list[Piece]:
    """The read tasks of a job: small enough that Ray Data, which holds back a read task while the
    blocks in flight fill its share of the object store, keeps the job's memory bounded. (One task
    per file is not: a task streams its whole file out, however far ahead of the actors.)"""
    plan = parquet_pieces if fmt == "parquet" else csv_pieces
    return [piece for path in files for piece in plan(fs, path, target_bytes)]


def _line_runs(stream: pa.NativeFile, first: bytes, limit: int | None) -> Iterator[bytes]:
    """The stream's bytes (after `first`, which is already read) in runs of whole lines of about
    CSV_BLOCK_BYTES, up to `limit` bytes in all."""
    pending, left = first, limit
    while True:
        size = CSV_BLOCK_BYTES if left is None else min(CSV_BLOCK_BYTES, left)
        chunk = stream.read(size) if size > 0 else b""
        if left is not None:
            left -= len(chunk)
        if not chunk:
            if pending:
                yield pending
            return
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if cut:
            yield pending[:cut]
            pending = pending[cut:]


def _row_lines(data: bytes) -> np.ndarray:
    """The index of every non-blank line of `data` (the rows the CSV reader returns)."""
    text = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(text == 10)
    if not len(text) or text[-1] != 10:
        ends = np.append(ends, len(text))  # a last line without its line break
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    carriage = np.zeros(len(starts), dtype=bool)
    single = lengths == 1
    carriage[single] = text[starts[single]] == 13
    return np.flatnonzero((lengths > 0) & ~carriage)


class BatchInput(Datasource):
    """The input as Arrow tables with each row's id, one read task per `Piece`.

    Not `ray.data.read_csv`/`read_parquet`: their rows carry no position (the row id of inputs
    without key columns), a CSV read infers column types from its first block (one bad cell further
    down would fail the whole read; here every CSV column is text, and a bad cell rejects its row:
    jobs/validation.py), and both read a file per task, which streams out however far ahead of the
    actors it gets. A CSV value may not hold a line break (the pieces are cut at line breaks: such a
    file fails the job, never a row silently), and every CSV file needs the first file's columns.
    """

    def __init__(self, pieces: list[Piece], fs: pafs.FileSystem, spec: ReadSpec) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Ray leaves it untyped
        self._pieces = pieces
        self._fs = fs
        self._spec = spec

    def estimate_inmemory_data_size(self) -> int:
        return sum(piece.size_bytes for piece in self._pieces)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        del parallelism, data_context  # the pieces are the tasks
        tasks = []
        for piece in self._pieces:
            metadata = BlockMetadata(
                num_rows=piece.rows, size_bytes=piece.size_bytes, exec_stats=None, input_files=(piece.path,)
            )
            tasks.append(ReadTask(self._reader(piece), metadata, per_task_row_limit=per_task_row_limit))
        return tasks

    def _reader(self, piece: Piece) -> Any:
        fs, spec = self._fs, self._spec

        def read() -> Iterator[pa.Table]:
            read_piece = _read_parquet if spec.format == "parquet" else _read_csv
            label = file_label(piece.path, spec.input)
            for table, rows in read_piece(fs, piece, spec):
                # Every row has its id, key or not: the scorer names its rejects files after it. The
                # file as a one-value dictionary: a code per row rather than its name.
                files = pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(table.num_rows, dtype=np.int32)), pa.array([label], type=pa.string())
                )
                table = table.append_column(STREAM_NAMES[FILE_COLUMN], files)
                yield table.append_column(STREAM_NAMES[ROW_COLUMN], pa.array(rows, type=pa.int64()))

        return read


def _read_parquet(fs: pafs.FileSystem, piece: Piece, spec: ReadSpec) -> Iterator[tuple[pa.Table, np.ndarray]]:
    try:
        with fs.open_input_file(piece.path) as handle:
            parquet = pq.ParquetFile(handle, read_dictionary=list(spec.dictionary_columns) or None)
            missing = [name for name in spec.columns if name not in parquet.schema_arrow.names]
            if missing:
                raise BatchRefusedError(f"input: {piece.path} has no column {missing[0]!r} (the first file has)")
            start = piece.first_row
            batches = parquet.iter_batches(
                batch_size=spec.batch_rows, row_groups=list(piece.row_groups), columns=list(spec.columns)
            )
            for batch in batches:
                yield pa.Table.from_batches([batch]), np.arange(start, start + batch.num_rows)
                start += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise BatchRefusedError(f"input: cannot read {piece.path} as Parquet: {exc}") from exc


def _read_csv(fs: pafs.FileSystem, piece: Piece, spec: ReadSpec) -> Iterator[tuple[pa.Table, np.ndarray]]:
    if piece.end is None and piece.start == 0:  # a compressed file: from its start
        with fs.open_input_stream(piece.path, compression="detect") as stream:
            header, first = _header(stream)
            yield from _csv_runs(piece, spec, header, _line_runs(stream, first, None))
        return
    with fs.open_input_file(piece.path) as handle:
        handle.seek(piece.start)
        limit = None if piece.end is None else piece.end - piece.start
        yield from _csv_runs(piece, spec, piece.header, _line_runs(handle, b"", limit))


def _csv_runs(
    piece: Piece, spec: ReadSpec, header: bytes, runs: Iterator[bytes]
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    from pyarrow import csv

    options = {
        "read_options": csv.ReadOptions(use_threads=False),
        "parse_options": csv.ParseOptions(delimiter=spec.csv.delimiter),
        "convert_options": csv.ConvertOptions(
            include_columns=list(spec.columns),
            include_missing_columns=False,
            column_types={name: pa.string() for name in spec.columns},
            strings_can_be_null=True,
            null_values=["", *spec.csv.null_values],
        ),
    }
    line = piece.first_row
    for data in runs:
        try:
            table = csv.read_csv(pa.BufferReader(header + data), **options)
        except (pa.ArrowInvalid, KeyError) as exc:
            raise BatchRefusedError(
                f"input: cannot read {piece.path} as CSV with the first file's columns: {exc}"
            ) from exc
        rows = _row_lines(data)
        if len(rows) != table.num_rows:
            raise BatchRefusedError(
                f"input: {piece.path} has a quoted value with a line break near line {line + 1} of its data; "
                "batch jobs read CSV files in pieces cut at line breaks: write such data as Parquet"
            )
        yield table, line + rows
        line += data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


@dataclass(frozen=True)
class Staging:
    """Where a job writes before it commits: a hidden folder next to the output holding `output/`
    and `rejects/`. Committing moves them to their final places (a rename on local disk: atomic;
    a copy on S3, with SUCCESS_MARKER written last); until then nothing is at the final URIs."""

    output: Target
    rejects: Target
    token: str

    @classmethod
    def next_to(cls, output: Target, rejects: Target) -> Staging:
        return cls(output, rejects, secrets.token_hex(8))

    @property
    def root(self) -> str:
        parent, _, name = self.output.path.rstrip("/").rpartition("/")
        return f"{parent}/.{name}.{self.token}.partial"

    @property
    def staged_output(self) -> str:
        return f"{self.root}/output"

    @property
    def staged_rejects(self) -> str:
        return f"{self.root}/rejects"

    def refuse_existing(self, fs: pafs.FileSystem, overwrite: bool) -> None:
        if overwrite:
            return
        for target, what in ((self.output, "output"), (self.rejects, "rejects")):
            if exists(fs, target.path):
                raise BatchRefusedError(
                    f"output: the {what} {target.uri} exists already; choose another output or set overwrite"
                )

    def prepare(self, fs: pafs.FileSystem) -> None:
        fs.create_dir(self.staged_output, recursive=True)
        fs.create_dir(self.staged_rejects, recursive=True)

    def commit(self, fs: pafs.FileSystem, manifest: dict[str, Any]) -> None:
        """Put the staged folders in place, rejects first: the output appearing means the job is done."""
        marker = json.dumps(manifest, indent=2, default=str).encode()
        if self.output.scheme == "file":
            with fs.open_output_stream(f"{self.staged_output}/{SUCCESS_MARKER}") as out:
                out.write(marker)
            for staged, target in ((self.staged_rejects, self.rejects), (self.staged_output, self.output)):
                if exists(fs, target.path):  # overwrite: the old one goes aside, then away
                    fs.move(target.path, f"{self.root}/replaced-{PurePosixPath(target.path).name}")
                fs.move(staged, target.path)
        else:
            for staged, target in ((self.staged_rejects, self.rejects), (self.staged_output, self.output)):
                if exists(fs, target.path):
                    fs.delete_dir_contents(target.path, missing_dir_ok=True)
                for found in fs.get_file_info(pafs.FileSelector(staged, recursive=True)):
                    if found.type == pafs.FileType.File:
                        fs.copy_file(found.path, target.path + found.path[len(staged) :])
            with fs.open_output_stream(f"{self.output.path}/{SUCCESS_MARKER}") as out:
                out.write(marker)
        self.discard(fs)

    def discard(self, fs: pafs.FileSystem) -> None:
        """Remove the staging folder (a failed job's partial files with it); never raises."""
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_dir(self.root)


def parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    found = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))


def count_rows(fs: pafs.FileSystem, folder: str) -> int:
    """Rows in a folder's Parquet files, from their footers."""
    total = 0
    for path in parquet_files(fs, folder):
        with fs.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def ensure_a_file(fs: pafs.FileSystem, folder: str, schema: pa.Schema, name: str) -> None:
    """An empty Parquet file with the schema where the job wrote none (no rows to write): readers
    of the folder then find the columns, and zero rows, rather than nothing."""
    if not parquet_files(fs, folder):
        pq.write_table(schema.empty_table(), f"{folder}/{name}", filesystem=fs)
