"""Normalization and the learned-token rule: the one place for each rule the loss, parallel, metrics, HF and
verl share.

- ``IGNORE_INDEX``: the target that is no target (-100, the HF convention; defined in ``mrloss.ops.options``).
- Learned token (`learned_mask`): a valid target (not ``ignore_index``) with weight > 0. Only learned tokens
  cost matmul work in the fused loss and count in the region statistics.
- Normalizer (`valid_weight_sum`, `check_normalizer`, `normalizer_tensor`, `weight_scales`): the loss is
  Σ w·l / normalizer, the normalizer being Σ of the valid weights (of the batch, of the optimizer step, or of
  the SP group) unless given; `safe_divide` gives 0 (and zero gradients) when it is <= 0, NaN when it is NaN.
- Shift rule (`shift_targets`), below: target alignment -> prediction alignment.

The shift rule of a causal LM: target alignment -> prediction alignment.

Batches carry targets and token weights *target-aligned* (index k of ``labels`` / ``token_weights``
belongs to token k, like ``input_ids``). A causal LM's hidden state k predicts token k+1, so the loss
needs them *prediction-aligned*: index k holds target k+1 and its weight; the last position of every
sequence (and, for packed sequences, of every sample) predicts nothing. ``mrloss.ops.api`` (``shift=True``),
``mrloss.parallel`` (sequence-parallel shards) and the integrations all use these functions.
"""

from __future__ import annotations

import math

import torch

from mrloss.ops.options import IGNORE_INDEX


def shift_targets(
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target alignment -> prediction alignment along the last dimension T.

    targets [..., T] integer, token_weights [..., T] float or None. Returns (shifted_targets [..., T],
    shifted_weights [..., T] or None when token_weights is None): index k holds targets[..., k+1] and
    token_weights[..., k+1]; the last position gets ``ignore_index`` / weight 0, and so does the last
    position of every packed sample when ``cu_seqlens`` [S+1] (sample offsets along T) is given, so no
    sample predicts the next sample's first token. New tensors; the inputs are not modified.
    """
    if token_weights is not None and token_weights.shape != targets.shape:
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} != targets shape {tuple(targets.shape)}")
    if targets.dim() == 0:
        raise ValueError("shifting needs targets with a sequence dimension, got a 0-dim tensor")
    sample_ends = None
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must have shape [S+1], got {tuple(cu_seqlens.shape)}")
        sample_ends = cu_seqlens[1:].to(device=targets.device, dtype=torch.long) - 1
    shifted_targets = _shift_left(targets, ignore_index, sample_ends)
    shifted_weights = None if token_weights is None else _shift_left(token_weights, 0, sample_ends)
    return shifted_targets, shifted_weights


def learned_mask(
    targets: torch.Tensor | None,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    target_aligned: bool = False,
) -> torch.Tensor:
    """The learned-token rule: ``targets != ignore_index`` and ``token_weights > 0`` (either may be None:
    that half of the rule is left out; not both). ``target_aligned``: the tensors are target-aligned rows
    [..., T], whose index 0 nothing predicts, so it is never learned (the shift rule). Bool, shape of the
    inputs; a new tensor."""
    if targets is None and token_weights is None:
        raise ValueError("learned_mask needs targets or token_weights")
    learned = None if token_weights is None else token_weights > 0
    if targets is not None:
        valid = targets != ignore_index
        learned = valid if learned is None else learned & valid
    if target_aligned and learned.dim() > 0:
        learned[..., 0] = False
    return learned


def valid_weight_sum(
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    cu_seqlens: torch.Tensor | None = None,
    shift: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Σ of the weights of the targets a causal LM predicts (the ``normalizer`` of a batch): the
    shifted weights (``shift_targets``) where the shifted target is not ``ignore_index``, i.e.
    Σ token_weights[..., 1:] where targets[..., 1:] != ignore_index (without each packed sample's first
    token when ``cu_seqlens`` is given). targets [..., T] int64 (HF ``labels``), token_weights [..., T]
    float (None: all 1.0, a count) -> 0-dim ``dtype`` on targets' device (no host sync).
    ``shift=False``: the targets and weights are prediction-aligned already (e.g. SP shards)."""
    if shift:
        targets, token_weights = shift_targets(targets, token_weights, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
    valid = targets != ignore_index
    if token_weights is None:
        return valid.sum(dtype=dtype)
    return torch.where(valid, token_weights.to(dtype), 0.0).sum()


def safe_divide(numerator, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, but 0 where denominator <= 0 (numerator * 0: zero gradients, no NaN from a zero
    denominator). A NaN denominator gives NaN (and NaN gradients), as a plain division would: a broken
    normalizer must not pass for "nothing to learn". No host sync."""
    not_positive = denominator <= 0
    return torch.where(not_positive, numerator * 0, numerator / torch.where(not_positive, 1, denominator))


def check_normalizer(normalizer, device: torch.device) -> None:
    """Accept None, a finite Python number >= 0, or a 0-dim tensor on ``device`` or the CPU (a tensor's
    value is not checked: that would be a host sync; it is used as given, <= 0 giving a loss of 0, NaN a NaN loss
    and NaN gradients). A Python NaN or inf is a ValueError."""
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a float or a 0-dim tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(
                f"device mismatch: hidden is on {device} but normalizer is on {normalizer.device} "
                "(a 0-dim normalizer may be on hidden's device or the CPU)"
            )
        if normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number, got a {normalizer.dtype} tensor")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"normalizer must be a float or a 0-dim tensor, got {type(normalizer).__name__}")
    if not math.isfinite(normalizer) or normalizer < 0:
        raise ValueError(f"normalizer must be a finite number >= 0 (the global sum of token weights), got {normalizer}")


def normalizer_tensor(normalizer: float | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalizer as a detached 0-dim ``dtype`` tensor on ``device`` (a CPU scalar is copied over)."""
    if isinstance(normalizer, torch.Tensor):
        return normalizer.detach().to(device=device, dtype=dtype)
    return torch.tensor(float(normalizer), dtype=dtype, device=device)


def weight_scales(
    learned_weights: torch.Tensor, normalizer, reduction: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-token scales s_i of the loss Σ s_i·l_i: w_i / normalizer ("mean" without one: / Σw; 0 when it is <= 0,
    NaN when it is NaN), or w_i for reduction "none" / "sum" without a normalizer. learned_weights [M] float
    (> 0, finite) -> [M] ``dtype`` (None: the weights' dtype).

    Computed as (w_i / m) / (denominator / m) with m = max w, in the wider of the weights' dtype and ``dtype``, so
    any finite positive scale of all weights gives the same loss: neither Σw nor 1/Σw over- or underflows (all
    weights 1e38, or 1e-42; float64 weights of 1e-300 next to float32 hidden are scaled before they are cast)."""
    dtype = dtype or learned_weights.dtype
    if reduction == "none" or (reduction == "sum" and normalizer is None) or learned_weights.numel() == 0:
        return learned_weights.to(dtype)
    learned_weights = learned_weights.to(torch.promote_types(learned_weights.dtype, dtype))
    top = learned_weights.amax()
    top = torch.where(top > 0, top, 1)  # weights that underflowed to 0 in the accumulation dtype
    unit_weights = learned_weights / top
    if normalizer is None:
        return safe_divide(unit_weights, unit_weights.sum()).to(dtype)
    if isinstance(normalizer, torch.Tensor):  # a float64 normalizer (e.g. Σw of huge weights) is divided in float64
        normalizer_dtype = torch.promote_types(normalizer.dtype, learned_weights.dtype)
    else:
        normalizer_dtype = learned_weights.dtype
    unit_normalizer = normalizer_tensor(normalizer, normalizer_dtype, learned_weights.device) / top
    return safe_divide(unit_weights, unit_normalizer.to(learned_weights.dtype)).to(dtype)


def _shift_left(values: torch.Tensor, fill, sample_ends: torch.Tensor | None) -> torch.Tensor:
    """out[..., k] = values[..., k+1]; ``fill`` at the last position and at ``sample_ends`` [S]."""
    shifted = torch.full_like(values, fill, memory_format=torch.contiguous_format)
    shifted[..., :-1] = values[..., 1:]
    if sample_ends is not None:
        shifted[..., sample_ends] = fill
    return shifted
