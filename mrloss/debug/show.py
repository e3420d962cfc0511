"""`mrloss show FILE [--index N] [--html out.html] [--run DIR | --tokenizer DIR]`: the loss mask of one sample,
in the terminal or as HTML, with the token boundaries the model is (or was) trained on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrloss.data.encode import DEFAULT_MAX_LENGTH, TRUNCATION_MODES
from mrloss.data.tokenizer import RUN_TOKENIZER_DIR, add_vocab_size_argument
from mrloss.formats import INPUT_FORMATS, add_extra_keys_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrloss show",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show which tokens of one sample are learned, with what weight, in which region; warn about "
        "lost or cut regions.",
        epilog="Tokenizer, first that applies:\n"
        "  --run DIR        the tokenizer of an `mrloss train` output directory: DIR/tokenizer (saved when\n"
        "                   the run starts, model.path null) or DIR itself (saved with the final model); the\n"
        "                   run's config.yaml (written at its end) gives --max-length, --truncation and\n"
        "                   --extra-keys\n"
        "                   unless given here (the format of FILE is detected, or --format)\n"
        "  --tokenizer DIR  a local Hugging Face tokenizer directory\n"
        "  otherwise        a byte-level BPE of --vocab-size trained on FILE's texts, as `mrloss train`\n"
        "                   trains it (model.path null) when FILE is its only training file",
    )
    parser.add_argument("file", help="JSONL, JSON or Parquet file of samples (any format; chat: --tokenizer)")
    parser.add_argument("--index", type=int, default=0, help="0-based index of the sample in FILE (default 0)")
    parser.add_argument("--html", metavar="OUT", help="also write a self-contained HTML view to OUT")
    parser.add_argument("--format", choices=("auto",) + INPUT_FORMATS, help="format of FILE (default: auto)")
    add_extra_keys_argument(parser, default=None)  # None: the run's data.extra_keys, else error
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", metavar="DIR", help="output directory of `mrloss train`: use its tokenizer")
    source.add_argument("--tokenizer", metavar="DIR", help="local Hugging Face tokenizer directory")
    add_vocab_size_argument(parser, trained_on="FILE")
    parser.add_argument("--max-length", type=int, help="truncate to this many tokens, as training would")
    parser.add_argument("--truncation", choices=TRUNCATION_MODES, help="default: right")
    parser.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    from mrloss.data.records import read_records

    try:
        data = _run_data_config(args.run) if args.run else dict(WITHOUT_RUN)
        records = read_records(args.file)
    except (OSError, ValueError) as error:
        print(f"mrloss show: {error}", file=sys.stderr)
        return 1
    if not 0 <= args.index < len(records):
        print(
            f"mrloss show: --index {args.index} is out of range: {args.file} has {len(records)} sample(s)",
            file=sys.stderr,
        )
        return 2
    record = records[args.index]
    try:
        tokenizer, region_text, encoded = _encode_sample(args, record, data)
    except (OSError, ValueError) as error:  # FormatError is a ValueError
        print(f"mrloss show: {error}", file=sys.stderr)
        return 1
    _show(args, record, tokenizer, region_text, encoded)
    return 0


def _encode_sample(args, record, data: dict) -> tuple:
    """(tokenizer, RegionText, encoding) of ``record`` as training would encode it: the options given here, else
    the run's ``data`` section (``data``); raises the record's FormatError, OSError or ValueError."""
    from mrloss.data import encode
    from mrloss.formats import parse

    data_format = args.format or "auto"  # FILE's own format: the run's data.format describes its training files
    max_length = args.max_length if args.max_length is not None else data["max_length"]
    if record.error is not None:
        raise record.error
    tokenizer = _tokenizer(args, data_format)
    region_text = parse(
        record.sample,
        data_format,
        extra_keys=args.extra_keys or data["extra_keys"],
        sample_id=record.sample_id,
        tokenizer=tokenizer,
    )
    encoded = encode(
        region_text,
        tokenizer,
        max_length=max_length,
        truncation=args.truncation or data["truncation"],
        add_eos=data["add_eos"],
        sample_id=record.sample_id,
    )
    return tokenizer, region_text, encoded


def _show(args, record, tokenizer, region_text, encoded: dict) -> None:
    """Print the sample's loss mask (and write ``--html``)."""
    from mrloss.debug.visualizer import LossMaskVisualizer

    visualizer = LossMaskVisualizer(tokenizer)
    print(f"sample --index {args.index} ({_where(record, args.file)})")
    visualizer.print_detailed_analysis(
        encoded["input_ids"],
        encoded["token_weights"],
        encoded,
        region_text=region_text,
        color={"auto": None, "always": True, "never": False}[args.color],
    )
    if args.html:
        page = visualizer.to_html(
            encoded["input_ids"],
            encoded["token_weights"],
            encoded,
            region_text=region_text,
            title=f"mrloss loss mask: {record.sample_id}",
        )
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"wrote {args.html}")


def _where(record, file) -> str:
    """Where the sample is in FILE, labelled: ``FILE, line 4`` (JSONL lines count from 1, blank lines included) or
    its sample id (``FILE[3]``: the 0-based index of a JSON list or Parquet row)."""
    from mrloss.data.records import file_type

    return f"{file}, line {record.line}" if file_type(file) == ".jsonl" else record.sample_id


# data options of `mrloss show` without a run (no truncation): those of `mrloss train`'s data section otherwise
WITHOUT_RUN = {"max_length": None, "truncation": "right", "add_eos": True, "extra_keys": "error"}


def _run_data_config(run_dir: str) -> dict:
    """The ``data`` section of ``run_dir/config.yaml`` (no truncation until the run has written it)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise OSError(f"--run {run_dir}: not a directory")
    if not path.exists():
        return dict(WITHOUT_RUN)
    section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
    written = {key: section[key] for key in WITHOUT_RUN if key in section}
    return {**WITHOUT_RUN, "max_length": DEFAULT_MAX_LENGTH, **written}


def _tokenizer(args, data_format: str):
    """The tokenizer of ``--run`` or ``--tokenizer`` (local files only), else one trained on FILE's parseable
    samples (`mrloss.data.tokenizer.train_bpe_tokenizer_for_files`, ``--vocab-size``)."""
    directory = args.tokenizer
    if args.run is not None:
        candidates = [Path(args.run) / RUN_TOKENIZER_DIR, Path(args.run)]
        directory = next((str(c) for c in candidates if (c / "tokenizer_config.json").exists()), None)
        if directory is None:
            raise OSError(
                f"--run {args.run}: no tokenizer in {' or '.join(map(str, candidates))} "
                "(is it an `mrloss train` output directory?)"
            )
    if directory is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    from mrloss.data.tokenizer import train_bpe_tokenizer_for_files

    return train_bpe_tokenizer_for_files([args.file], data_format, args.vocab_size, skip_invalid=True)
