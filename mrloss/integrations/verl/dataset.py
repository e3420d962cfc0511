"""The ``data.custom_cls`` dataset of verl's SFT trainer: our three formats with token weights.

verl builds it as ``cls(parquet_files=, tokenizer=, config=, processor=, max_samples=)`` and, with
``data.pad_mode=no_padding``, collates items with ``SFTTensorCollator`` into jagged (nested) tensors.
Each item is ``input_ids`` [T] int64, ``position_ids`` [T] int64 (0..T-1), ``loss_mask`` [T] float32:
the token weights of `mrloss.data` (target-aligned, ``loss_mask[0] == 0``), and ``region_type_ids`` [T] int64
(index into ``dataset.region_types``, -1 outside every region; verl's collator passes it on as one more jagged
tensor and verl's own model inputs ignore it; the mrloss weighting and monitor read it). verl rolls the packed mask by
-1 so that position k-1 (which predicts token k) gets weight ``loss_mask[k]``; the zero first weight is
what keeps a packed sample from learning the next sample's first token.

Data config keys read (verl's ``data`` section; ``+data.format=...`` adds the ones verl lacks):
``pad_mode`` (must be no_padding), ``max_length``, ``truncation`` (right | left | error), ``format``
(auto | position_based | tag_based | structured), ``add_eos``, ``shuffle`` and ``seed`` (for max_samples).
"""

from __future__ import annotations

import torch


class MultiRegionSFTDataset(torch.utils.data.Dataset):
    """Items ``{"input_ids", "position_ids", "loss_mask", "region_type_ids"}`` for verl's no_padding SFT path.

    parquet_files: one path or a list (JSONL / JSON / Parquet, any of our three formats); tokenizer: a
    fast HF tokenizer (or a path to one); config: verl's data config (mapping); processor: unused (text
    only); max_samples: > 0 keeps that many samples (the first ones, or a seeded random choice when
    ``config.shuffle``), like verl's own datasets.
    """

    def __init__(self, parquet_files, tokenizer, config=None, processor=None, max_samples: int = -1):
        from mrloss.data import MultiRegionDataset

        config = {} if config is None else config
        pad_mode = str(config.get("pad_mode", "no_padding"))
        if pad_mode not in ("no_padding", "DatasetPadMode.NO_PADDING"):
            raise ValueError(f"MultiRegionSFTDataset supports data.pad_mode=no_padding only, got {pad_mode!r}")
        if processor is not None:
            raise ValueError("MultiRegionSFTDataset is text-only: processor must be None")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        paths = [parquet_files] if isinstance(parquet_files, str) else [str(path) for path in parquet_files]
        self.samples = MultiRegionDataset(
            paths,
            tokenizer,
            format=config.get("format", "auto"),
            max_length=config.get("max_length", None),
            truncation=config.get("truncation", "right"),
            add_eos=config.get("add_eos", True),
        )
        self.region_types = self.samples.region_types
        count = len(self.samples)
        self.indices = list(range(count))
        if max_samples is not None and 0 < max_samples < count:
            if config.get("shuffle", False):
                generator = torch.Generator().manual_seed(int(config.get("seed", None) or 0))
                self.indices = torch.randperm(count, generator=generator)[:max_samples].tolist()
            else:
                self.indices = self.indices[:max_samples]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.samples[self.indices[index]]
        input_ids = item["input_ids"].long()
        return {
            "input_ids": input_ids,
            "position_ids": torch.arange(input_ids.shape[0], dtype=torch.long),
            "loss_mask": item["token_weights"].float(),
            "region_type_ids": item["region_type_ids"].long(),
        }
