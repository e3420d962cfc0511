"""Region statistics: per-region-type counts, weight sums, losses and gradient shares of one batch.

Used by the monitor (`mrloss.debug.monitor`), the region step tracker (`mrloss.weighting.tracker`) and the
evaluation (`mrloss.training.evaluate`). The learned-token rule is `mrloss.ops.normalization.learned_mask`.

Statistics of one batch, per region type (plus ``(outside)`` for tokens outside every region), over the
non-padding tokens (``attention_mask`` = 1):
  - ``tokens``: tokens of the type;
  - ``learned_tokens``: those with weight > 0 (and a label other than ``ignore_index`` when ``labels`` is in the
    batch), never the first token of a row (nothing predicts it);
  - ``weight_sum``: Σw over the learned tokens;
  - ``mean_loss`` (token losses given): the plain mean of their token losses (unweighted, so that changing
    the weights does not move it; None without learned tokens) — what ``RegionWeighting.update`` takes;
  - ``grad_share``: the type's share of the effective gradient, Σ(w·l) of the type / Σ(w·l) of the batch:
    the fraction of the weighted loss (and so of its gradient signal) that the type contributes; without
    token losses, Σw of the type / Σw of the batch. None when the denominator is 0.
``total`` holds the same for the whole batch, plus ``weighted_loss`` = Σ(w·l) / Σw (the batch's loss under
its own normaliser).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from mrloss.formats.regions import OUTSIDE
from mrloss.ops.normalization import IGNORE_INDEX, learned_mask


def region_statistics(
    token_weights: torch.Tensor,
    region_type_ids: torch.Tensor,
    region_types: Sequence[str],
    *,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    token_losses: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """``{"regions": {type: stats}, "total": stats}`` of one batch (see the module docstring).

    All tensors ``[B, T]`` (or any one shape; a 1-D one is one packed row), target-aligned: token_weights
    float, region_type_ids int64 in ``[-1, len(region_types))``, attention_mask 0/1, labels int64
    (``ignore_index`` = not learned), token_losses float.
    """
    ids = _checked_region_ids(
        token_weights.shape,
        region_type_ids,
        region_types,
        {
            "region_type_ids": region_type_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "token_losses": token_losses,
        },
    )
    weights = token_weights.detach().double()
    valid = (
        torch.ones(weights.shape, dtype=torch.bool, device=weights.device)
        if attention_mask is None
        else attention_mask.detach().bool()
    )
    # the learned-token rule; target-aligned rows: nothing predicts a row's first token
    learned = valid & learned_mask(
        None if labels is None else labels.detach(), weights, ignore_index, target_aligned=True
    )
    columns = _bucket_columns(ids, len(region_types), weights, valid, learned, token_losses)
    share_total = sum(columns["share_of"])
    with_loss = token_losses is not None
    names = list(region_types) + [OUTSIDE]
    regions = {
        name: _entry({key: column[i] for key, column in columns.items()}, share_total, with_loss)
        for i, name in enumerate(names)
    }
    total = _entry({key: sum(column) for key, column in columns.items()}, share_total, with_loss)
    if with_loss:
        total["weighted_loss"] = share_total / total["weight_sum"] if total["weight_sum"] > 0 else None
    return {"regions": regions, "total": total}


def _checked_region_ids(
    shape: torch.Size, region_type_ids: torch.Tensor, region_types: Sequence[str], tensors: dict
) -> torch.Tensor:
    """``region_type_ids`` as int64 after checking every given tensor has ``shape`` and every id lies in
    ``[-1, len(region_types))``; tensors: name -> tensor or None (None: not given)."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != token_weights shape {tuple(shape)}")
    n_types = len(region_types)
    ids = region_type_ids.detach().long()
    if bool(((ids < -1) | (ids >= n_types)).any()):
        raise ValueError(f"region_type_ids holds values outside [-1, {n_types}) (region_types: {list(region_types)})")
    return ids


def _bucket_columns(
    ids: torch.Tensor,
    n_types: int,
    weights: torch.Tensor,
    valid: torch.Tensor,
    learned: torch.Tensor,
    token_losses: torch.Tensor | None,
) -> dict[str, list[float]]:
    """Per-bucket float64 sums, one list of ``n_types + 1`` a column (bucket ``n_types``: outside every
    region): ``tokens`` (valid), ``learned_tokens``, ``weight_sum``, ``share_of`` (Σ w·l, or Σ w without
    losses) and, with token_losses, ``loss_sum``. All tensors one shape; weights float64, masks bool."""
    bucket = torch.where(ids >= 0, ids, n_types)

    def per_bucket(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
        sums = torch.zeros(n_types + 1, dtype=torch.float64, device=weights.device)
        return sums.index_add_(0, bucket[mask], values[mask].double()).tolist()

    ones = torch.ones_like(weights)
    columns = {
        "tokens": per_bucket(ones, valid),
        "learned_tokens": per_bucket(ones, learned),
        "weight_sum": per_bucket(weights, learned),
    }
    if token_losses is not None:
        losses = token_losses.detach().double()
        columns["loss_sum"] = per_bucket(losses, learned)
        columns["share_of"] = per_bucket(weights * losses, learned)
    else:
        columns["share_of"] = columns["weight_sum"]
    return columns


def _entry(values: dict[str, float], share_total: float, with_loss: bool) -> dict:
    """One region's (or the total's) stats from its column sums; share_total: Σ share_of over all buckets."""
    stats = {
        "tokens": int(values["tokens"]),
        "learned_tokens": int(values["learned_tokens"]),
        "weight_sum": values["weight_sum"],
        "grad_share": values["share_of"] / share_total if share_total > 0 else None,
    }
    if with_loss:
        stats["mean_loss"] = values["loss_sum"] / stats["learned_tokens"] if stats["learned_tokens"] else None
    return stats


def batch_region_statistics(
    batch: Mapping[str, torch.Tensor],
    region_types: Sequence[str],
    token_values: torch.Tensor | None,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """`region_statistics` of a collator batch (``token_weights``, ``region_type_ids``, optionally
    ``attention_mask`` and ``labels``) with ``token_values [B, T]`` (token losses, or a token metric) as the losses."""
    return region_statistics(
        batch["token_weights"],
        batch["region_type_ids"],
        region_types,
        attention_mask=batch.get("attention_mask"),
        labels=batch.get("labels"),
        token_losses=token_values,
        ignore_index=ignore_index,
    )


def region_loss_sums(record: Mapping, region_types: Sequence[str]) -> torch.Tensor:
    """``[2, len(region_types)]`` float64 (CPU) of a `region_statistics` record (with token losses): row 0 the
    Σ of the learned tokens' losses of each type, row 1 their count. Sums add up over batches and ranks."""
    sums = torch.zeros(2, len(region_types), dtype=torch.float64)
    for index, name in enumerate(region_types):
        stats = record["regions"][name]
        if stats["learned_tokens"]:
            sums[0, index] = stats["mean_loss"] * stats["learned_tokens"]
            sums[1, index] = stats["learned_tokens"]
    return sums


def mean_region_losses(sums: torch.Tensor, region_types: Sequence[str]) -> dict[str, float]:
    """``{type: mean token loss}`` of `region_loss_sums` (summed); types without learned tokens left out."""
    return {name: float(sums[0, i] / sums[1, i]) for i, name in enumerate(region_types) if sums[1, i] > 0}
