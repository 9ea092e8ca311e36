"""Row validation against the served model's schema, with errors that name the row and the field.

A request's rows come in one of three forms: `instances` (an object per row), `columns` (a list per
feature) or an Arrow table (an Arrow IPC stream or a Parquet file). Each becomes a `FeatureBatch`: a
column per feature, ready for the model (numbers as float64 with NaN for null, categories as their
codes). The common case, every value valid, is checked a column at a time in C-level passes (the set
of the value types in a column, one numpy conversion, a dict look-up mapped over the column, Arrow
compute kernels), with no Python object per row. Anything else goes to the per-row checks
(`RowValidator.validate`) on the rows as Python values: the same bad value gets the same error,
naming the row (`["body", "instances", row, field]`) and the field, whatever form it came in.
"""

from __future__ import annotations

import json
import operator
import struct
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from jobs.schema import DataSchema, FeatureRules

if TYPE_CHECKING:
    import pyarrow as pa

MAX_REPORTED_ERRORS = 20
_NONE = type(None)
_NUMBER_TYPES = frozenset({int, float, _NONE})


def _error(row: int, field: str | None, msg: str, kind: str) -> dict[str, Any]:
    loc: list[Any] = ["body", "instances", row]
    if field is not None:
        loc.append(field)
    return {"loc": loc, "msg": msg, "type": kind}


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """A request's rows, validated, as one column per feature of the model.

    `numeric`: float64 per numeric feature, NaN where null. `codes`: int64 per categorical feature,
    the category's 1-based position in the schema and 0 for null (the codes the model's preprocessing
    gives). `numbers`: the numeric values as sent (integers stay integers), for the prediction
    record. No row objects: a batch outlives its request's parsing (the model call, the record),
    and holding the parsed rows would keep thousands of containers in the collector's way."""

    size: int
    numeric: dict[str, np.ndarray]
    codes: dict[str, np.ndarray]
    numbers: Mapping[str, Sequence[Any]]
    # Whose codes these are: a version with other categories (a canary's challenger) recodes.
    validator: RowValidator

    def __len__(self) -> int:
        return self.size


class RowValidator:
    """Precomputed per schema, so that a request costs a few C-level passes per column."""

    def __init__(self, schema: DataSchema) -> None:
        self.schema = schema
        self._feature_names = schema.feature_names  # a property that builds a new list per call
        self._names = set(self._feature_names)
        # The per-value rule batch scoring applies too: the errors of a bad value.
        self._rules = FeatureRules(schema)
        self._nullable = {f.name for f in schema.features if f.nullable}
        self._numeric_names = [f.name for f in schema.numeric]
        self._categorical_names = [f.name for f in schema.categorical]
        # The preprocessing's codes (jobs/preprocess.py): 1-based in the schema's order, 0 for null;
        # None is looked up only where a null is allowed.
        self._lookup: dict[str, dict[Any, int]] = {}
        self._values: dict[str, np.ndarray] = {}
        self._json: dict[str, np.ndarray] = {}
        self._json_copy: dict[str, np.ndarray] = {}
        for f in schema.categorical:
            lookup: dict[Any, int] = {c: i + 1 for i, c in enumerate(f.categories)}
            if f.nullable:
                lookup[None] = 0
            self._lookup[f.name] = lookup
            values = np.empty(len(f.categories) + 1, dtype=object)
            values[:] = [None, *f.categories]
            self._values[f.name] = values
            encoded = np.empty(len(f.categories) + 1, dtype=object)
            encoded[:] = [orjson.dumps(value) for value in values]
            self._json[f.name] = encoded
            escaped = np.empty(len(encoded), dtype=object)
            escaped[:] = [_copy_escaped(e) for e in encoded]
            self._json_copy[f.name] = escaped
        self._keys = [(b"{" if j == 0 else b",") + orjson.dumps(n) + b":" for j, n in enumerate(self._feature_names)]
        self._keys_copy = [_copy_escaped(key) for key in self._keys]
        self._getter = operator.itemgetter(*self._feature_names)
        self._alike: weakref.WeakKeyDictionary[RowValidator, bool] = weakref.WeakKeyDictionary()
        # A category echoed in an error is cut to 64 characters; a longer one only needs to stay
        # longer than every category to stay unknown (Arrow values are cut to this before they
        # become Python strings, so that a dictionary-encoded column cannot expand).
        self.longest_value = max((len(c) for f in schema.categorical for c in f.categories), default=0) + 65

    @property
    def feature_names(self) -> list[str]:
        return self._feature_names

    # Per-row checks: the errors ------------------------------------------------------------------

    def validate(self, rows: list[Any]) -> list[dict[str, Any]]:
        if self.from_rows(rows) is not None:
            return []
        return self.errors(rows)

    def errors(self, rows: list[Any]) -> list[dict[str, Any]]:
        """Every problem of `rows` (at most MAX_REPORTED_ERRORS), each naming the row and the field."""
        errors: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            errors.extend(self._validate_row(i, row))
            if len(errors) >= MAX_REPORTED_ERRORS:
                return errors[:MAX_REPORTED_ERRORS]
        return errors

    def _validate_row(self, i: int, row: Any) -> list[dict[str, Any]]:
        if not isinstance(row, dict):
            return [_error(i, None, "each instance must be an object of feature values", "type_error")]
        errors = [
            _error(i, str(name), "unknown field; the model has no such feature", "extra_forbidden")
            for name in row.keys() - self._names
        ]
        for name in self._feature_names:
            if name not in row:
                # Even nullable features must be sent (as null): a silently missing key is
                # usually a typo, and the model would quietly predict without it.
                errors.append(
                    _error(
                        i,
                        name,
                        "field required (send null if unknown)" if name in self._nullable else "field required",
                        "missing",
                    )
                )
                continue
            message = self._rules.check_value(name, row[name])
            if message:
                errors.append(_error(i, name, message[1], message[0]))
        return errors

    # Column checks: the batch ---------------------------------------------------------------------

    def from_rows(self, rows: list[Any]) -> FeatureBatch | None:
        """The batch of `rows` (objects of feature values) if every value is valid, else None."""
        columns = self._transposed(rows)
        if columns is None:
            return None
        return self.from_sequences(dict(zip(self._feature_names, columns, strict=True)), len(rows))

    def _transposed(self, rows: list[Any]) -> list[Sequence[Any]] | None:
        """The rows' values per feature, in the schema's order, if every row is a dict holding
        exactly the features (then a row of the right length with every name has no other key)."""
        if not rows or set(map(type, rows)) != {dict} or set(map(len, rows)) != {len(self._feature_names)}:
            return None
        try:
            if len(self._feature_names) == 1:  # itemgetter of one name returns the value, not a tuple
                return [list(map(self._getter, rows))]
            return list(zip(*map(self._getter, rows), strict=True))
        except KeyError:
            return None

    def from_sequences(self, columns: Mapping[str, Sequence[Any]], size: int) -> FeatureBatch | None:
        """The batch of `columns` (a sequence of Python values per feature, each `size` long, no
        other key) if every value is valid, else None."""
        if size < 1 or columns.keys() != self._names:
            return None
        numeric: dict[str, np.ndarray] = {}
        for name in self._numeric_names:
            array = self._numbers(name, columns[name])
            if array is None:
                return None
            numeric[name] = array
        codes: dict[str, np.ndarray] = {}
        for name in self._categorical_names:
            found = self._codes(name, columns[name], size)
            if found is None:
                return None
            codes[name] = found
        return FeatureBatch(size, numeric, codes, {name: columns[name] for name in self._numeric_names}, self)

    def _numbers(self, name: str, values: Sequence[Any]) -> np.ndarray | None:
        # type() rather than isinstance(): bool is an int subclass, and true/false are no numbers.
        kinds = set(map(type, values))
        if not kinds <= _NUMBER_TYPES:
            return None
        nulls = values.count(None) if _NONE in kinds else 0
        if nulls and name not in self._nullable:
            return None
        try:
            array = np.array(values, dtype=np.float64)  # None becomes NaN
        except OverflowError:  # an integer beyond float64's range
            return None
        # Only the nulls may be non-finite: a NaN or an infinity sent as such is refused.
        if nulls:
            return array if np.count_nonzero(~np.isfinite(array)) == nulls else None
        return array if np.isfinite(array).all() else None

    def _codes(self, name: str, values: Sequence[Any], size: int) -> np.ndarray | None:
        try:
            codes = np.fromiter(map(self._lookup[name].get, values, repeat(-1)), dtype=np.int64, count=size)
        except TypeError:  # an unhashable value (a list or an object)
            return None
        return codes if codes.min() >= 0 else None

    def from_table(self, table: pa.Table) -> FeatureBatch | None:
        """The batch of an Arrow table whose columns are exactly the features, if every value is
        valid (numbers in integer or floating-point columns, categories in string columns, plain
        or dictionary-encoded), else None."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if table.num_rows < 1 or len(table.column_names) != len(self._names) or set(table.column_names) != self._names:
            return None
        numeric: dict[str, np.ndarray] = {}
        numbers: dict[str, Sequence[Any]] = {}
        for name in self._numeric_names:
            column = table.column(name)
            kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
                return None
            if pa.types.is_dictionary(column.type):
                column = column.cast(kind)  # numbers: a few bytes a row, decoded
            nulls = column.null_count
            if nulls and name not in self._nullable:
                return None
            array = pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
            if np.count_nonzero(~np.isfinite(array)) != nulls:  # a NaN or an infinity that is no null
                return None
            numeric[name] = array
            numbers[name] = column.to_pylist()
        codes: dict[str, np.ndarray] = {}
        for name in self._categorical_names:
            found = self._arrow_codes(name, table.column(name))
            if found is None:
                return None
            codes[name] = found
        return FeatureBatch(table.num_rows, numeric, codes, numbers, self)

    def _arrow_codes(self, name: str, column: pa.ChunkedArray) -> np.ndarray | None:
        import pyarrow as pa
        import pyarrow.compute as pc

        categories = self._values[name][1:].tolist()
        parts: list[np.ndarray] = []
        for chunk in column.chunks:
            kind = chunk.type.value_type if pa.types.is_dictionary(chunk.type) else chunk.type
            if not _is_text(kind):
                return None
            # The dictionary's values are looked up once each: decoding them per row could expand
            # a small body into a large table.
            values = _plain_text(chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk)
            positions = pc.index_in(values, value_set=pa.array(categories, values.type))
            if pa.types.is_dictionary(chunk.type):
                positions = positions.take(chunk.indices)
            # A value that is not null and not found is an unknown category.
            if positions.null_count != chunk.null_count:
                return None
            if chunk.null_count and name not in self._nullable:
                return None
            parts.append(pc.add(positions, 1).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # Back to rows ---------------------------------------------------------------------------------

    def rows_of(self, batch: FeatureBatch) -> list[dict[str, Any]]:
        """The batch as objects of feature values (as `instances` would have sent them)."""
        columns: list[Sequence[Any]] = []
        for name in self._feature_names:
            if name in batch.numbers:
                columns.append(batch.numbers[name])
            else:
                columns.append(self._values[name][batch.codes[name]].tolist())
        names = self._feature_names
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]

    def category_json(self, name: str, copy_text: bool = False) -> np.ndarray:
        """An object array: the JSON of the category of each code of `name` (null at 0);
        `copy_text`: with backslashes doubled, for PostgreSQL's COPY."""
        return self._json_copy[name] if copy_text else self._json[name]

    def key_json(self, position: int, copy_text: bool = False) -> bytes:
        """`{"name":` for the first feature, `,"name":` for the others (as `category_json`)."""
        return self._keys_copy[position] if copy_text else self._keys[position]

    def codes_like(self, other: RowValidator) -> bool:
        """Whether `other` gives every row the codes this one does (the same features, kinds and
        categories in the same order): its batches need no recoding for this model."""
        if other is self:
            return True
        alike = self._alike.get(other)
        if alike is None:
            mine, theirs = self.schema.features, other.schema.features
            alike = [(f.name, f.kind, f.categories) for f in mine] == [(f.name, f.kind, f.categories) for f in theirs]
            self._alike[other] = alike
        return alike


def join_batches(batches: Sequence[FeatureBatch]) -> FeatureBatch:
    """One batch of the rows of `batches` (coded alike), in order, for one model call."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    numeric = {name: np.concatenate([b.numeric[name] for b in batches]) for name in first.numeric}
    codes = {name: np.concatenate([b.codes[name] for b in batches]) for name in first.codes}
    numbers = {name: [v for b in batches for v in b.numbers[name]] for name in first.numbers}
    return FeatureBatch(sum(b.size for b in batches), numeric, codes, numbers, first.validator)


def feature_pieces(batch: FeatureBatch, copy_text: bool = False) -> np.ndarray:
    """Each row's features as one JSON object, in pieces (an object array of a row per line, to
    be joined): numbers as sent, encoded a column per orjson call, categories from their codes,
    rather than an object per row. `copy_text`: backslashes doubled, for PostgreSQL's COPY."""
    validator = batch.validator
    names = validator.feature_names
    pieces = np.empty((batch.size, 2 * len(names) + 1), dtype=object)
    for j, name in enumerate(names):
        pieces[:, 2 * j] = validator.key_json(j, copy_text)
        if name in batch.numbers:
            # Numbers and null hold no comma and no backslash: the list's encoding splits into its values.
            pieces[:, 2 * j + 1] = _dumps(list(batch.numbers[name]))[1:-1].split(b",")
        else:
            pieces[:, 2 * j + 1] = validator.category_json(name, copy_text)[batch.codes[name]]
    pieces[:, -1] = b"}"
    return pieces


def _copy_escaped(json_text: bytes) -> bytes:
    """JSON in PostgreSQL's COPY text format: orjson escapes control characters, so backslashes
    are all there is to escape."""
    return json_text.replace(b"\\", b"\\\\")


def _dumps(value: Any) -> bytes:
    """JSON without spaces; integers beyond 64 bits (valid numbers, which orjson does not write) by
    the standard library."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


# Arrow bodies -----------------------------------------------------------------------------------


class UnreadableBodyError(ValueError):
    """The body is not what its content type says (an Arrow IPC stream, a Parquet file), or asks
    for more than the API decodes: a 422 naming the body."""


def _field(buf: bytes, table: int, index: int) -> int | None:
    """Where field `index` of the flatbuffer table at `table` is stored (None: absent)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    size = struct.unpack_from("<H", buf, vtable)[0]
    entry = 4 + 2 * index
    if entry + 2 > size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + entry)[0]
    return table + offset if offset else None


def _target(buf: bytes, position: int) -> int:
    return position + struct.unpack_from("<I", buf, position)[0]


# Arrow's Message.fbs: MessageHeader DictionaryBatch = 2, RecordBatch = 3; Message fields
# (version, header_type, header, ...); RecordBatch (length, nodes, buffers, compression, ...);
# DictionaryBatch (id, data, isDelta).
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3


def compressed_message(metadata: bytes) -> bool:
    """Whether an Arrow IPC message's body is compressed (LZ4 or ZSTD buffers). A compressed buffer
    declares the size it decompresses to, which a small body could set to gigabytes."""
    root = _target(metadata, 0)
    kind_at, header_at = _field(metadata, root, 1), _field(metadata, root, 2)
    if kind_at is None or header_at is None:
        return False
    kind = metadata[kind_at]
    header = _target(metadata, header_at)
    if kind == _DICTIONARY_BATCH:
        data_at = _field(metadata, header, 1)
        if data_at is None:
            return False
        header = _target(metadata, data_at)
    elif kind != _RECORD_BATCH:
        return False
    return _field(metadata, header, 3) is not None


@dataclass(frozen=True, slots=True)
class ArrowBody:
    """An Arrow or Parquet body: how many rows it holds, and its table (None when it holds more
    than the API accepts: then it is not decoded)."""

    rows: int
    table: pa.Table | None


def read_arrow_stream(body: bytes, max_rows: int) -> ArrowBody:
    """The table of an Arrow IPC stream. Compressed streams are refused: uncompressed, the table
    is no larger than the body."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    buffer = pa.py_buffer(body)
    try:
        for message in ipc.MessageReader.open_stream(buffer):
            if compressed_message(message.metadata.to_pybytes()):
                raise UnreadableBodyError(
                    "compressed Arrow IPC buffers are not accepted: send the stream uncompressed "
                    "(or a Parquet file, which may be compressed)"
                )
        table = ipc.open_stream(buffer).read_all()
        # The reader checks the layout, not every offset: a crafted one must not reach a kernel.
        table.validate(full=True)
    except (pa.ArrowException, struct.error, IndexError) as exc:
        raise UnreadableBodyError(f"not an Arrow IPC stream: {exc}") from exc
    run_end = [field.name for field in table.schema if pa.types.is_run_end_encoded(field.type)]
    if run_end:
        # One run may repeat a long value on every row: decoded, a small body would expand.
        raise UnreadableBodyError(
            f"run-end encoded columns are not accepted ({', '.join(map(repr, run_end[:5]))}): send plain or "
            "dictionary-encoded columns"
        )
    return ArrowBody(table.num_rows, table if table.num_rows <= max_rows else None)


# Parquet codecs whose output is bounded by their input (Snappy expands at most about 22 times):
# gzip, Brotli, LZ4 and ZSTD can turn a small body into gigabytes.
PARQUET_CODECS = frozenset({"UNCOMPRESSED", "SNAPPY"})


def read_parquet(body: bytes, max_rows: int, max_decoded_bytes: int) -> ArrowBody:
    """The table of a Parquet file, decoded only if its footer declares at most `max_rows` rows, a
    value per row in every column, `max_decoded_bytes` of uncompressed pages and a bounded codec;
    string columns stay dictionary-encoded as stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(pa.BufferReader(body))
        meta = file.metadata
        if meta.num_rows > max_rows:
            return ArrowBody(meta.num_rows, None)
        decoded = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            decoded += group.total_byte_size
            for c in range(group.num_columns):
                chunk = group.column(c)
                if chunk.compression not in PARQUET_CODECS:
                    raise UnreadableBodyError(
                        f"column {chunk.path_in_schema!r} is compressed with {chunk.compression}: send the "
                        "Parquet file uncompressed or with Snappy"
                    )
                if chunk.num_values > group.num_rows:
                    raise UnreadableBodyError(
                        f"column {chunk.path_in_schema!r} holds more values than rows: send a column of "
                        "single values per feature"
                    )
        if decoded > max_decoded_bytes:
            raise UnreadableBodyError(
                f"the Parquet file decodes to {decoded} bytes; at most {max_decoded_bytes} are accepted"
            )
        strings = [field.name for field in file.schema_arrow if _is_text(field.type) or pa.types.is_binary(field.type)]
        if strings:
            file = pq.ParquetFile(pa.BufferReader(body), read_dictionary=strings)
        table = file.read(use_threads=False)
        table.validate(full=True)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableBodyError(f"not a Parquet file: {exc}") from exc
    return ArrowBody(table.num_rows, table if table.num_rows <= max_rows else None)


# Stands for a value of a type no feature takes (a list, a struct, a timestamp, a decimal, bytes)
# on the per-row path: no number and no string, which is all its errors say. Such values are never
# decoded: a nested dictionary could expand, and some (a timestamp beyond Python's years) cannot be.
_OTHER: dict[str, Any] = {}


def table_rows(table: pa.Table, longest_value: int) -> list[dict[str, Any]]:
    """The table as Python rows, for the per-row checks: a string longer than `longest_value` is
    cut to it first (an error shows a value's first 64 characters, and a value longer than every
    category stays unknown) and a value of another type than numbers and text stands as `_OTHER`,
    so that a dictionary-encoded column cannot expand."""
    names = table.column_names
    columns: list[list[Any]] = []
    for column in table.columns:
        columns.append([value for chunk in column.chunks for value in _python_values(chunk, longest_value)])
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _python_values(chunk: pa.Array, longest_value: int) -> list[Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    dictionary = pa.types.is_dictionary(chunk.type)
    kind = chunk.type.value_type if dictionary else chunk.type
    python: list[Any]
    if _is_text(kind):
        values = pc.utf8_slice_codeunits(_plain_text(chunk.dictionary if dictionary else chunk), 0, longest_value)
        if dictionary:
            values = pa.DictionaryArray.from_arrays(chunk.indices, values)
        python = values.to_pylist()
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind):
        python = chunk.to_pylist()
    else:
        python = [None if null else _OTHER for null in chunk.is_null().to_pylist()]
    return python


def _plain_text(values: pa.Array) -> pa.Array:
    """Text values in a type every compute kernel takes (string views are not)."""
    import pyarrow as pa

    return values.cast(pa.large_string()) if pa.types.is_string_view(values.type) else values


def _is_text(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind))
