"""Row op of the chunked linear cross-entropy in plain PyTorch (runs anywhere).

The formula and the contract are documented once, in ``mrloss.ops.chunked``; the Triton kernel
``mrloss.ops.backends.triton.cross_entropy_rows`` computes the same thing. Math runs in float32 (float64 for
float64 logits), in place on the chunk where the dtype allows (the softmax overwrites the logits), so
the extra memory is at most two float32 copies of the ``[C, V]`` chunk (one for bf16/fp16 logits, one
more for the softcap factor) and none for float32 logits without softcap.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype


class VocabShard(NamedTuple):
    """The logits are columns ``[start, start + V_local)`` of a vocabulary of ``vocab_size`` split over ranks.

    all_reduce_max(row_max [C]) -> [C] and all_reduce_sum(stats [k, C]) -> [k, C]: the row statistics over
    every shard (``mrloss.parallel_vocab`` passes collectives; the backend knows nothing of them)."""

    start: int
    vocab_size: int
    all_reduce_max: Callable[[torch.Tensor], torch.Tensor]
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_scales: torch.Tensor | None,
    *,
    softcap: float | None,
    label_smoothing: float,
    vocab_shard: VocabShard | None = None,
) -> torch.Tensor:
    """Per-row loss of ``logits [C, V]`` against ``targets [C]``; with ``grad_scales [C]`` also
    overwrites ``logits`` with dL/dlogits. See ``mrloss.ops.chunked`` for the formula.

    vocab_shard: ``logits [C, V_local]`` are one shard of the vocabulary (targets are global ids): the row
    max, Σexp, target logit and (label smoothing) Σz are reduced over the shards, so losses are those of the
    whole vocabulary and the gradient is that of this shard's columns."""
    vocab_size = logits.shape[1] if vocab_shard is None else vocab_shard.vocab_size
    acc_dtype = accumulation_dtype(logits.dtype)
    z = logits if logits.dtype == acc_dtype else logits.to(acc_dtype)  # may alias logits (scratch)
    softcap_factor = None
    if softcap is not None:
        z = z.div_(softcap).tanh_()
        if grad_scales is not None:
            softcap_factor = 1 - z.square()  # d(c tanh(a/c))/da = 1 - tanh^2
        z = z.mul_(softcap)
    targets, in_shard = _local_targets(targets, logits.shape[1], vocab_shard)
    target_logits = z.gather(1, targets[:, None]).squeeze(1)
    sum_z = z.sum(1) if label_smoothing else None
    row_max = z.amax(1)
    if vocab_shard is not None:
        target_logits = torch.where(in_shard, target_logits, 0)
        row_max = vocab_shard.all_reduce_max(row_max)
    probs = z.sub_(row_max[:, None]).exp_()  # unnormalized softmax, in place: no [C, V] temporary
    sum_exp = probs.sum(1)
    if vocab_shard is not None:  # one collective for the [2 or 3, C] row statistics
        stats = vocab_shard.all_reduce_sum(torch.stack([sum_exp, target_logits, *([sum_z] if label_smoothing else [])]))
        sum_exp, target_logits, sum_z = stats[0], stats[1], stats[2] if label_smoothing else None
    losses = -(1 - label_smoothing) * target_logits
    if label_smoothing:
        losses = losses - label_smoothing / vocab_size * sum_z
    losses = losses + row_max + sum_exp.log()  # + logsumexp (the whole vocabulary's, also for a shard)
    if grad_scales is None:
        return losses

    grad = probs.div_(sum_exp[:, None])  # softmax
    if label_smoothing:
        grad.sub_(label_smoothing / vocab_size)
    target_grad = grad.new_full((grad.shape[0], 1), label_smoothing - 1)
    if in_shard is not None:  # the target column lives on another shard
        target_grad = target_grad * in_shard[:, None]
    grad.scatter_add_(1, targets[:, None], target_grad)
    if softcap_factor is not None:
        grad.mul_(softcap_factor)
    grad.mul_(grad_scales.to(acc_dtype)[:, None])
    if grad is not logits:
        logits.copy_(grad)
    return losses


def _local_targets(targets: torch.Tensor, local_vocab: int, vocab_shard: VocabShard | None):
    """(targets as column indices of this shard's logits [C] (0 where not in it), in_shard [C] bool or None)."""
    if vocab_shard is None:
        return targets, None
    local = targets - vocab_shard.start
    in_shard = (local >= 0) & (local < local_vocab)
    return torch.where(in_shard, local, 0), in_shard
