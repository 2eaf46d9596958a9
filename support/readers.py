"""Data files -> rows: each reader streams dicts of a file's layout columns, or a Skip saying why a line
is not a row. data.py turns the rows into Pairs.

- Formats: .parquet (a batch of rows at a time, only the needed columns), .jsonl and .jsonl.gz (line by
  line), .json (a JSON list, parsed whole: use jsonl for big files; jsonl content in a .json file streams).
- Memory is bounded before anything is parsed: a jsonl line or parquet row over MAX_ROW_BYTES is skipped
  ("row too large") without being held whole, and a JSON list file over MAX_JSON_LIST_BYTES is refused.
- A jsonl/json row is read by its own keys: files cat-ed together may mix layouts (plain and
  conversational rows, with or without a prompt).
- A UTF-8 byte order mark at the start of a file is accepted; a corrupt file is a UserError naming it.
- Fingerprints: which local files a source reads, with their size and mtime (train.py notices a changed
  file on resume).
- pyarrow loads when a parquet file is read, not at import.
"""
import gzip
import json
import os
import zlib
from typing import Iterator, NamedTuple

from support import hub
from support.errors import UserError
from support.fileio import open_regular, read_bounded

ASSISTANT = "\n\nAssistant:"  # hh-rlhf turn marker; prompts end with it (data.split_transcripts, the demo)
PARQUET_BATCH_ROWS = 64       # parquet rows decoded at a time, at most
MAX_PAGE_BYTES = 24 << 20     # a parquet page this large holds a row over MAX_ROW_BYTES (pages are ~1 MiB)
MAX_HEADER_VALUES = 4096      # Thrift values in one page header (a real one holds a few dozen)
MAX_BATCH_BYTES = 256 << 20   # parquet rows decoded at once: fewer than 64 when the pages are large
MAX_PYTHON_BYTES = 16 << 20   # of which made Python objects at once (a row at a time when rows are large)
MAX_ROW_BYTES = 16 << 20      # a jsonl line / parquet row's text: 3 texts of over 1M tokens each, even escaped
MAX_JSON_LIST_BYTES = 64 << 20  # a JSON list is parsed whole: ~5x its size in Python objects
# Ranked layouts (support/ranked.py), recognised by their columns: UltraFeedback, Nectar, plain ranked rows
RANKED_LAYOUTS = (("instruction", "completions"), ("prompt", "answers"), ("prompt", "responses", "scores"),
                  ("prompt", "responses", "ranks"))
SKIP_CHUNK = 1 << 20          # an over-long line is skipped this many bytes at a time
BOM = b"\xef\xbb\xbf"         # a UTF-8 byte order mark, which some editors write at the start of a file


class Skip(NamedTuple):
    """A row that does not become a Pair, and why: "empty field" (null, missing or blank), "not a string"
    (e.g. a number), "bad margin", "chosen == rejected", "no shared prompt", "empty response",
    "row too large" (over MAX_ROW_BYTES), for parquet "row group too large" (a page over MAX_PAGE_BYTES:
    the row group is skipped undecoded) and "page header too large" (a page header of more than
    MAX_HEADER_VALUES values: skipped the same way, unparsed), and for jsonl "unparsable line" (also nested too deeply for
    Python's parser) / "not an object"."""
    reason: str


def read_file(path: str) -> Iterator[dict | Skip]:
    if path.endswith(".parquet"):
        return read_parquet(path)
    return object_rows(json_values(path), path)


def row_columns(keys) -> list[str] | None:
    """The columns to read for a row's (or file's) layout; None if it has neither layout."""
    names = set(keys)
    if {"prompt", "chosen", "rejected"} <= names:
        columns = ["prompt", "chosen", "rejected"]
    elif {"chosen", "rejected"} <= names:
        columns = ["chosen", "rejected"]
    else:  # a ranked layout, or None
        return next((list(layout) for layout in RANKED_LAYOUTS if set(layout) <= names), None)
    return columns + ["margin"] if "margin" in names else columns


def layout_columns(found: list[str], path: str) -> list[str]:
    """The columns to read for the file's layout; a UserError if it has neither layout."""
    columns = row_columns(found)
    if columns is None:
        raise UserError(f"{path}: has columns {sorted(set(found))}, expected prompt, chosen, rejected "
                        f"(or chosen, rejected holding whole hh-rlhf transcripts), or a ranked layout (instruction, "
                        f"completions; prompt, answers; prompt, responses, scores or ranks); rename the columns")
    return columns


def read_parquet(path: str) -> Iterator[dict | Skip]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with open_regular(path) as f:
            # pyarrow's defaults (pre_buffer=True, decoding threads) keep what was read cached, so memory
            # grows with the file; without them it stays flat (figures in BENCHMARKS.md)
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            columns = layout_columns(pf.schema_arrow.names, path)  # read only these
            yield from parquet_rows(pf, f, columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e}); re-download or rewrite it") from None


def parquet_rows(pf, f, columns: list[str]) -> Iterator[dict | Skip]:
    """The rows of an open parquet file (pf, on the file object f), measured before they are decoded.

    Parquet decompresses a page at a time, and a page's size is only known from its header: a 9 KB file
    can hold a page that decompresses to 256 MiB. So each row group's pages are measured first (their
    headers: page_sizes); a row group with a page over MAX_PAGE_BYTES is skipped undecoded, each of its
    rows counted as "row group too large" (a row over MAX_ROW_BYTES is the only way a writer makes such
    a page). The others are decoded a few rows at a time, so that decoding holds at most about
    MAX_BATCH_BYTES, and a decoded row over MAX_ROW_BYTES of text (conversations included) is skipped."""
    import pyarrow as pa
    leaves = [j for j in range(pf.metadata.num_columns) if pf.metadata.schema.column(j).path.split(".")[0] in columns]
    for i in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(i)
        try:
            largest = [max(page_sizes(f, group.column(j)), default=0) for j in leaves]
        except HeaderTooLarge:
            yield from [Skip("page header too large")] * group.num_rows
            continue
        if max(largest, default=0) > MAX_PAGE_BYTES:
            yield from [Skip("row group too large")] * group.num_rows
            continue
        rows = max(1, min(PARQUET_BATCH_ROWS, MAX_BATCH_BYTES // max(1, sum(largest))))
        for batch in pf.iter_batches(batch_size=rows, row_groups=[i], columns=columns, use_threads=False):
            sizes = row_bytes(batch)  # measured in Arrow: a huge cell never becomes a str
            fits = sizes <= MAX_ROW_BYTES
            yield from [Skip("row too large")] * int((~fits).sum())
            batch = batch.filter(pa.array(fits)) if not fits.all() else batch
            # as Python objects, MAX_PYTHON_BYTES of text at a time (one row of 15 MiB: one row), so that the
            # reader, which cuts each row as it comes (data.cut_texts), never holds a batch's worth of str too
            step = max(1, MAX_PYTHON_BYTES // max(1, int(sizes[fits].max(initial=0))))
            for start in range(0, batch.num_rows, step):
                part = batch.slice(start, step)
                yield from (dict(zip(columns, row)) for row in zip(*(part.column(c).to_pylist() for c in columns)))


class HeaderTooLarge(ValueError):
    """A page header holds more than MAX_HEADER_VALUES Thrift values: not a real one, and not worth the work."""


def page_sizes(f, chunk) -> Iterator[int]:
    """The decompressed size of each page of a column chunk, read from the page headers (Thrift compact
    protocol) without reading the pages. Each header's work is bounded: at most MAX_HEADER_VALUES values
    are visited (HeaderTooLarge beyond), a long string is seeked over."""
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset:
        start = min(start, chunk.dictionary_page_offset)
    pos, end = start, start + chunk.total_compressed_size
    while pos < end:
        f.seek(pos)
        fields = thrift_struct(f, {2, 3}, [MAX_HEADER_VALUES])  # 2: uncompressed_page_size, 3: compressed_page_size
        if fields.get(3, -1) < 0 or fields.get(2, -1) < 0:
            raise ValueError(f"a page header at byte {pos} is corrupt")
        yield fields[2]
        pos = f.tell() + fields[3]


def thrift_struct(f, wanted: set, budget: list[int], depth: int = 0) -> dict:
    """Read one Thrift compact-protocol struct from f: {field id: value} of the wanted integer fields, the
    rest skipped (a long string is seeked over, never read). budget[0]: the values that may still be
    visited (shared by the whole header); a list or map declaring more is HeaderTooLarge before a loop."""
    if depth > 16:
        raise ValueError("a page header is nested too deeply")
    found, field_id = {}, 0
    while (byte := read_byte(f)) != 0:
        spend(budget, 1)
        kind, delta = byte & 0x0F, byte >> 4
        field_id = field_id + delta if delta else unzigzag(varint(f))
        if kind in (4, 5, 6) and field_id in wanted and depth == 0:
            found[field_id] = unzigzag(varint(f))
        else:
            skip_value(f, kind, budget, depth)
    return found


def spend(budget: list[int], values: int):
    budget[0] -= values
    if budget[0] < 0:
        raise HeaderTooLarge(f"a page header holds over {MAX_HEADER_VALUES} values")


def skip_value(f, kind: int, budget: list[int], depth: int):
    if kind in (1, 2):          # bool: the value is in the type
        return
    if kind == 3:               # byte
        f.seek(1, 1)
    elif kind in (4, 5, 6):     # i16, i32, i64: varints
        varint(f)
    elif kind == 7:             # double
        f.seek(8, 1)
    elif kind == 8:             # binary
        f.seek(varint(f), 1)
    elif kind in (9, 10):       # list, set
        header = read_byte(f)
        size = header >> 4 if header >> 4 != 15 else varint(f)
        spend(budget, size)     # before the loop: a list of 2**62 booleans is refused, not walked
        if header & 0x0F in (1, 2):
            f.seek(size, 1)     # a bool element is one byte
        else:
            for _ in range(size):
                skip_value(f, header & 0x0F, budget, depth + 1)
    elif kind == 11:            # map
        size = varint(f)
        spend(budget, 2 * size)
        types = read_byte(f) if size else 0
        for _ in range(size):
            skip_value(f, types >> 4, budget, depth + 1)
            skip_value(f, types & 0x0F, budget, depth + 1)
    elif kind == 12:            # struct
        thrift_struct(f, set(), budget, depth + 1)
    else:
        raise ValueError(f"a page header holds an unknown Thrift type {kind}")


def read_byte(f) -> int:
    byte = f.read(1)
    if not byte:
        raise ValueError("a page header is cut short")
    return byte[0]


def varint(f) -> int:
    value = shift = 0
    while True:
        byte = read_byte(f)
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a page header holds an over-long number")


def unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def row_bytes(batch) -> "np.ndarray":
    """The bytes of text in each row of a pyarrow RecordBatch: strings, also inside lists and structs (a
    conversation's messages); nulls count 0."""
    import numpy as np
    return sum((text_bytes(column) for column in batch.columns), np.zeros(batch.num_rows, dtype=np.int64))


def text_bytes(column) -> "np.ndarray":
    """Bytes of text per element of a pyarrow array, nested lists and structs included."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    t, n = column.type, len(column)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = text_bytes(pc.list_flatten(column))
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=inner, minlength=n).astype(np.int64)
    if pa.types.is_dictionary(t):  # e.g. a pandas categorical column: each row's value, looked up
        indices = pc.fill_null(column.indices, 0).to_numpy(zero_copy_only=False)
        sizes = text_bytes(column.dictionary)[indices] if len(column.dictionary) else np.zeros(n, dtype=np.int64)
        return np.where(column.is_null().to_numpy(zero_copy_only=False), 0, sizes)
    if pa.types.is_struct(t):
        fields = column.flatten() if isinstance(column, pa.Array) else pa.chunked_array(column).flatten()
        return sum((text_bytes(field) for field in fields), np.zeros(n, dtype=np.int64))
    return np.zeros(n, dtype=np.int64)


def json_values(path: str) -> Iterator:
    """The JSON values of a file, each a row or a Skip: a .json list is parsed whole (bounded by its size);
    jsonl(.gz) content, also in a .json file, streams line by line (json_lines)."""
    if path.endswith(".json"):
        with open_regular(path) as f:
            is_list, size = f.read(4096).removeprefix(BOM).lstrip().startswith(b"["), os.fstat(f.fileno()).st_size
        if is_list:
            yield from json_list(path, size)
            return
    try:
        with open_regular(path) as raw, (gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw) as f:
            yield from json_lines(f)
    except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
        raise UserError(f"{path}: can't read it to the end ({e}); the file is corrupt or truncated, "
                        f"re-download it") from None


def json_list(path: str, size: int) -> list:
    if size > MAX_JSON_LIST_BYTES:
        raise UserError(f"{path}: a JSON list is parsed whole and this one is {size / 2**20:.0f} MiB (the limit is "
                        f"{MAX_JSON_LIST_BYTES >> 20} MiB); write one object per line (.jsonl), which streams: "
                        f"jq -c '.[]' {path} > {path.removesuffix('.json')}.jsonl") from None
    try:  # a JSON list can only be parsed whole; bytes in: a UTF-8 BOM is accepted
        return json.loads(read_bounded(path, MAX_JSON_LIST_BYTES))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: invalid JSON ({e}); fix it or write one object per line (.jsonl)") from None


def bounded_lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file, or None for a line over `limit` bytes: only its first limit + 1 bytes
    are read at once, the rest is skipped SKIP_CHUNK bytes at a time, so memory stays bounded."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while (rest := f.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield None


def json_lines(f) -> Iterator:
    """The JSON value of each non-blank line (at most MAX_ROW_BYTES), or the Skip saying why not."""
    for line in bounded_lines(f, MAX_ROW_BYTES):
        if line is None:
            yield Skip("row too large")
        elif line.strip():
            try:
                yield json.loads(line)  # bytes in: bad UTF-8 is a ValueError too, a BOM is accepted
            except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
                yield Skip("unparsable line")


def object_rows(objects, path: str) -> Iterator[dict | Skip]:
    """Parsed JSON values -> rows of the needed columns, each read by its own keys (files cat-ed together
    mix layouts). The first object decides whether the file has a layout at all (a UserError if not); a
    later object without one keeps the first's columns, its missing fields counted as empty."""
    first = None
    for obj in objects:
        if isinstance(obj, Skip):
            yield obj
        elif not isinstance(obj, dict):
            yield Skip("not an object")
        else:
            columns = row_columns(obj) or first or layout_columns(list(obj), path)
            first = first or columns
            yield {c: obj.get(c) for c in columns}


# -----------------------------------------------------------------------------
# What a source reads, to notice a changed file on resume

def source_files(source: str, split: str) -> set[str]:
    """What a source reads for `split`, comparable across sources without reading or downloading: local
    files by their real path, a Hub dataset or the demo by name and split."""
    if source not in ("demo", "demo_ranked") and hub.is_local_source(source):
        return {os.path.realpath(p) for p in hub.local_files(source, split)}
    return {f"{source} ({split})"}


def file_fingerprints(sources: list[str], split: str) -> dict[str, list[int]]:
    """{real path: [size in bytes, mtime in ns]} of the local files of `sources`."""
    files = set().union(*(source_files(s, split) for s in sources))
    return {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(files) if os.path.isfile(f)}
