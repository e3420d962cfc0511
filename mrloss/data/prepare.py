"""`mrloss prepare`: validate raw files, convert between formats, split train / validation, summarize.

    mrloss prepare data.jsonl                                  validate + summary (exit 1 on bad samples)
    mrloss prepare data.jsonl --output-dir out --to tag_based --val-fraction 0.1 --seed 0
    mrloss prepare --example DIR                               write the example data set (3 formats)

Every bad sample is listed with its file and line (``file.jsonl:17``) or index (``file.json[3]``), field and
character. Nothing is written while bad samples remain, unless ``--drop-invalid``. Outputs are written
atomically (temporary file + ``os.replace``) and never overwrite without ``--force``. Exit codes: 0 ok,
1 bad samples, 2 usage error (bad option, existing output without --force, unreadable input).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

from mrloss.data.encode import TRUNCATION_MODES, encode_batch
from mrloss.data.records import FILE_TYPES, parse_records, read_records, write_samples
from mrloss.data.tokenizer import DEFAULT_VOCAB_SIZE
from mrloss.formats import FORMATS, FormatError, convert

OUTSIDE = "(outside regions)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrloss prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", type=Path, help="raw files (.jsonl, .json, .parquet)")
    parser.add_argument("--example", type=Path, metavar="DIR", help="write the example data set to DIR and stop")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="format of the inputs")
    parser.add_argument(
        "--overlap",
        default="error",
        choices=("error", "max"),
        help="overlapping position_based regions: an error, or the highest weight wins",
    )
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
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="vocabulary of the tokenizer trained on the inputs (default %(default)s: mrloss "
        "train's model.vocab_size default, so the counts are those of such a run)",
    )
    parser.add_argument("--max-length", type=int, help="token limit per sample (for the truncation report)")
    parser.add_argument(
        "--truncation",
        default="right",
        choices=TRUNCATION_MODES,
        help="'error' makes a sample longer than --max-length a bad sample",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return _run(args)
    except _UsageError as error:
        print(f"mrloss prepare: {error}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    pass


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
    outputs = _output_paths(args)

    started = time.perf_counter()
    samples, region_texts, sample_ids, errors = _read_and_parse(args)
    tokenizer, tokenizer_note, tokenizer_seconds = _tokenizer(args)
    encodings = encode_batch(
        region_texts,
        tokenizer,
        max_length=args.max_length,
        truncation="right" if args.truncation == "error" else args.truncation,
        sample_ids=sample_ids,
    )
    if args.truncation == "error" and args.max_length is not None:
        too_long = {i for i, e in enumerate(encodings) if e["untruncated_length"] > args.max_length}
        errors += [
            FormatError(
                f"{encodings[i]['untruncated_length']} tokens, more than --max-length "
                f"{args.max_length} (--truncation error)",
                sample_id=sample_ids[i],
                field="text",
            )
            for i in sorted(too_long)
        ]
        keep = [i for i in range(len(samples)) if i not in too_long]
        samples, region_texts, sample_ids, encodings = (
            [items[i] for i in keep] for items in (samples, region_texts, sample_ids, encodings)
        )
    for error in errors:
        print(f"error: {error}", file=sys.stderr)

    written = []
    if outputs and (not errors or args.drop_invalid):
        if args.to:
            samples = [
                convert(sample, args.to, args.format, overlap=args.overlap, sample_id=sample_id)
                for sample, sample_id in zip(samples, sample_ids)
            ]
        train, validation = _split(samples, args.val_fraction, args.seed)
        for path, part in zip(outputs, (train, validation)):
            write_samples(path, part, force=args.force)
            written.append((path, len(part)))
    elapsed = time.perf_counter() - started - tokenizer_seconds

    print(_summary(region_texts, encodings, len(errors), tokenizer_note, elapsed))
    for path, count in written:
        print(f"wrote {path} ({count} samples)")
    if errors:
        print(
            f"{len(errors)} bad sample(s)"
            + (
                ", dropped"
                if args.drop_invalid
                else "; nothing written (fix them, or pass --drop-invalid)"
                if outputs
                else ""
            ),
            file=sys.stderr,
        )
        return 0 if args.drop_invalid and outputs else 1
    return 0


def _output_paths(args) -> list[Path]:
    """[train] or [train, validation] paths; refuses existing files without --force before any work."""
    if args.output_dir is None:
        if args.to or args.val_fraction:
            raise _UsageError("--to and --val-fraction need --output-dir")
        return []
    names = ["train"] + (["validation"] if args.val_fraction > 0 else [])
    paths = [args.output_dir / f"{name}.{args.file_type}" for name in names]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not args.force:
        raise _UsageError(f"{', '.join(existing)} exist; pass --force to overwrite")
    return paths


def _read_and_parse(args):
    records = []
    for path in args.inputs:
        try:
            records += read_records(path)
        except (OSError, ValueError) as error:
            raise _UsageError(f"cannot read {path}: {error}") from None
    valid, region_texts, errors = parse_records(records, args.format, args.overlap)
    return [r.sample for r in valid], region_texts, [r.sample_id for r in valid], errors


def _tokenizer(args):
    """(tokenizer, description, seconds to load or train it: the throughput leaves them out)."""
    started = time.perf_counter()
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        except (OSError, ValueError) as error:
            raise _UsageError(f"cannot load tokenizer {args.tokenizer}: {error}") from None
        note = f"{args.tokenizer} (vocabulary {len(tokenizer)})"
    else:
        from mrloss.data.tokenizer import train_bpe_tokenizer_for_files

        tokenizer = train_bpe_tokenizer_for_files(args.inputs, args.format, args.vocab_size, skip_invalid=True)
        note = f"byte-level BPE trained on the data (vocabulary {len(tokenizer)}; pass --tokenizer for yours)"
    return tokenizer, note, time.perf_counter() - started


def _split(samples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation), each in input order; validation gets round(n * val_fraction) samples, at least
    one when val_fraction > 0 and there are 2+ samples."""
    count = round(len(samples) * val_fraction)
    if val_fraction > 0 and len(samples) >= 2:
        count = min(max(count, 1), len(samples) - 1)
    chosen = set(random.Random(seed).sample(range(len(samples)), count))
    return ([s for i, s in enumerate(samples) if i not in chosen], [s for i, s in enumerate(samples) if i in chosen])


def _summary(region_texts, encodings, bad: int, tokenizer_note: str, seconds: float) -> str:
    import numpy as np

    names = sorted({region.type for rt in region_texts for region in rt.regions}) + [OUTSIDE]
    index = {name: i for i, name in enumerate(names)}
    region_counts = np.zeros(len(names), dtype=np.int64)
    weights, types, firsts = [], [], []
    for rt, encoding in zip(region_texts, encodings):
        region_types = np.array([index[region.type] for region in rt.regions] + [index[OUTSIDE]], dtype=np.int64)
        np.add.at(region_counts, region_types[:-1], 1)
        weights.append(np.asarray(encoding["token_weights"], dtype=np.float64))
        types.append(region_types[np.asarray(encoding["region_ids"], dtype=np.int64)])  # id -1 -> OUTSIDE
        firsts.append(np.arange(len(encoding["input_ids"])) == 0)
    weights = np.concatenate(weights) if weights else np.zeros(0)
    types = np.concatenate(types) if types else np.zeros(0, dtype=np.int64)
    firsts = np.concatenate(firsts) if firsts else np.zeros(0, dtype=bool)
    learned = weights > 0
    truncated = sum(bool(e["truncated_regions"]) for e in encodings)
    lines = [
        f"samples: {len(region_texts)} valid, {bad} bad",
        f"tokens: {len(weights)} ({int(learned.sum())} learned, {learned.sum() / max(len(weights), 1):.1%})",
        f"tokenizer: {tokenizer_note}",
    ]
    if truncated:
        lines.append(f"truncation cut learned regions of {truncated} sample(s)")
    lines.append(f"{'region type':<20} {'regions':>8} {'tokens':>8} {'learned':>8}  token weight histogram")
    for i, name in enumerate(names):
        in_type = types == i
        if not in_type.any() and not region_counts[i]:
            continue
        values, counts = np.unique(weights[in_type & ~firsts], return_counts=True)  # first tokens: always 0
        lines.append(
            f"{name:<20} {region_counts[i]:>8} {int(in_type.sum()):>8} {int((in_type & learned).sum()):>8}  "
            f"{_histogram(dict(zip(values.tolist(), counts.tolist())))}"
        )
    rate = len(region_texts) / seconds if seconds > 0 else float("inf")
    lines.append(
        f"throughput: {len(region_texts)} samples in {seconds:.3f} s ({rate:.0f} samples/s, tokenizer set-up excluded)"
    )
    return "\n".join(lines)


def _histogram(counts: dict[float, int], bins: int = 8) -> str:
    """``weight×count`` for up to ``bins`` distinct weights, else counts in ``bins`` equal-width bins."""
    if len(counts) <= bins:
        return " ".join(f"{weight:g}×{count}" for weight, count in sorted(counts.items()))
    low, high = min(counts), max(counts)
    width = (high - low) / bins
    binned = Counter()
    for weight, count in counts.items():
        binned[min(int((weight - low) / width), bins - 1)] += count
    return " ".join(f"[{low + b * width:.3g},{low + (b + 1) * width:.3g})×{binned[b]}" for b in sorted(binned))


if __name__ == "__main__":
    sys.exit(main())
