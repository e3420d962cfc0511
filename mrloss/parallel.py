"""Sequence parallelism for the weighted linear cross-entropy (any ``torch.distributed`` group).

Each rank of a sequence-parallel (SP) group holds a contiguous shard of the hidden states of one packed
sequence and computes the loss of *its own* shard with the fused loss; only two scalars cross ranks
(the local weighted sum and the local sum of weights, in ONE all-reduce). No logits, hidden states or
per-token values are gathered.

Sharding rule (the one of verl's ``ulysses_pad_and_slice_inputs``): targets and weights are shifted over
the WHOLE sequence first (position k predicts target k+1), then padded at the end to a multiple of the
group size and cut into equal contiguous slices, slice r going to group rank r. Padding carries
``ignore_index`` / weight 0, so it counts nowhere.

Normalization: ``loss = Σ_group Σ_shard w·l / normalizer`` with ``normalizer`` the global sum of weights
(default: the all-reduced Σw over the group's valid tokens). The value is the same on every rank.

Gradient scale (``grad_reduction``):
    "mean": d loss / d local_sum = group_size / normalizer. For wrappers that AVERAGE parameter
            gradients over ranks (FSDP, DDP, verl's FSDP engine): the average over the group is then
            the exact gradient. This is what verl does: its ``gather_outputs_and_unpad`` (Gather with
            grad_scaler=True) multiplies the gradient of the gathered log-probs by the SP size, and
            ``sft_loss`` divides by the data-parallel token count times ``dp_size`` (pass
            ``normalizer = global_sum_of_weights / dp_size`` there), so that FSDP's mean over all
            dp*sp ranks gives d(Σ w·l / Σ w)/dθ.
    "sum":  d loss / d local_sum = 1 / normalizer: each rank gets exactly its shard's share
            (d loss / d hidden_shard is exact); SUM parameter gradients over the group.

With ``vocab_parallel`` the LM head is also split by vocabulary rows (tensor parallelism,
`mrloss.parallel_vocab`): each shard's local sum comes from the vocabulary-parallel loss over that group (row
statistics and one hidden-gradient all-reduce), then the two scalars are summed over the SP group as above.
Parameters replicated over the vocabulary group get identical gradients on its ranks: reduce them over the
data/sequence ranks only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from mrloss.ops.api import fused_linear_cross_entropy
from mrloss.ops.normalization import (  # shift_targets: the shift rule; also importable from here (verl engine)
    IGNORE_INDEX,
    check_normalizer,
    normalizer_tensor,
    safe_divide,
    shift_targets,
    valid_weight_sum,
)
from mrloss.ops.options import LossOptions, loss_options
from mrloss.ops.output import LossOutput
from mrloss.parallel_vocab import VocabParallelOptions, vocab_parallel_linear_cross_entropy

GRAD_REDUCTIONS = ("mean", "sum")


def group_size_and_rank(group=None) -> tuple[int, int]:
    """(size, rank) of ``group`` in it; (1, 0) for group=None (no sequence parallelism, verl's convention:
    pass ``torch.distributed.group.WORLD`` to shard over every rank)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def pad_and_slice(tensor: torch.Tensor, group=None, *, dim: int = -1, pad_value=0) -> torch.Tensor:
    """This rank's shard of ``tensor`` along ``dim``: pad the end to a multiple of the group size with
    ``pad_value``, then take the rank-th of the equal contiguous slices (verl's Ulysses rule)."""
    size, rank = group_size_and_rank(group)
    length = tensor.shape[dim]
    pad = (-length) % size
    if pad:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = pad
        tensor = torch.cat([tensor, tensor.new_full(pad_shape, pad_value)], dim=dim)
    part = tensor.shape[dim] // size
    return tensor.narrow(dim, rank * part, part).contiguous()


def shard_targets(
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    group=None,
    *,
    ignore_index: int = IGNORE_INDEX,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift full-sequence targets/weights [..., T] (``mrloss.ops.normalization.shift_targets``; token_weights
    None: all 1.0), then take this rank's shard (``pad_and_slice``): the targets/weights that line up with
    this rank's hidden-state shard."""
    if token_weights is None:
        token_weights = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    shifted_targets, shifted_weights = shift_targets(
        targets, token_weights, ignore_index=ignore_index, cu_seqlens=cu_seqlens
    )
    return (
        pad_and_slice(shifted_targets, group, pad_value=ignore_index),
        pad_and_slice(shifted_weights, group, pad_value=0),
    )


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (SUM) of [local_sum, local_weight_sum, local_z_loss] in one collective; the gradient of the
    summed loss flows back to ``local_sum`` multiplied by ``grad_scale`` (no communication in backward)."""

    @staticmethod
    def forward(ctx, local_sum, local_weight_sum, local_z_loss, group, grad_scale):
        ctx.grad_scale = grad_scale
        packed = torch.stack([value.detach().float() for value in (local_sum, local_weight_sum, local_z_loss)])
        if group is not None:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return tuple(value.clone() for value in packed)

    @staticmethod
    def backward(ctx, grad_sum, grad_weight_sum, grad_z_loss):
        return grad_sum * ctx.grad_scale, None, None, None, None


def sequence_parallel_linear_cross_entropy(
    hidden_shard: torch.Tensor,
    weight: torch.Tensor,
    targets_shard: torch.Tensor,
    token_weights_shard: torch.Tensor | None = None,
    *,
    group=None,
    normalizer: float | torch.Tensor | None = None,
    grad_reduction: str = "mean",
    bias: torch.Tensor | None = None,
    vocab_parallel: VocabParallelOptions | None = None,
    options: LossOptions | None = None,
    **keywords,
) -> torch.Tensor | LossOutput:
    """Weighted mean cross-entropy of a sequence split over the ranks of ``group``.

    Args:
        hidden_shard: [N_local, H] bf16|fp16|fp32, this rank's shard; weight: [V, H]; bias: [V] or None.
        targets_shard, token_weights_shard: [N_local] int64 and float (None: all 1.0), already shifted and
            sharded (`shard_targets`), so row i of hidden_shard predicts targets_shard[i].
        group: the SP process group (None: no sequence parallelism, nothing is communicated).
        normalizer: the global Σw of the optimizer step (None: Σw of the valid tokens of the whole group; a float
            must be >= 0, a 0-dim tensor, on the device or the CPU, is used as given, without a host sync).
        grad_reduction: "mean" or "sum", the gradient scale (see the module docstring).
        vocab_parallel: `mrloss.parallel_vocab.VocabParallelOptions` when ``weight`` [V_r, H] (and ``bias``) is
            this rank's vocabulary shard; None: the whole head.
        options, keywords: a `mrloss.ops.options.LossOptions` and/or its fields as keywords (keywords win), as in
            `mrloss.linear_cross_entropy`; reduction "mean" and shift False only (the loss is Σ_group Σ w·l /
            normalizer of pre-shifted shards).

    Returns:
        The fp32 0-dim loss Σ_group Σ w·(l + zeta·lse²) / normalizer (0 when the normalizer is <= 0), identical
        on every rank, with the gradient scale of ``grad_reduction``; or, with a return_* option, a `LossOutput`:
        z_loss normalized like the loss (over the group), token_losses and token_metrics of this shard.
    """
    options = loss_options(keywords, caller="sequence_parallel_linear_cross_entropy", base=options)
    _check_shards(hidden_shard, targets_shard, token_weights_shard, normalizer, grad_reduction, options)
    if token_weights_shard is None:
        token_weights_shard = torch.ones(targets_shard.shape, dtype=torch.float32, device=targets_shard.device)
    local_options = dataclasses.replace(options, reduction="sum", return_z_loss=True)
    inputs = (hidden_shard, weight, targets_shard, token_weights_shard)
    if vocab_parallel is None:
        local = fused_linear_cross_entropy(*inputs, local_options, bias=bias)
    else:
        local = vocab_parallel_linear_cross_entropy(
            *inputs, vocab_parallel=vocab_parallel, bias=bias, options=local_options
        )
    local_weight_sum = valid_weight_sum(
        targets_shard, token_weights_shard, options.ignore_index, shift=False, dtype=torch.float32
    )
    size, _ = group_size_and_rank(group)
    total_sum, total_weights, total_z_loss = _SumOverGroup.apply(
        local.loss.float(), local_weight_sum, local.z_loss, group, float(size) if grad_reduction == "mean" else 1.0
    )
    denom = total_weights if normalizer is None else normalizer_tensor(normalizer, torch.float32, total_sum.device)
    loss = safe_divide(total_sum, denom)
    if not options.returns_output:
        return loss
    z_loss = safe_divide(total_z_loss, denom) if options.return_z_loss else None
    return dataclasses.replace(local, loss=loss, z_loss=z_loss)


def _check_shards(hidden_shard, targets_shard, token_weights_shard, normalizer, grad_reduction, options) -> None:
    """The checks of `sequence_parallel_linear_cross_entropy` beyond those of the local loss."""
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
    if options.reduction != "mean" or options.shift:
        raise ValueError(
            f"sequence_parallel_linear_cross_entropy: reduction {options.reduction!r}, shift {options.shift}: the "
            'loss is Σ w·l / normalizer of shards shifted before sharding (shard_targets); use reduction="mean", '
            "shift=False (and normalizer for another denominator)"
        )
    check_normalizer(normalizer, hidden_shard.device)
    weights_shape = targets_shard.shape if token_weights_shard is None else token_weights_shard.shape
    if hidden_shard.shape[:-1] != targets_shard.shape or weights_shape != targets_shard.shape:
        raise ValueError(
            f"hidden_shard {tuple(hidden_shard.shape)}, targets_shard {tuple(targets_shard.shape)} and "
            f"token_weights_shard {tuple(weights_shape)} do not line up: shard them together"
        )
