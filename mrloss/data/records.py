"""Reading and writing raw sample files: JSONL, JSON (a list of objects) and Parquet.

Reading never stops at a bad line: each record carries its sample or the FormatError that explains why
there is none, so the dataset can fail fast and ``mrloss prepare`` can list every bad line.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mrloss.formats import FormatError, RegionText, parse

FILE_TYPES = (".jsonl", ".json", ".parquet")


@dataclass
class Record:
    """One raw sample: ``sample_id`` ("file.jsonl:17" / "file.json[3]"), ``line`` (1-based JSONL line, or
    the 0-based index in a JSON / Parquet file), and either ``sample`` or ``error``."""

    sample_id: str
    line: int
    sample: dict | None = None
    error: FormatError | None = None


def parse_records(records: list[Record], format: str = "auto", overlap: str = "error"):
    """(valid records, their RegionTexts, every FormatError in file order) of ``records``."""
    valid: list[Record] = []
    region_texts: list[RegionText] = []
    errors: list[FormatError] = []
    for record in records:
        try:
            if record.error is not None:
                raise record.error
            region_texts.append(parse(record.sample, format, overlap=overlap, sample_id=record.sample_id))
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
    """Every sample of one file, in order. Parquet nulls mean "absent" (Parquet fills missing struct
    fields with null); in JSON a null is a value, and the format checks reject it."""
    path = Path(path)
    kind = file_type(path)
    if kind == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    records.append(_record(f"{path}:{line_number}", line_number, line))
        return records
    if kind == ".json":
        try:
            samples = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            return [
                Record(
                    f"{path}:{error.lineno}",
                    error.lineno,
                    error=FormatError(
                        f"invalid JSON: {error.msg}", sample_id=f"{path}:{error.lineno}", position=error.colno - 1
                    ),
                )
            ]
        if not isinstance(samples, list):
            return [
                Record(str(path), 0, error=FormatError("a .json file must hold a list of samples", sample_id=str(path)))
            ]
        return [_checked(f"{path}[{index}]", index, sample) for index, sample in enumerate(samples)]
    import pyarrow.parquet

    rows = pyarrow.parquet.read_table(path).to_pylist()
    return [_checked(f"{path}[{index}]", index, _drop_nulls(row)) for index, row in enumerate(rows)]


def _record(sample_id: str, line: int, source: str) -> Record:
    try:
        sample = json.loads(source)
    except json.JSONDecodeError as error:
        return Record(
            sample_id,
            line,
            error=FormatError(f"invalid JSON: {error.msg}", sample_id=sample_id, position=error.colno - 1),
        )
    return _checked(sample_id, line, sample)


def _checked(sample_id: str, line: int, sample) -> Record:
    if not isinstance(sample, dict):
        return Record(
            sample_id,
            line,
            error=FormatError(f"a sample must be an object, got {type(sample).__name__}", sample_id=sample_id),
        )
    return Record(sample_id, line, sample=sample)


def _drop_nulls(value):
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_samples(path, samples: list[dict], *, force: bool = False) -> Path:
    """Write ``samples`` to ``path`` (type from its suffix) atomically: a temporary file in the same folder,
    then ``os.replace``; its mode follows the umask, like any file ``open`` creates. An existing file raises
    FileExistsError unless ``force``."""
    path = Path(path)
    kind = file_type(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(handle, "wb") as stream:
            if kind == ".parquet":
                import pyarrow
                import pyarrow.parquet

                pyarrow.parquet.write_table(pyarrow.Table.from_pylist(samples), stream)
            elif kind == ".json":
                stream.write(json.dumps(samples, ensure_ascii=False, indent=1).encode("utf-8"))
            else:
                stream.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples).encode("utf-8"))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
