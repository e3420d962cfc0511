"""The one shift rule of a causal LM: target alignment -> prediction alignment.

Batches carry targets and token weights *target-aligned* (index k of ``labels`` / ``token_weights``
belongs to token k, like ``input_ids``). A causal LM's hidden state k predicts token k+1, so the loss
needs them *prediction-aligned*: index k holds target k+1 and its weight; the last position of every
sequence (and, for packed sequences, of every sample) predicts nothing. ``mrloss.ops.api`` (``shift=True``),
``mrloss.parallel`` (sequence-parallel shards) and the integrations all use these functions.
"""
from __future__ import annotations

import torch


def shift_targets(targets: torch.Tensor, token_weights: torch.Tensor | None = None, *, ignore_index: int = -100,
                  cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target alignment -> prediction alignment along the last dimension T.

    targets [..., T] integer, token_weights [..., T] float or None. Returns (shifted_targets [..., T],
    shifted_weights [..., T] or None when token_weights is None): index k holds targets[..., k+1] and
    token_weights[..., k+1]; the last position gets ``ignore_index`` / weight 0, and so does the last
    position of every packed sample when ``cu_seqlens`` [S+1] (sample offsets along T) is given, so no
    sample predicts the next sample's first token. New tensors; the inputs are not modified.
    """
    if token_weights is not None and token_weights.shape != targets.shape:
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} != targets shape "
                         f"{tuple(targets.shape)}")
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


def valid_weight_sum(targets: torch.Tensor, token_weights: torch.Tensor | None = None, ignore_index: int = -100,
                     *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Σ of the weights of the targets a causal LM predicts (the ``normalizer`` of a batch): the
    shifted weights (``shift_targets``) where the shifted target is not ``ignore_index``, i.e.
    Σ token_weights[..., 1:] where targets[..., 1:] != ignore_index (without each packed sample's first
    token when ``cu_seqlens`` is given). targets [..., T] int64 (HF ``labels``), token_weights [..., T]
    float (None: all 1.0, a count) -> 0-dim float64 on targets' device (no host sync)."""
    shifted_targets, shifted_weights = shift_targets(targets, token_weights, ignore_index=ignore_index,
                                                     cu_seqlens=cu_seqlens)
    valid = shifted_targets != ignore_index
    if shifted_weights is None:
        return valid.sum(dtype=torch.float64)
    return torch.where(valid, shifted_weights.double(), 0.0).sum()


def _shift_left(values: torch.Tensor, fill, sample_ends: torch.Tensor | None) -> torch.Tensor:
    """out[..., k] = values[..., k+1]; ``fill`` at the last position and at ``sample_ends`` [S]."""
    shifted = torch.full_like(values, fill, memory_format=torch.contiguous_format)
    shifted[..., :-1] = values[..., 1:]
    if sample_ends is not None:
        shifted[..., sample_ends] = fill
    return shifted
