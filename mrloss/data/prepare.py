"""`mrloss prepare`: validate raw files, convert between formats, split train / validation, summarize.

    mrloss prepare data.jsonl                                  validate + summary (exit 1 on bad samples)
    mrloss prepare data.jsonl --output-dir out --to tag_based --val-fraction 0.1 --seed 0
    mrloss prepare data.jsonl --output-dir out --tokenizer DIR also writes out/train.tokenized/ (Arrow)
    mrloss prepare --example DIR                               write the example data set (3 formats)

The inputs are streamed: read, validated, tokenized (in ``--num-proc`` processes), converted and written
chunk by chunk, so memory does not grow with the data (a .json list file is the exception: it is read whole).
Every bad sample is listed with its file and line (``file.jsonl:17``) or index (``file.json[3]``), field and
character. Nothing is written while bad samples remain, unless ``--drop-invalid``. A sample goes to
validation when a hash of its index (its place among the inputs' samples) and ``--seed`` falls below
``--val-fraction``: reproducible, and independent of the other samples. The outputs (train, validation,
their tokenized directories) are written as one unit (`mrloss.data.outputs.OutputUnit`), never overwrite
without ``--force``, and with ``--force`` replace the earlier outputs of prepare in the directory (a stale
validation file included; what they were is recorded in ``.mrloss-prepare.json``), never a file prepare did not
write, nor an input. One prepare writes into a directory at a time (a lock, ``.mrloss-prepare.lock``, while it
runs: a second one is refused). Ctrl-C or SIGTERM stop it with nothing changed. Exit codes: 0 ok, 1 bad samples
or a failed write (e.g. a full disk), 2 usage error (bad option, existing output without --force, unreadable
input, unwritable output directory), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from mrloss.data.encode import TRUNCATION_MODES, encode_batch
from mrloss.data.outputs import OutputUnit, recorded_outputs
from mrloss.data.records import FILE_TYPES, Record, decode_record, file_type, iter_records
from mrloss.data.stream import default_num_proc, ordered_map
from mrloss.data.summary import PrepareSummary
from mrloss.data.tokenizer import add_vocab_size_argument
from mrloss.formats import FORMATS, INPUT_FORMATS, FormatError, add_extra_keys_argument, convert, parse
from mrloss.formats.terminal import escape_control

SPLITS = ("train", "validation")
CHUNK_SIZE = 256  # samples per unit of work: what one process holds at a time, times 2 * --num-proc in flight


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrloss prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", type=Path, help="raw files (.jsonl, .json, .parquet)")
    parser.add_argument("--example", type=Path, metavar="DIR", help="write the example data set to DIR and stop")
    parser.add_argument("--format", default="auto", choices=("auto",) + INPUT_FORMATS, help="format of the inputs")
    parser.add_argument(
        "--overlap",
        default="error",
        choices=("error", "max"),
        help="overlapping position_based regions: an error, or the highest weight wins",
    )
    add_extra_keys_argument(parser, default="error")
    parser.add_argument("--to", choices=FORMATS, help="convert every sample to this format in the outputs")
    parser.add_argument("--output-dir", type=Path, help="write train.<type> (and validation.<type>) here")
    parser.add_argument("--file-type", default="jsonl", choices=[t.lstrip(".") for t in FILE_TYPES])
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of samples for validation (0..1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train / validation shuffle")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--drop-invalid", action="store_true", help="write the valid samples despite bad ones")
    parser.add_argument(
        "--tokenizer",
        help="local Hugging Face tokenizer directory (default: a byte-level BPE tokenizer trained on the data)",
    )
    add_vocab_size_argument(parser, trained_on="the inputs")
    parser.add_argument("--max-length", type=int, help="token limit per sample (for the truncation report)")
    parser.add_argument(
        "--truncation",
        default="right",
        choices=TRUNCATION_MODES,
        help="'error' makes a sample longer than --max-length a bad sample",
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        default=default_num_proc(),
        help="processes that parse and tokenize (default: the CPUs, at most 8)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    previous = signal.signal(signal.SIGTERM, _terminated) if _in_main_thread() else None
    try:
        return _run(args)
    except _UsageError as error:
        print(f"mrloss prepare: {escape_control(str(error))}", file=sys.stderr)
        return 2
    except _Failure as error:
        print(f"mrloss prepare: {escape_control(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mrloss prepare: interrupted; nothing was written or changed", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    """SIGTERM (``kill``) ends the run like Ctrl-C: the scratch outputs are removed, earlier outputs kept."""
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _UsageError(Exception):
    """A bad command line or environment found before any work (exit 2)."""


class _Failure(Exception):
    """The work failed: a failed write, or data that cannot be written as asked (exit 1; nothing written)."""


def _run(args) -> int:
    if args.example is not None:
        if args.inputs:
            raise _UsageError("--example takes no input files")
        from mrloss.data.examples import write_examples

        try:
            paths = write_examples(args.example, force=args.force)
        except FileExistsError as error:
            raise _UsageError(str(error)) from None
        for name, path in paths.items():
            print(f"wrote {path} ({name})")
        return 0
    if not args.inputs:
        raise _UsageError("give input files, or --example DIR")
    if not 0.0 <= args.val_fraction < 1.0:
        raise _UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.num_proc < 1:
        raise _UsageError(f"--num-proc must be >= 1, got {args.num_proc}")
    for path in args.inputs:
        try:
            file_type(path)
            open(path, "rb").close()
        except (OSError, ValueError) as error:
            raise _UsageError(f"cannot read {path}: {error}") from None
    targets = _outputs(args)
    unit = None
    if targets:
        paths = [path for pair in targets.values() for path in pair if path]
        unit = OutputUnit(args.output_dir, paths, manifest=MANIFEST, lock=LOCK)
        try:
            unit.__enter__()  # the lock and the scratch directory: before any work
        except BlockingIOError as error:
            raise _UsageError(str(error)) from None
        except OSError as error:
            raise _UsageError(f"cannot write to {args.output_dir}: {error.strerror or error}") from None
    try:
        if unit is not None:
            unit.stale = _replaced_outputs(args, unit.targets)
        return _stream(args, unit, targets)
    except OSError as error:
        raise _Failure(f"cannot write to {args.output_dir}: {error}; nothing was written or changed") from None
    finally:
        if unit is not None:
            unit.abort()


MANIFEST = ".mrloss-prepare.json"  # in the output directory: the outputs the last prepare there wrote
LOCK = ".mrloss-prepare.lock"  # in the output directory while a prepare writes there (one writer per directory)


def _outputs(args) -> dict:
    """{split: (file, tokenized directory or None)} of this run; {} when only validating."""
    if args.output_dir is None:
        if args.to or args.val_fraction:
            raise _UsageError("--to and --val-fraction need --output-dir")
        return {}
    from mrloss.data.tokenized import SUFFIX

    directory = args.output_dir
    splits = SPLITS if args.val_fraction > 0 else SPLITS[:1]
    return {
        split: (directory / f"{split}.{args.file_type}", directory / f"{split}{SUFFIX}" if args.tokenizer else None)
        for split in splits
    }


def _replaced_outputs(args, written: list[Path]) -> list[Path]:
    """The earlier outputs this run removes besides those it replaces (stale: e.g. a validation file of a run with
    --val-fraction), checked under the directory's lock, before any work. Every ``{train,validation}.{jsonl,json,
    parquet,tokenized}`` of the directory is an output name; one that exists is refused without --force, and with
    --force when an earlier prepare did not write it (not in MANIFEST: the user's file) and this run would
    replace it; an input this run would replace or remove is refused."""
    from mrloss.data.tokenized import SUFFIX

    directory = args.output_dir
    names = [directory / f"{split}{suffix}" for split in SPLITS for suffix in (*FILE_TYPES, SUFFIX)]
    existing = [path for path in names if path.exists() or path.is_symlink()]
    if existing and not args.force:
        raise _UsageError(f"{', '.join(map(str, existing))} exist; pass --force to replace them")
    recorded = recorded_outputs(directory, MANIFEST)
    foreign = [path for path in existing if path in written and path.name not in recorded]
    if foreign:
        raise _UsageError(
            f"{', '.join(map(str, foreign))} {'was' if len(foreign) == 1 else 'were'} not written by mrloss prepare "
            f"(not in {directory / MANIFEST}); --force replaces only earlier outputs of prepare: move "
            f"{'it' if len(foreign) == 1 else 'them'} away or choose another --output-dir"
        )
    stale = [path for path in existing if path not in written and path.name in recorded]
    replaced = [*written, *stale]
    for source in args.inputs:
        if any(_same_file(source, path) or _inside(source, path) for path in replaced):
            raise _UsageError(f"input {source} would be replaced by this run's outputs; write to another --output-dir")
    return stale


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` lies inside ``directory`` (a tokenized output directory)."""
    return directory.is_dir() and Path(os.path.realpath(directory)) in Path(os.path.realpath(path)).parents


# samples below this total input size are prepared in this process (starting workers would cost more)
PARALLEL_MIN_BYTES = 4 << 20


def _stream(args, unit: OutputUnit | None, targets: dict) -> int:
    tokenizer, tokenizer_note = _tokenizer(args)
    started = time.perf_counter()
    options = _ChunkOptions.of(args, splits=tuple(targets))
    writers = {split: _SplitWriter(unit, *paths) for split, paths in targets.items()}
    try:
        summary, bad = _consume(args, options, tokenizer, writers)
        print(escape_control(summary.format(bad, tokenizer_note, time.perf_counter() - started)))
        if writers and (not bad or args.drop_invalid) and summary.samples:
            empty = [split for split, writer in writers.items() if writer.count == 0]
            if empty:
                raise _Failure(
                    f"no sample of {summary.samples} fell into {' and '.join(empty)} (a sample goes to validation "
                    f"with probability --val-fraction {args.val_fraction}); change --val-fraction; nothing written"
                )
            for writer in writers.values():
                writer.finish(tokenizer, max_length=args.max_length, truncation=options.encode_truncation)
            unit.commit()
            for writer in writers.values():
                for path in (writer.path, writer.tokenized_path):
                    if path is not None:
                        print(f"wrote {path} ({writer.count} samples)")
    finally:
        for writer in writers.values():
            writer.close()
    if bad:
        if args.drop_invalid:
            note = ", dropped" + ("" if summary.samples else "; no valid sample, nothing written")
        else:
            note = "; nothing written (fix them, or pass --drop-invalid)" if writers else ""
        print(f"{bad} bad sample(s){note}", file=sys.stderr)
        return 0 if args.drop_invalid and writers and summary.samples else 1
    return 0


def _consume(args, options: _ChunkOptions, tokenizer, writers: dict) -> tuple[PrepareSummary, int]:
    """Run the chunks through the processes, print their errors, write their parts; (summary, bad samples)."""
    small = sum(Path(path).stat().st_size for path in args.inputs) < PARALLEL_MIN_BYTES
    summary, bad, records = PrepareSummary(), 0, 0
    results = ordered_map(
        _prepare_chunk,
        _chunks(args.inputs),
        num_proc=1 if small else args.num_proc,
        initializer=_start_worker,
        initargs=(tokenizer, options),
    )
    try:
        for result in results:
            records += result.records
            bad += len(result.errors)
            for error in result.errors:
                print(f"error: {escape_control(str(error))}", file=sys.stderr)
            summary.merge(result.summary)
            if writers and (not bad or args.drop_invalid):
                for split, part in result.parts.items():
                    writers[split].write(part)
    except FormatError as error:  # data that the output file type cannot hold
        raise _Failure(f"{error}; nothing written") from None
    except BrokenProcessPool:
        raise _Failure("a worker process died (out of memory?); nothing written") from None
    if records == 0:
        raise _Failure(f"no samples in {', '.join(map(str, args.inputs))}")
    return summary, bad


def _chunks(paths):
    """Lists of ``(index, Record)`` of at most CHUNK_SIZE samples (JSONL lines still undecoded), in input order;
    the index counts samples over all inputs."""
    chunk, index = [], 0
    for path in paths:
        records = iter_records(path, decode=False)
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except (OSError, ValueError) as error:
                raise _Failure(f"cannot read {path}: {error}") from None
            chunk.append((index, record))
            index += 1
            if len(chunk) == CHUNK_SIZE:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _tokenizer(args):
    """(tokenizer, description); loading or training it is not counted in the throughput."""
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        except (OSError, ValueError) as error:
            raise _UsageError(f"cannot load tokenizer {args.tokenizer}: {error}") from None
        return tokenizer, f"{args.tokenizer} (vocabulary {len(tokenizer)})"
    from mrloss.data.tokenizer import train_bpe_tokenizer_for_files

    tokenizer = train_bpe_tokenizer_for_files(args.inputs, args.format, args.vocab_size, skip_invalid=True)
    return tokenizer, f"byte-level BPE trained on the data (vocabulary {len(tokenizer)}; pass --tokenizer for yours)"


# --- the work on one chunk (in a worker process, or in this one) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ChunkOptions:
    format: str
    overlap: str
    extra_keys: str | tuple[str, ...]
    to: str | None
    max_length: int | None
    truncation: str
    val_fraction: float
    seed: int
    splits: tuple[str, ...]  # the outputs written; () when only validating
    parquet: bool
    tokenized: bool

    @classmethod
    def of(cls, args, splits: tuple[str, ...]) -> _ChunkOptions:
        """The options of ``mrloss prepare``'s parsed ``args``: each field but the derived ones is the argument of
        its name."""
        derived = dict(splits=splits, parquet=args.file_type == "parquet", tokenized=bool(args.tokenizer))
        given = {
            field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if field.name not in derived
        }
        return cls(**given, **derived)

    @property
    def encode_truncation(self) -> str:
        return "right" if self.truncation == "error" else self.truncation


@dataclasses.dataclass
class _Part:
    """The output samples of one split of one chunk: JSON texts, ids, Parquet schema, tokenized batch."""

    samples: list[str] = dataclasses.field(default_factory=list)
    sample_ids: list[str] = dataclasses.field(default_factory=list)
    schema: object = None
    tokens: object = None


@dataclasses.dataclass
class _ChunkResult:
    records: int
    errors: list[FormatError]
    summary: PrepareSummary
    parts: dict[str, _Part]


_WORKER: dict = {}  # the tokenizer and _ChunkOptions of this process, set once by _start_worker


def _start_worker(tokenizer, options: _ChunkOptions) -> None:
    _WORKER.update(tokenizer=tokenizer, options=options)


def _parse(sample: dict, options: _ChunkOptions, sample_id):
    """The one place prepare parses a sample (RegionText; FormatError naming the sample); the chat format
    ``messages`` renders with this process's tokenizer (its chat template: pass ``--tokenizer``)."""
    return parse(
        sample,
        options.format,
        overlap=options.overlap,
        extra_keys=options.extra_keys,
        sample_id=sample_id,
        tokenizer=_WORKER["tokenizer"],
    )


def in_validation(index: int, seed: int, val_fraction: float) -> bool:
    """Whether sample ``index`` goes to validation: a 64-bit hash of (seed, index), as a fraction of 2**64,
    below ``val_fraction`` (reproducible, and independent of every other sample)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def _prepare_chunk(chunk: list[tuple[int, Record]]) -> _ChunkResult:
    """Decode, validate, parse, tokenize, convert and split one chunk; the outputs come back serialized."""
    tokenizer, options = _WORKER["tokenizer"], _WORKER["options"]
    errors, kept = _parse_chunk(chunk, options)
    encodings = encode_batch(
        [item[3] for item in kept],
        tokenizer,
        max_length=options.max_length,
        truncation=options.encode_truncation,
        sample_ids=[item[1] for item in kept],
    )
    if options.truncation == "error" and options.max_length is not None:
        kept, encodings, too_long = _drop_too_long(kept, encodings, options.max_length)
        errors += too_long
    summary = PrepareSummary()
    summary.add([item[3] for item in kept], encodings)
    parts = _split_parts(kept, encodings, options)
    return _ChunkResult(len(chunk), [error for _, error in sorted(errors, key=lambda item: item[0])], summary, parts)


def _parse_chunk(chunk: list[tuple[int, Record]], options: _ChunkOptions) -> tuple[list, list]:
    """(errors, kept) of a chunk's records: errors (index, FormatError); kept (index, sample_id, output sample,
    RegionText), the output sample converted to ``--to`` where outputs are written."""
    errors, kept = [], []
    for index, record in chunk:
        record = decode_record(record)
        sample_id = record.sample_id
        try:
            if record.error is not None:
                raise record.error
            region_text = _parse(record.sample, options, sample_id)
            sample = record.sample
            if options.to and options.splits:
                sample = convert(sample, options.to, options.format, sample_id=sample_id, region_text=region_text)
            kept.append((index, sample_id, sample, region_text))
        except FormatError as error:
            errors.append((index, error))
    return errors, kept


def _drop_too_long(kept: list, encodings: list, max_length: int) -> tuple[list, list, list]:
    """(kept, encodings, errors) without the samples longer than ``max_length`` (``--truncation error``); errors:
    (index, FormatError) for each sample dropped."""
    too_long = [k for k, encoding in enumerate(encodings) if encoding["untruncated_length"] > max_length]
    errors = [
        (
            kept[k][0],
            FormatError(
                f"{encodings[k]['untruncated_length']} tokens, more than --max-length {max_length} "
                "(--truncation error)",
                sample_id=kept[k][1],
                field="text",
            ),
        )
        for k in too_long
    ]
    dropped = set(too_long)
    return (
        [item for k, item in enumerate(kept) if k not in dropped],
        [encoding for k, encoding in enumerate(encodings) if k not in dropped],
        errors,
    )


def _split_parts(kept: list, encodings: list, options: _ChunkOptions) -> dict[str, _Part]:
    """The kept samples of a chunk split into ``options.splits`` (serialized JSON, ids, and where asked the
    Parquet schema and the tokenized batch); {} when only validating."""
    parts = {split: _Part() for split in options.splits}
    encodings_of = {split: [] for split in options.splits}
    rows_of = {split: [] for split in options.splits}
    for (index, sample_id, sample, _), encoding in zip(kept, encodings):
        if not options.splits:
            break
        validation = "validation" in parts and in_validation(index, options.seed, options.val_fraction)
        split = "validation" if validation else "train"
        parts[split].samples.append(json.dumps(sample, ensure_ascii=False))
        parts[split].sample_ids.append(sample_id)
        encodings_of[split].append(encoding)
        rows_of[split].append(sample)
    for split, part in parts.items():
        if options.parquet and part.samples:
            part.schema = parquet_schema(rows_of[split], part.sample_ids)
        if options.tokenized and part.samples:
            from mrloss.data.tokenized import record_batch

            part.tokens = record_batch(part.sample_ids, encodings_of[split])
    return parts


def parquet_schema(rows: list[dict], sample_ids: list, schema=None):
    """The Arrow schema of ``rows`` unified with ``schema`` (null -> any type, int -> float); FormatError naming
    the first sample and field whose type conflicts (Parquet holds one type per column)."""
    import pyarrow as pa

    try:
        return _unify(schema, pa.Table.from_pylist(rows).schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    for row, sample_id in zip(rows, sample_ids):
        try:
            row_schema = pa.Table.from_pylist([row]).schema
            schema = _unify(schema, row_schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            known = {} if schema is None else {field.name: field.type for field in schema}
            field = next((f.name for f in row_schema if f.name in known and f.type != known[f.name]), None)
            where = f"is {row_schema.field(field).type} here, {known[field]} before" if field else str(error)
            raise FormatError(
                f"cannot be written to Parquet: the field {where}; Parquet needs one type per column "
                "(make the field one type in every sample, or use --file-type jsonl)",
                sample_id=sample_id,
                field=field,
            ) from None
    return schema


# --- writing (this process) ----------------------------------------------------------------------------------


class _SplitWriter:
    """One split's outputs inside the OutputUnit's scratch: the file (a .parquet file is first collected as
    JSONL, then converted with the schema of all its samples) and the tokenized dataset."""

    def __init__(self, unit: OutputUnit, path: Path, tokenized_path: Path | None):
        self.path, self.tokenized_path, self.count = path, tokenized_path, 0
        self._unit, self._kind, self._schema = unit, path.suffix, None
        self._text_path = unit.path(path) if self._kind != ".parquet" else unit.scratch / f"{path.name}.jsonl"
        self._stream = open(self._text_path, "w", encoding="utf-8")
        self._tokens = None
        if tokenized_path is not None:
            from mrloss.data.tokenized import TokenizedWriter

            self._tokens = TokenizedWriter(unit.scratch / f"{tokenized_path.name}.arrow")

    def write(self, part: _Part) -> None:
        if self._kind == ".json":
            separators = ["[\n" if self.count + k == 0 else ",\n" for k in range(len(part.samples))]
            self._stream.write("".join(separator + s for separator, s in zip(separators, part.samples)))
        else:
            self._stream.write("".join(s + "\n" for s in part.samples))
        if part.schema is not None:
            import pyarrow as pa

            try:
                self._schema = _unify(self._schema, part.schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # name the sample and field
                self._schema = parquet_schema([json.loads(s) for s in part.samples], part.sample_ids, self._schema)
        if self._tokens is not None and part.tokens is not None:
            self._tokens.write(part.tokens)
        self.count += len(part.samples)

    def finish(self, tokenizer, *, max_length, truncation: str) -> None:
        if self._kind == ".json":
            self._stream.write("\n]\n" if self.count else "[]\n")
        self._stream.close()
        if self._kind == ".parquet":
            self._write_parquet()
        if self._tokens is not None:
            self._tokens.finish(self._unit.path(self.tokenized_path), tokenizer, max_length=max_length,
                                truncation=truncation, add_eos=True)  # fmt: skip

    def _write_parquet(self, rows_per_group: int = 4096) -> None:
        import pyarrow as pa
        import pyarrow.parquet

        with (
            open(self._text_path, encoding="utf-8") as lines,
            pyarrow.parquet.ParquetWriter(self._unit.path(self.path), self._schema) as writer,
        ):
            rows = []
            for line in lines:
                rows.append(json.loads(line))
                if len(rows) == rows_per_group:
                    writer.write_table(pa.Table.from_pylist(rows, schema=self._schema))
                    rows = []
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=self._schema))
        self._text_path.unlink()

    def close(self) -> None:
        if not self._stream.closed:
            self._stream.close()
        if self._tokens is not None:
            self._tokens.close()


def _unify(first, second):
    """One Arrow schema of both (``first`` may be None); raises pyarrow's ArrowInvalid / ArrowTypeError."""
    import pyarrow as pa

    return second if first is None else pa.unify_schemas([first, second], promote_options="permissive")


if __name__ == "__main__":
    sys.exit(main())
