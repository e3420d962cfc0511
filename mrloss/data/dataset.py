"""MultiRegionDataset: raw files of any format -> tokenized items with token weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mrloss.data.encode import encode_batch
from mrloss.data.records import Record, parse_records, read_records
from mrloss.formats import FormatError
from mrloss.ops.normalization import learned_mask

RAW_DATA_OPTIONS = ("format", "overlap", "extra_keys")  # options of parsing raw samples (`mrloss.formats.parse`)


class MultiRegionDataset(torch.utils.data.Dataset):
    """Every sample of ``paths`` (JSONL / JSON / Parquet, formats mixed freely; chat ``messages`` samples are
    rendered with ``tokenizer``'s chat template), parsed and encoded up front,
    so a bad sample fails at construction with a FormatError naming it (and counting the others).

    Item ``i``: ``input_ids [T] int64``, ``token_weights [T] float32`` (``token_weights[0] == 0``),
    ``region_ids [T] int64`` (index into the sample's regions, -1 outside), ``region_type_ids [T] int64``
    (index into ``self.region_types``, -1 outside every region).

    ``region_types``: the region-type vocabulary: the given list first (share ``train.region_types`` with
    the validation set to keep ids equal), then the other types of the data, sorted. ``format``, ``overlap`` and
    ``extra_keys`` (top-level keys kept as metadata besides `mrloss.formats.METADATA_KEYS`) are those of
    `mrloss.formats.parse`.
    A directory in ``paths`` is tokenized data of `mrloss prepare --tokenizer` (see `from_disk`).
    Also kept: ``sample_ids``, ``region_texts`` (None for tokenized data) and ``truncated`` (``(sample_id,
    [region index])`` of samples whose learned regions truncation cut; a warning counts them).
    """

    def __init__(
        self,
        paths,
        tokenizer,
        *,
        format: str = "auto",
        max_length: int | None = None,
        truncation: str = "right",
        add_eos: bool = True,
        region_types: list[str] | None = None,
        overlap: str = "error",
        extra_keys="error",
    ):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        not_paths = [path for path in paths if not isinstance(path, (str, Path))]
        if not_paths:
            hint = (
                "; for in-memory samples call MultiRegionDataset.from_samples(samples, tokenizer, ...)"
                if isinstance(not_paths[0], dict)
                else ""
            )
            raise TypeError(
                f"MultiRegionDataset(paths): expected file or directory paths, got {type(not_paths[0]).__name__}{hint}"
            )
        if any(Path(path).is_dir() for path in paths):
            options = dict(max_length=max_length, truncation=truncation, add_eos=add_eos, region_types=region_types)
            self._load(paths, tokenizer, **options)
            return
        records = [record for path in paths for record in read_records(path)]
        if not records:
            raise FormatError(f"no samples in {', '.join(map(str, paths))}")
        self._build(
            records,
            tokenizer,
            format=format,
            max_length=max_length,
            truncation=truncation,
            add_eos=add_eos,
            region_types=region_types,
            overlap=overlap,
            extra_keys=extra_keys,
        )

    @classmethod
    def from_records(cls, records: list[Record], tokenizer, **options):
        """The dataset of ``records`` (`mrloss.data.records.read_records`, possibly edited; same options)."""
        dataset = cls.__new__(cls)
        dataset._build(list(records), tokenizer, **options)
        return dataset

    @classmethod
    def from_samples(cls, samples: list[dict], tokenizer, *, sample_ids: list | None = None, **options):
        """The dataset of in-memory raw samples (same options as the constructor); ids default to indices."""
        dataset = cls.__new__(cls)
        sample_ids = list(range(len(samples))) if sample_ids is None else list(sample_ids)
        dataset._build(
            [
                Record(sample_id, index, sample=sample)
                for index, (sample_id, sample) in enumerate(zip(sample_ids, samples))
            ],
            tokenizer,
            **options,
        )
        return dataset

    @classmethod
    def from_disk(cls, paths, tokenizer, **options):
        """The dataset of directories written by `mrloss prepare --tokenizer` (`mrloss.data.tokenized`),
        memory-mapped: every rank maps the same Arrow files, nothing is tokenized or copied. Same options as
        the constructor; ``format``, ``overlap`` and ``extra_keys`` do not apply (the data is parsed already)."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        not_tokenized = [str(path) for path in paths if not Path(path).is_dir()]
        if not_tokenized:
            raise ValueError(f"not a tokenized data directory: {', '.join(not_tokenized)}")
        dataset = cls.__new__(cls)
        options = {key: value for key, value in options.items() if key not in RAW_DATA_OPTIONS}
        dataset._load(paths, tokenizer, **options)
        return dataset

    def _load(self, paths, tokenizer, **options):
        from mrloss.data.tokenized import open_tokenized

        self.region_types, self.sample_ids, self.truncated, self._items = open_tokenized(paths, tokenizer, **options)
        self.region_texts = None  # raw texts are not stored with the tokens

    def _build(
        self,
        records: list[Record],
        tokenizer,
        *,
        format="auto",
        max_length=None,
        truncation="right",
        add_eos=True,
        region_types=None,
        overlap="error",
        extra_keys="error",
    ):
        valid, region_texts, errors = parse_records(records, format, overlap, tokenizer, extra_keys)
        sample_ids = [record.sample_id for record in valid]
        if errors:
            first = errors[0]
            more = (
                (
                    f" (and {len(errors) - 1} more bad sample{'s' * (len(errors) > 2)}; `mrloss prepare FILE` lists "
                    "them all)"
                )
                if len(errors) > 1
                else ""
            )
            raise FormatError(
                first.reason + more, sample_id=first.sample_id, field=first.field, position=first.position
            )
        encodings = encode_batch(
            region_texts,
            tokenizer,
            max_length=max_length,
            truncation=truncation,
            add_eos=add_eos,
            sample_ids=sample_ids,
        )
        given = list(region_types or [])
        found = {region.type for rt in region_texts for region in rt.regions}
        self.region_types = given + sorted(found - set(given))
        type_ids = {name: index for index, name in enumerate(self.region_types)}
        self.sample_ids = sample_ids
        self.region_texts = region_texts
        self.truncated = [
            (sample_id, encoding["truncated_regions"])
            for sample_id, encoding in zip(sample_ids, encodings)
            if encoding["truncated_regions"]
        ]
        if self.truncated:
            warnings.warn(
                f"truncation (max_length={max_length}, {truncation}) cut learned regions of "
                f"{len(self.truncated)} of {len(records)} samples, e.g. {self.truncated[0][0]}; see "
                f"dataset.truncated",
                stacklevel=3,
            )
        self._items = [self._tensors(encoding, type_ids) for encoding in encodings]

    @staticmethod
    def _tensors(encoding: dict, type_ids: dict[str, int]) -> dict[str, torch.Tensor]:
        region_ids = torch.tensor(encoding["region_ids"], dtype=torch.int64)
        sample_type_ids = torch.tensor([type_ids[name] for name in encoding["region_types"]] + [-1], dtype=torch.int64)
        return {
            "input_ids": torch.tensor(encoding["input_ids"], dtype=torch.int64),
            "token_weights": torch.tensor(encoding["token_weights"], dtype=torch.float32),
            "region_ids": region_ids,
            "region_type_ids": sample_type_ids[region_ids],  # index -1 picks the trailing -1
        }

    def learned_samples(self) -> tuple[torch.Tensor, bool]:
        """(whether each sample has a learned token: [N] bool; whether a learned token lies outside every region).
        The rule is `mrloss.ops.normalization.learned_mask` of the token weights. Tokenized data reads only its
        token-weight and region-id columns, in batches (no item is built)."""
        if isinstance(self._items, list):
            batches = [_concatenated(self._items)] if self._items else []
        else:
            batches = self._items.token_weight_batches()
        learned, outside = [], False
        for token_weights, region_ids, lengths in batches:
            mask = learned_mask(None, token_weights)
            counted = torch.cat([torch.zeros(1, dtype=torch.int64), mask.cumsum(0)])  # learned tokens before each
            ends = lengths.cumsum(0)
            learned.append(counted[ends] > counted[ends - lengths])
            outside = outside or bool((mask & (region_ids < 0)).any())  # region id -1: outside every region
        return (torch.cat(learned) if learned else torch.zeros(0, dtype=torch.bool)), outside

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self._items[index])


def _concatenated(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token_weights [ΣT], region_ids [ΣT], lengths [n])`` of in-memory items, their tokens end to end."""
    lengths = torch.tensor([len(item["token_weights"]) for item in items], dtype=torch.int64)
    return (
        torch.cat([item["token_weights"] for item in items]),
        torch.cat([item["region_ids"] for item in items]),
        lengths,
    )
