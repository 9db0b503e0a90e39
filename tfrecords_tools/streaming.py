"""Reading CellProfiler and single-cell tables a chunk of rows at a time, in bounded memory.

CSV goes through pandas' C parser in chunks (`read_csv(chunksize=)`): the very parser a
whole-table read uses, so every number is the same float64 (pyarrow's streaming CSV reader was
tried: its floats matched on CellProfiler's tables, but it was slower on this shared 2-core
machine, 0.50 s against 0.30 s for 74 MB, and its types are inferred from the first block). Every
column is given its type up front (numbers as float64, text as strings), so a chunk deep in the
file cannot change a column's type and a value that is not a number stops the read there. Text
columns are then given the type pandas would infer for the whole column (`csv_text_kinds`), so
that values turned into strings (treatments, groups, cell ids) are what a whole-table read gives.
Parquet is read by row groups with pyarrow (`ParquetFile.iter_batches`), in its own schema. Each
chunk comes out as a pandas DataFrame of at most `chunk_rows` rows, with the row number of its
first row.

A row that cannot be read (a letter in a number column, a row with the wrong number of fields)
is a UserInputError naming the file, the row as a spreadsheet counts it (the header is row 1)
and the column.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError

CHUNK_ROWS = 10_000  # rows per chunk: ~50 MB of float64 at 600 features
_INT = re.compile(r"^\s*[+-]?\d+\s*$")


def table_columns(path) -> list[str]:
    """The column names of a CSV or Parquet table, from its header only."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle))
    except StopIteration:
        raise UserInputError(f"{path}: is empty (no header); export it again.") from None
    except (OSError, ValueError, csv.Error) as err:
        raise UserInputError(f"{path}: cannot be read as a table ({err}).") from None


def iter_chunks(path, numeric: list[str], text: list[str] = (), chunk_rows: int = CHUNK_ROWS,
                kinds: dict | None = None, features: dict | None = None
                ) -> Iterator[tuple[int, pd.DataFrame]]:
    """(first row's 0-based data-row index, DataFrame) per chunk of `path`, with the columns
    `numeric` as float64 and `text` as strings (or as `kinds` says, see csv_text_kinds).
    `features`: {column: feature name}, for a message naming the feature a bad value is in."""
    path = Path(path)
    chunk_rows = max(1, int(chunk_rows))
    names = features or {}
    batches = _parquet_batches(path, numeric, text, chunk_rows, names) \
        if path.suffix == ".parquet" else _csv_batches(path, numeric, text, chunk_rows, names)
    for start, frame in batches:
        for lo in range(0, len(frame), chunk_rows):
            piece = frame.iloc[lo:lo + chunk_rows]
            if kinds:
                piece = apply_kinds(piece, kinds)
            yield start + lo, piece


def _csv_batches(path: Path, numeric, text, chunk_rows, features: dict):
    # Every column is read (the others as text, unconverted): with usecols pandas would let a
    # row with a field too many pass, where a whole-table read stops at it.
    dtype = {c: object for c in table_columns(path)}
    dtype.update({c: np.float64 for c in numeric})
    done = 0
    try:
        with pd.read_csv(path, dtype=dtype, chunksize=chunk_rows) as reader:
            for frame in reader:
                yield done, frame[list(numeric) + list(text)]
                done += len(frame)
    except (ValueError, pd.errors.ParserError) as err:
        raise _bad_row(path, done, set(numeric), err, features) from None
    except OSError as err:
        raise UserInputError(f"{path}: cannot be read as a table ({err}).") from None


def _bad_row(path: Path, done: int, numeric: set, err, features: dict) -> UserInputError:
    """The error naming the first row after `done` rows that pyarrow could not read."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(handle)
        header = next(rows)
        for index, row in enumerate(rows):
            if index < done:
                continue
            line = index + 2
            if len(row) != len(header):
                return UserInputError(f"{path}: row {line} has {len(row)} fields, the header "
                                      f"{len(header)}; fix or remove that row (or export the "
                                      "table again).")
            for name, value in zip(header, row):
                if name in numeric and value.strip() and not _is_number(value):
                    return _not_numeric(path, line, name, value, features.get(name))
    return UserInputError(f"{path}: cannot be read after row {done + 1} "
                          f"({str(err).splitlines()[0]}).")


def _is_number(value: str) -> bool:
    if value.strip() in ("#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                         "1.#IND", "1.#QNAN", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"):
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def _parquet_batches(path: Path, numeric, text, chunk_rows, features: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        schema = handle.schema_arrow
        # pandas turns a whole integer column with a null anywhere into float64: so must every
        # chunk, or a chunk without nulls would give "3" where the table gives "3.0".
        nullable_ints = [c for c in text if pa.types.is_integer(schema.field(c).type)
                         and _null_count(handle, c) > 0]
        done = 0
        # Number columns as float64 in Arrow, before pandas: one block, no per-column copies.
        target = pa.schema([pa.field(f.name, pa.float64())
                            if f.name in numeric and (pa.types.is_integer(f.type)
                                                      or pa.types.is_floating(f.type)
                                                      or pa.types.is_boolean(f.type))
                            else f for f in (schema.field(c) for c in list(numeric) + list(text))])
        for batch in handle.iter_batches(batch_size=chunk_rows,
                                         columns=list(numeric) + list(text)):
            frame = pa.Table.from_batches([batch]).cast(target).to_pandas()
            for c in nullable_ints:
                frame[c] = frame[c].astype(np.float64)
            for c in numeric:
                if not pd.api.types.is_numeric_dtype(frame[c]):
                    frame[c] = _numbers(frame[c], path, c, done, features.get(c))
            yield done, frame
            done += batch.num_rows
    except (pa.ArrowException, OSError) as err:
        raise UserInputError(f"{path}: cannot be read as a table ({err}).") from None


def _null_count(handle, column: str) -> int:
    meta = handle.metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if column not in names:
        return 1
    j = names.index(column)
    total = 0
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(j).statistics
        if stats is None or not stats.has_null_count:
            return 1  # unknown: assume there may be nulls
        total += stats.null_count
    return total


def _numbers(series: pd.Series, path, column: str, start: int, feature) -> pd.Series:
    values = pd.to_numeric(series, errors="coerce")
    bad = values.isna() & series.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise _not_numeric(path, start + row + 2, column, series.iloc[row], feature)
    return values.astype(np.float64)


def _not_numeric(path, line: int, column: str, value, feature) -> UserInputError:
    leave = f", or leave the feature out with --exclude '^{re.escape(feature)}$'" \
        if feature else ""
    return UserInputError(f"{path}: row {line}, column {column}"
                          f"{f' (feature {feature})' if feature else ''} holds {value!r}, which "
                          f"is not numeric; fix or remove that row, or export the table from "
                          f"CellProfiler again{leave}.")


def csv_text_kinds(path, columns: list[str], chunk_rows: int = CHUNK_ROWS) -> dict:
    """For CSV text columns, the type pandas gives the whole column: "int" (every value an
    integer, none missing), "float" (every value a number, or integers with some missing, or
    none at all) or "text"; a streaming pass over those columns only."""
    if not columns or Path(path).suffix == ".parquet":
        return {}
    missing = {c: False for c in columns}
    integer = {c: True for c in columns}
    number = {c: True for c in columns}
    for _, frame in iter_chunks(path, [], columns, chunk_rows):
        for c in columns:
            values = frame[c]
            present = values.dropna()
            missing[c] |= len(present) < len(values)
            if number[c] and len(present):
                number[c] = bool(pd.to_numeric(present, errors="coerce").notna().all())
            if integer[c] and number[c] and len(present):
                integer[c] = bool(present.str.match(_INT).all())
    return {c: "int" if number[c] and integer[c] and not missing[c]
            else "float" if number[c] else "text" for c in columns}


def apply_kinds(frame: pd.DataFrame, kinds: dict) -> pd.DataFrame:
    """Text columns given the types csv_text_kinds found (missing text as NaN, as pandas)."""
    frame = frame.copy()
    for c, kind in kinds.items():
        if c not in frame.columns:
            continue
        if kind == "int":
            frame[c] = pd.to_numeric(frame[c]).astype(np.int64)
        elif kind == "float":
            frame[c] = pd.to_numeric(frame[c]).astype(np.float64)
        else:
            values = frame[c].astype(object)
            frame[c] = values.where(values.notna(), np.nan)
    return frame
