"""MultiRegionCollator: dataset items -> padded or packed ``[B, T]`` batch tensors."""

from __future__ import annotations

import operator

import torch

from mrloss.data.encode import unlearn_first_token
from mrloss.ops.normalization import IGNORE_INDEX, learned_mask


class MultiRegionCollator:
    """Pads (one sample per row, right padding) or packs (several samples per row) dataset items.

    Items: dicts with 1-D ``input_ids`` and ``token_weights`` (same length) and optionally
    ``region_type_ids`` (-1 when absent). The batch:

    - ``input_ids [B, T] int64`` (``pad_token_id`` on padding), ``attention_mask [B, T] int64`` (1 on tokens),
    - ``labels [B, T] int64``: ``input_ids`` where the token is learned (weight > 0), else ``IGNORE_INDEX``
      (padding included),
    - ``token_weights [B, T] float32`` (0 on padding), ``region_type_ids [B, T] int64`` (-1 on padding).

    The first token of every sample gets weight 0 and label ``IGNORE_INDEX`` (the first-token rule of
    `mrloss.data.encode.unlearn_first_token`: nothing in the sample predicts it), so
    with ``pack=True`` no sample's loss has another sample's token as a target. ``pack=True`` also returns
    ``position_ids [B, T]`` restarting at 0 for every sample and for each row's padding, and, for
    flash-attn varlen over the row-major flattened batch, ``cu_seq_lens_q`` / ``cu_seq_lens_k``
    (``[S + 1] int32``, segment starts, padding runs counted as segments) and ``max_length_q`` /
    ``max_length_k`` (int). Attention isolation between packed samples is up to the model: use those
    varlen arguments (and no ``attention_mask``) with flash attention.

    ``max_length``: no row may be longer (in pack mode it is the row capacity; samples are packed in order,
    a new row starting when the next sample does not fit); a longer sample raises ValueError (truncate in
    the dataset). Without it, pack mode puts every sample in one row. ``pad_to_multiple_of`` rounds ``T`` up.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        pack: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        try:
            pad_token_id = operator.index(pad_token_id)
        except TypeError:
            kind = "a tokenizer" if hasattr(pad_token_id, "pad_token_id") else repr(pad_token_id)
            raise TypeError(
                f"MultiRegionCollator(pad_token_id): expected an int, got {kind}; pass tokenizer.pad_token_id "
                "(set tokenizer.pad_token = tokenizer.eos_token first when it is None)"
            ) from None
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pack = pack
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        samples = [self._sample(index, item) for index, item in enumerate(items)]
        rows = self._rows(samples) if self.pack else [[sample] for sample in samples]
        width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), width)
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.int64),
            "attention_mask": torch.zeros(shape, dtype=torch.int64),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.int64),
            "token_weights": torch.zeros(shape, dtype=torch.float32),
            "region_type_ids": torch.full(shape, -1, dtype=torch.int64),
        }
        if self.pack:
            batch["position_ids"] = torch.zeros(shape, dtype=torch.int64)
        segment_lengths = []
        for row_index, row in enumerate(rows):
            start = 0
            for sample in row:
                end = start + len(sample["input_ids"])
                for key in ("input_ids", "token_weights", "region_type_ids"):
                    batch[key][row_index, start:end] = sample[key]
                batch["attention_mask"][row_index, start:end] = 1
                if self.pack:
                    batch["position_ids"][row_index, start:end] = torch.arange(end - start)
                segment_lengths.append(end - start)
                start = end
            if start < width:
                if self.pack:
                    batch["position_ids"][row_index, start:] = torch.arange(width - start)
                segment_lengths.append(width - start)
        learned = learned_mask(None, batch["token_weights"])
        batch["labels"] = torch.where(learned, batch["input_ids"], batch["labels"])
        if self.pack:
            cu_seq_lens = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
            cu_seq_lens[1:] = torch.tensor(segment_lengths, dtype=torch.int32).cumsum(0)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
            batch["max_length_q"] = batch["max_length_k"] = max(segment_lengths)
        return batch

    def _sample(self, index: int, item: dict) -> dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(item["input_ids"], dtype=torch.int64)
        token_weights = torch.as_tensor(item["token_weights"], dtype=torch.float32).clone()
        region_type_ids = item.get("region_type_ids")
        region_type_ids = (
            torch.full_like(input_ids, -1)
            if region_type_ids is None
            else torch.as_tensor(region_type_ids, dtype=torch.int64)
        )
        length = input_ids.numel()
        if input_ids.dim() != 1 or length == 0:
            raise ValueError(
                f"item {index}: input_ids must be a non-empty 1-D sequence, got shape {tuple(input_ids.shape)}"
            )
        if token_weights.shape != input_ids.shape or region_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"item {index}: token_weights {tuple(token_weights.shape)} and region_type_ids "
                f"{tuple(region_type_ids.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if self.max_length is not None and length > self.max_length:
            raise ValueError(
                f"item {index}: {length} tokens, more than max_length {self.max_length}; "
                "truncate in the dataset (MultiRegionDataset(max_length=...))"
            )
        unlearn_first_token(token_weights)  # items from encode have it already; others get it here
        return {"input_ids": input_ids, "token_weights": token_weights, "region_type_ids": region_type_ids}

    def _rows(self, samples: list[dict]) -> list[list[dict]]:
        if self.max_length is None:
            return [samples]
        rows, used = [[]], 0
        for sample in samples:
            length = len(sample["input_ids"])
            if rows[-1] and used + length > self.max_length:
                rows.append([])
                used = 0
            rows[-1].append(sample)
            used += length
        return rows
