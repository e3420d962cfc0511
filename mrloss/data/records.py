"""Reading and writing raw sample files: JSONL, JSON (a list of objects) and Parquet.

Reading never stops at a bad line: each record carries its sample or the FormatError that explains why
there is none, so the dataset can fail fast and ``mrloss prepare`` can list every bad line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mrloss.formats import FormatError, RegionText, parse

FILE_TYPES = (".jsonl", ".json", ".parquet")
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as read with errors="surrogateescape"
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape that may decode to a lone surrogate


@dataclass
class Record:
    """One raw sample: ``sample_id`` ("file.jsonl:17" / "file.json[3]"), ``line`` (1-based JSONL line, or
    the 0-based index in a JSON / Parquet file), and either ``sample`` or ``error``."""

    sample_id: str
    line: int
    sample: dict | None = None
    error: FormatError | None = None
    source: str | None = None  # the undecoded JSONL line (iter_records(decode=False))


def parse_records(
    records: list[Record], format: str = "auto", overlap: str = "error", tokenizer=None, extra_keys="error"
):
    """(valid records, their RegionTexts, every FormatError in file order) of ``records`` (`mrloss.formats.parse`'s
    options); ``tokenizer`` renders chat (messages) samples with its chat template."""
    valid: list[Record] = []
    region_texts: list[RegionText] = []
    errors: list[FormatError] = []
    for record in records:
        try:
            if record.error is not None:
                raise record.error
            region_texts.append(
                parse(
                    record.sample,
                    format,
                    overlap=overlap,
                    extra_keys=extra_keys,
                    sample_id=record.sample_id,
                    tokenizer=tokenizer,
                )
            )
            valid.append(record)
        except FormatError as error:
            errors.append(error)
    return valid, region_texts, errors


def file_type(path) -> str:
    """The suffix of ``path`` that says how to read or write it (".jsonl", ".json" or ".parquet")."""
    suffix = Path(path).suffix.lower()
    suffix = ".jsonl" if suffix == ".ndjson" else suffix
    if suffix not in FILE_TYPES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_TYPES)}")
    return suffix


def read_records(path) -> list[Record]:
    """Every sample of one file, in order (`iter_records` as a list)."""
    return list(iter_records(path))


def iter_records(path, *, decode: bool = True) -> Iterator[Record]:
    """The samples of one file, in order, one at a time: JSONL line by line and Parquet by row batches (memory
    independent of the file's size); a .json file (one list) is read whole. ``decode=False`` leaves each JSONL
    line undecoded in ``record.source`` (`decode_record` decodes it, e.g. in a worker process).

    Parquet nulls mean "absent" (Parquet fills missing struct fields with null); in JSON a null is a value,
    and the format checks reject it. Text that is not UTF-8, or lone surrogates (``"\\ud800"``, not a
    character), make that sample a FormatError."""
    path = Path(path)
    kind = file_type(path)
    if kind == ".jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    record = Record(f"{path}:{line_number}", line_number, source=line)
                    yield decode_record(record) if decode else record
        return
    if kind == ".json":
        yield from _json_records(path)
        return
    import pyarrow.parquet

    index = 0
    for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield _checked(f"{path}[{index}]", index, drop_nulls(row))
            index += 1


def decode_record(record: Record) -> Record:
    """``record`` with its JSONL ``source`` line decoded into ``sample`` (or ``error``)."""
    if record.source is None:
        return record
    sample_id, line, source = record.sample_id, record.line, record.source
    if _UNDECODABLE.search(source):
        position = _UNDECODABLE.search(source).start()
        error = FormatError("bytes that are not UTF-8", sample_id=sample_id, position=position)
        return Record(sample_id, line, error=error)
    try:
        sample = json.loads(source)
    except json.JSONDecodeError as error:
        return Record(
            sample_id,
            line,
            error=FormatError(f"invalid JSON: {error.msg}", sample_id=sample_id, position=error.colno - 1),
        )
    return _checked(sample_id, line, sample, escaped_surrogates=_ESCAPED_SURROGATE.search(source) is not None)


def _json_records(path: Path) -> Iterator[Record]:
    source = path.read_text(encoding="utf-8", errors="surrogateescape")
    if _UNDECODABLE.search(source):
        yield Record(str(path), 0, error=FormatError("bytes that are not UTF-8", sample_id=str(path)))
        return
    try:
        samples = json.loads(source)
    except json.JSONDecodeError as error:
        yield Record(
            f"{path}:{error.lineno}",
            error.lineno,
            error=FormatError(
                f"invalid JSON: {error.msg}", sample_id=f"{path}:{error.lineno}", position=error.colno - 1
            ),
        )
        return
    if not isinstance(samples, list):
        yield Record(str(path), 0, error=FormatError("a .json file must hold a list of samples", sample_id=str(path)))
        return
    escaped = _ESCAPED_SURROGATE.search(source) is not None
    for index, sample in enumerate(samples):
        yield _checked(f"{path}[{index}]", index, sample, escaped_surrogates=escaped)


def _checked(sample_id: str, line: int, sample, *, escaped_surrogates: bool = False) -> Record:
    if not isinstance(sample, dict):
        return Record(
            sample_id,
            line,
            error=FormatError(f"a sample must be an object, got {type(sample).__name__}", sample_id=sample_id),
        )
    surrogate = _lone_surrogate(sample) if escaped_surrogates else None
    if surrogate is not None:
        field, position, character = surrogate
        return Record(
            sample_id,
            line,
            error=FormatError(
                f"lone surrogate {character!a} (half of a UTF-16 pair, not a character)",
                sample_id=sample_id,
                field=field,
                position=position,
            ),
        )
    return Record(sample_id, line, sample=sample)


def _lone_surrogate(value, field: str = ""):
    """(field path, character index, character) of the first lone surrogate in the strings of ``value``."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return None if found is None else (field or None, found.start(), found.group())
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str):
            found = _SURROGATE.search(key)
            if found is not None:
                return (f"{field}.{key}" if field else key), found.start(), found.group()
        inner = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else key
        found = _lone_surrogate(item, inner)
        if found is not None:
            return found
    return None


def drop_nulls(value):
    """A row of columnar data (Parquet, a ``datasets.Dataset``) without the keys it lacks: those columns hold
    null (None) in every row that has no such key, at any depth (struct fields too)."""
    if isinstance(value, dict):
        return {key: drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [drop_nulls(item) for item in value]
    return value


def write_samples(path, samples: list[dict], *, force: bool = False) -> Path:
    """Write ``samples`` to ``path`` (type from its suffix) atomically (`mrloss.data.outputs.OutputUnit`: a
    temporary file in the same folder, fsync, rename; permissions follow the umask). An existing file raises
    FileExistsError unless ``force``."""
    from mrloss.data.outputs import OutputUnit

    path = Path(path)
    kind = file_type(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    with OutputUnit(path.parent, [path]) as unit:
        with open(unit.path(path), "wb") as stream:
            if kind == ".parquet":
                import pyarrow
                import pyarrow.parquet

                pyarrow.parquet.write_table(pyarrow.Table.from_pylist(samples), stream)
            elif kind == ".json":
                stream.write(json.dumps(samples, ensure_ascii=False, indent=1).encode("utf-8"))
            else:
                stream.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples).encode("utf-8"))
        unit.commit()
    return path
