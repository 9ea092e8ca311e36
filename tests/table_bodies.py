"""Request bodies of the table forms, written as a client writes them: an Arrow IPC stream and a
Parquet file of a table (serve_apps/routes/inference.py reads both)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq


def arrow_stream(table: pa.Table, compression: str | None = None) -> bytes:
    """The table as an Arrow IPC stream; `compression` ("lz4", "zstd") compresses its buffers."""
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return sink.getvalue()


def parquet_file(table: pa.Table, compression: str = "snappy") -> bytes:
    """The table as a Parquet file (pyarrow's default codec, Snappy, unless told otherwise)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()
