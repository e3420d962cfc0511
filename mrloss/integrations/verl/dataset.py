"""The ``data.custom_cls`` dataset of verl's SFT trainer: mrloss's formats with token weights.

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
(auto or one of `mrloss.formats.INPUT_FORMATS`), ``extra_keys`` (error | keep | a list of key names,
as `mrloss.formats.parse`; verl's own dataset columns `VERL_METADATA_KEYS` are metadata in any case), ``add_eos``,
``shuffle`` and ``seed`` (for max_samples); for chat samples, as verl's MultiTurnSFTDataset reads them:
``messages_key`` (default messages), ``tools_key`` (tools), ``enable_thinking_key`` (enable_thinking),
``enable_thinking_default`` and ``apply_chat_template_kwargs``.
"""

from __future__ import annotations

import torch

# the columns verl's data preprocessing scripts write next to the prompt or messages: metadata here
VERL_METADATA_KEYS = ("data_source", "ability", "reward_model", "extra_info")


class MultiRegionSFTDataset(torch.utils.data.Dataset):
    """Items ``{"input_ids", "position_ids", "loss_mask", "region_type_ids"}`` for verl's no_padding SFT path.

    parquet_files: one path or a list (JSONL / JSON / Parquet, any of `mrloss.formats.INPUT_FORMATS`); tokenizer: a
    fast HF tokenizer (or a path to one); config: verl's data config (mapping); processor: unused (text
    only); max_samples: > 0 keeps that many samples (the first ones, or a seeded random choice when
    ``config.shuffle``), like verl's own datasets.
    """

    def __init__(self, parquet_files, tokenizer, config=None, processor=None, max_samples: int = -1):
        from mrloss.data import MultiRegionDataset
        from mrloss.data.records import read_records

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
        records = [record for path in paths for record in read_records(path)]
        for record in records:
            if record.sample is not None:
                record.sample = chat_sample(record.sample, config)
        self.samples = MultiRegionDataset.from_records(
            records,
            tokenizer,
            format=config.get("format", "auto"),
            extra_keys=_extra_keys(config.get("extra_keys", None)),
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


def _extra_keys(value):
    """``data.extra_keys`` (null | error | keep | key names) as `mrloss.formats.parse` takes it, with
    `VERL_METADATA_KEYS` allowed."""
    if value == "keep":
        return value
    names = () if value is None or value == "error" else tuple(str(key) for key in value)
    return VERL_METADATA_KEYS + names


def chat_sample(sample: dict, config) -> dict:
    """``sample`` with verl's chat keys (``data.messages_key``, ``tools_key``, ``enable_thinking_key``) under the
    names of the messages format, and ``data.apply_chat_template_kwargs`` / ``enable_thinking_default`` in its
    ``chat_template_kwargs`` (the sample's own values win). Samples of the other formats are returned as is."""
    messages_key = config.get("messages_key", "messages")
    if messages_key not in sample:
        return sample
    tools_key = config.get("tools_key", "tools")
    thinking_key = config.get("enable_thinking_key", "enable_thinking")
    renamed = {messages_key: "messages", tools_key: "tools"}
    chat = {renamed.get(key, key): value for key, value in sample.items() if key != thinking_key}
    template_kwargs = dict(config.get("apply_chat_template_kwargs", None) or {})
    thinking = sample.get(thinking_key, config.get("enable_thinking_default", None))
    if isinstance(thinking, str):  # verl's YAML default is the string "none"
        thinking = {"none": None, "null": None, "": None, "false": False, "true": True}.get(thinking.lower(), thinking)
    if thinking is not None:
        template_kwargs["enable_thinking"] = bool(thinking)
    if template_kwargs:
        chat["chat_template_kwargs"] = {**template_kwargs, **chat.get("chat_template_kwargs", {})}
    return chat
