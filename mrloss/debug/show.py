"""`mrloss show FILE [--index N] [--html out.html]`: the loss mask of one sample, in the terminal or as HTML."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrloss.formats import FormatError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mrloss show", description="Show which tokens of one sample are "
                                     "learned, with what weight, in which region; warn about lost or cut regions.")
    parser.add_argument("file", help="JSONL, JSON or Parquet file of samples (any of the three formats)")
    parser.add_argument("--index", type=int, default=0, help="0-based index of the sample in FILE (default 0)")
    parser.add_argument("--html", metavar="OUT", help="also write a self-contained HTML view to OUT")
    parser.add_argument("--format", default="auto", help="auto | position_based | tag_based | structured")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="local tokenizer directory (default: a small byte-level BPE trained on FILE's texts)")
    parser.add_argument("--max-length", type=int, help="truncate to this many tokens, as training would")
    parser.add_argument("--truncation", default="right", choices=("right", "left"))
    parser.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    args = parser.parse_args(argv)

    from mrloss.data import encode
    from mrloss.data.records import read_records
    from mrloss.debug.visualizer import LossMaskVisualizer
    from mrloss.formats import parse

    try:
        records = read_records(args.file)
    except (OSError, ValueError) as error:
        print(f"mrloss show: {error}", file=sys.stderr)
        return 1
    if not 0 <= args.index < len(records):
        print(f"mrloss show: --index {args.index} is out of range: {args.file} has {len(records)} sample(s)",
              file=sys.stderr)
        return 2
    record = records[args.index]
    try:
        if record.error is not None:
            raise record.error
        region_text = parse(record.sample, args.format, sample_id=record.sample_id)
        tokenizer = _tokenizer(args.tokenizer, records, args.format)
        encoded = encode(region_text, tokenizer, max_length=args.max_length, truncation=args.truncation,
                         sample_id=record.sample_id)
    except FormatError as error:
        print(f"mrloss show: {error}", file=sys.stderr)
        return 1
    visualizer = LossMaskVisualizer(tokenizer)
    print(f"sample {record.sample_id}")
    visualizer.print_detailed_analysis(encoded["input_ids"], encoded["token_weights"], encoded, region_text=region_text,
                                       color={"auto": None, "always": True, "never": False}[args.color])
    if args.html:
        page = visualizer.to_html(encoded["input_ids"], encoded["token_weights"], encoded, region_text=region_text,
                                  title=f"mrloss loss mask: {record.sample_id}")
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


def _tokenizer(directory: str | None, records, format: str):
    """The tokenizer in ``directory`` (local files only), else a small BPE trained on the file's parseable texts."""
    if directory is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    from mrloss.data.tokenizer import train_bpe_tokenizer
    from mrloss.formats import parse

    texts = []
    for record in records:
        if record.sample is not None:
            try:
                texts.append(parse(record.sample, format).text)
            except FormatError:
                pass  # bad samples are `mrloss prepare`'s business; the shown one was parsed above
    return train_bpe_tokenizer(texts, vocab_size=1024)
