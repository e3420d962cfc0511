"""Tokenized data on disk: a Hugging Face ``datasets`` directory (Arrow, memory-mapped by every rank, no copy).

`mrloss prepare --tokenizer PATH --output-dir OUT` writes ``OUT/train.tokenized/`` (and
``validation.tokenized/``) next to the JSONL: ``datasets.Dataset.save_to_disk`` output plus
``mrloss_tokenized.json`` (the tokenizer's fingerprint, max_length, truncation, add_eos, region types) and the
tokenizer itself (``tokenizer/``). One row per sample::

    sample_id str | input_ids [T] int32 | token_weights [T] float32 | region_ids [T] int32
    region_types [R] str (the sample's regions) | untruncated_length int32 | truncated_regions [k] int32

`MultiRegionDataset` reads such directories (``MultiRegionDataset.from_disk(path, tokenizer)``, or a directory in
``paths``; ``data.train_files`` of `mrloss train`), and refuses data tokenized in a way the on-the-fly path
would not reproduce: another tokenizer, another ``add_eos``, or truncation settings that cut a sample differently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

SUFFIX = ".tokenized"
METADATA = "mrloss_tokenized.json"
TOKENIZER_DIR = "tokenizer"
VERSION = 1
BATCH_ROWS = 4096  # rows read at a time when only some columns are needed (`TokenizedItems.token_weight_batches`)


def schema():
    """The pyarrow schema of one row (see the module docstring)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("token_weights", pa.list_(pa.float32())),
            ("region_ids", pa.list_(pa.int32())),
            ("region_types", pa.list_(pa.string())),
            ("untruncated_length", pa.int32()),
            ("truncated_regions", pa.list_(pa.int32())),
        ]
    )


def record_batch(sample_ids: list[str], encodings: list[dict]):
    """A ``pyarrow.RecordBatch`` of `encode_batch` outputs (one row per sample)."""
    import pyarrow as pa

    columns = {"sample_id": [str(sample_id) for sample_id in sample_ids]}
    for name in ("input_ids", "token_weights", "region_ids", "region_types", "untruncated_length", "truncated_regions"):
        columns[name] = [encoding[name] for encoding in encodings]
    return pa.RecordBatch.from_pydict(columns, schema=schema())


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's model, normalizer, pre-tokenizer, post-processor and added tokens, and its
    eos id (not its padding / truncation settings, which calls change)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    state["eos_token_id"] = tokenizer.eos_token_id
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode("utf-8")).hexdigest()


class TokenizedWriter:
    """Streams record batches into an Arrow file at ``scratch``; `finish` turns it into the dataset directory."""

    def __init__(self, scratch: Path):
        import pyarrow as pa

        self.scratch = Path(scratch)
        self._stream = open(self.scratch, "wb")
        self._writer = pa.ipc.new_stream(self._stream, schema())
        self.region_types: set[str] = set()
        self.rows = 0

    def write(self, batch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows
        self.region_types.update(batch.column("region_types").flatten().unique().to_pylist())

    def finish(self, directory: Path, tokenizer, *, max_length, truncation: str, add_eos: bool) -> None:
        """Write the dataset directory (``datasets`` shards + metadata + tokenizer) to ``directory``."""
        import datasets

        self.close()
        dataset = datasets.Dataset.from_file(str(self.scratch))
        dataset.save_to_disk(str(directory))
        del dataset
        self.scratch.unlink()
        metadata = {
            "version": VERSION,
            "samples": self.rows,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
            "truncation": truncation,
            "add_eos": add_eos,
            "region_types": sorted(self.region_types),
        }
        (Path(directory) / METADATA).write_text(json.dumps(metadata, indent=1), encoding="utf-8")
        tokenizer.save_pretrained(str(Path(directory) / TOKENIZER_DIR))

    def close(self) -> None:
        """Close the Arrow file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._stream.close()


def is_tokenized(path) -> bool:
    """Whether ``path`` is a directory written by `TokenizedWriter` (`mrloss prepare --tokenizer`)."""
    return (Path(path) / METADATA).is_file()


def open_tokenized(paths, tokenizer, *, max_length=None, truncation="right", add_eos=True, region_types=None):
    """What `MultiRegionDataset` keeps of tokenized ``paths``: (region-type vocabulary: ``region_types`` first,
    then the others sorted; sample ids (a lazy Arrow column); ``truncated``: ``(sample_id, [region index])`` of
    samples whose learned regions truncation cut; the items, a `TokenizedItems`)."""
    import pyarrow.compute as pc

    mixed = [str(path) for path in paths if not is_tokenized(path)]
    if mixed:
        raise ValueError(
            f"{', '.join(mixed)}: not tokenized data (directories of `mrloss prepare --tokenizer`); "
            "give either raw files or tokenized directories, not both"
        )
    arrow, found = load_tokenized(paths, tokenizer, max_length=max_length, truncation=truncation, add_eos=add_eos)
    given = list(region_types or [])
    vocabulary = given + sorted(set(found) - set(given))
    sample_ids = arrow["sample_id"]
    cut = arrow.data.column("truncated_regions")
    rows = pc.indices_nonzero(pc.greater(pc.list_value_length(cut), 0)).to_pylist()
    truncated = [(sample_ids[row], cut[row].as_py()) for row in rows]
    return vocabulary, sample_ids, truncated, TokenizedItems(arrow, vocabulary)


def load_tokenized(paths, tokenizer, *, max_length, truncation: str, add_eos: bool):
    """(memory-mapped ``datasets.Dataset`` of all ``paths`` in order, sorted region types found in them).

    Raises ValueError naming the directory when its tokens are not what `encode` with ``tokenizer`` and these
    options would give."""
    import datasets
    import pyarrow.compute as pc

    parts, found = [], set()
    for path in paths:
        metadata = json.loads((Path(path) / METADATA).read_text(encoding="utf-8"))
        if metadata.get("version") != VERSION:
            raise ValueError(f"{path}: tokenized data of version {metadata.get('version')}, expected {VERSION}")
        if metadata["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise ValueError(
                f"{path} was tokenized with another tokenizer (the one saved in {Path(path) / TOKENIZER_DIR}); "
                "prepare it again with --tokenizer pointing to this model's tokenizer"
            )
        if metadata["add_eos"] != add_eos:
            raise ValueError(f"{path} was tokenized with add_eos={metadata['add_eos']}, asked: add_eos={add_eos}")
        part = datasets.load_from_disk(str(path))
        stored = (metadata["max_length"], metadata["truncation"])
        if stored != (max_length, truncation) and len(part):
            limits = [limit for limit in (metadata["max_length"], max_length) if limit is not None]
            longest = pc.max(part.data.column("untruncated_length")).as_py()
            if limits and longest > min(limits):
                raise ValueError(
                    f"{path} was tokenized with max_length={stored[0]}, truncation={stored[1]!r}, asked: "
                    f"max_length={max_length}, truncation={truncation!r}, and its longest sample ({longest} "
                    f"tokens) is cut differently; prepare it again with --max-length {max_length} "
                    f"--truncation {truncation}"
                )
        parts.append(part)
        found.update(metadata["region_types"])
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset, sorted(found)


class TokenizedItems:
    """The items of a tokenized ``datasets.Dataset`` as `MultiRegionDataset` gives them: ``input_ids`` [T] int64,
    ``token_weights`` [T] float32, ``region_ids`` [T] int64, ``region_type_ids`` [T] int64 (index into
    ``region_types``, -1 outside every region). Rows are read from the memory map one at a time."""

    def __init__(self, dataset, region_types: list[str]):
        self._rows = dataset.with_format("numpy", columns=["input_ids", "token_weights", "region_ids", "region_types"])
        self._type_ids = {name: index for index, name in enumerate(region_types)}

    def __len__(self) -> int:
        return len(self._rows)

    def token_weight_batches(self):
        """``(token_weights [ΣT] float32, region_ids [ΣT] int64, lengths [n] int64)`` of `BATCH_ROWS` rows at a
        time, the rows' tokens end to end: only those two columns are read (as Arrow), no item is built."""
        import pyarrow.compute as pc

        columns = self._rows.with_format("arrow", columns=["token_weights", "region_ids"])
        for table in columns.iter(batch_size=BATCH_ROWS):
            weights, region_ids = (table.column(name).combine_chunks() for name in ("token_weights", "region_ids"))
            yield (
                torch.tensor(weights.flatten().to_numpy(zero_copy_only=False)),  # a copy: the memory map is read-only
                torch.from_numpy(region_ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)),
                torch.from_numpy(pc.list_value_length(weights).to_numpy(zero_copy_only=False).astype(np.int64)),
            )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self._rows[int(index)]
        region_ids = torch.from_numpy(np.asarray(row["region_ids"], dtype=np.int64))
        lookup = torch.tensor([self._type_ids[name] for name in row["region_types"]] + [-1], dtype=torch.int64)
        return {
            "input_ids": torch.from_numpy(np.asarray(row["input_ids"], dtype=np.int64)),
            "token_weights": torch.tensor(row["token_weights"], dtype=torch.float32),
            "region_ids": region_ids,
            "region_type_ids": lookup[region_ids],  # index -1 picks the trailing -1
        }
