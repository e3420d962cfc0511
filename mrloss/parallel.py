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

With ``vocab_group`` the LM head is also split by vocabulary rows (tensor parallelism,
`mrloss.parallel_vocab`): each shard's local sum comes from the vocabulary-parallel loss over that group (row
statistics and one hidden-gradient all-reduce), then the two scalars are summed over the SP group as above.
Parameters replicated over the vocabulary group get identical gradients on its ranks: reduce them over the
data/sequence ranks only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mrloss.ops.api import linear_cross_entropy
from mrloss.ops.normalization import (  # shift_targets: the shift rule; also importable from here (verl engine)
    IGNORE_INDEX,
    check_normalizer,
    normalizer_tensor,
    safe_divide,
    shift_targets,
    valid_weight_sum,
)
from mrloss.parallel_vocab import vocab_parallel_linear_cross_entropy

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
    """All-reduce (SUM) of [local_sum, local_weight_sum] in one collective; the gradient of the summed
    loss flows back to ``local_sum`` multiplied by ``grad_scale`` (no communication in backward)."""

    @staticmethod
    def forward(ctx, local_sum, local_weight_sum, group, grad_scale):
        ctx.grad_scale = grad_scale
        packed = torch.stack([local_sum.detach().float(), local_weight_sum.detach().float()])
        if group is not None:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return packed[0].clone(), packed[1].clone()

    @staticmethod
    def backward(ctx, grad_sum, grad_weight_sum):
        return grad_sum * ctx.grad_scale, None, None, None


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
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    return_token_losses: bool = False,
    vocab_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    memory: str = "fast",
    z_loss_scale: float = 0.0,
):
    """Weighted mean cross-entropy of a sequence split over the ranks of ``group``.

    hidden_shard [N_local, H] bf16|fp16|fp32 (this rank's shard); weight [V, H]; targets_shard [N_local]
    int64 and token_weights_shard [N_local] float, already shifted and sharded (``shard_targets``), so
    row i of hidden_shard predicts targets_shard[i]. group: the SP process group (None: no sequence
    parallelism, nothing is communicated). normalizer: the global Σw of the optimizer step (None: Σw of
    the valid tokens of the whole group; a float must be >= 0, a 0-dim tensor, on the device or the CPU,
    is used as given, without a host sync). Returns the fp32 0-dim loss Σ_group Σ w·l / normalizer (0 when
    the normalizer is <= 0), identical on every rank, with the gradient scale of ``grad_reduction`` (see the
    module docstring); with ``return_token_losses`` also this shard's detached unweighted per-token losses.
    vocab_group / vocab_start / vocab_size: ``weight`` [V_r, H] (and ``bias``) is this rank's vocabulary shard
    (see `mrloss.parallel_vocab.vocab_parallel_linear_cross_entropy`); None: the whole head.
    memory, z_loss_scale: as in `mrloss.linear_cross_entropy` (the z-loss is normalized like the loss).
    """
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
    check_normalizer(normalizer, hidden_shard.device)
    if token_weights_shard is None:
        token_weights_shard = torch.ones(targets_shard.shape, dtype=torch.float32, device=targets_shard.device)
    if hidden_shard.shape[:-1] != targets_shard.shape or token_weights_shard.shape != targets_shard.shape:
        raise ValueError(
            f"hidden_shard {tuple(hidden_shard.shape)}, targets_shard {tuple(targets_shard.shape)} and "
            f"token_weights_shard {tuple(token_weights_shard.shape)} do not line up: shard them together"
        )
    vocab_parallel = (
        {} if vocab_group is None else dict(vocab_group=vocab_group, vocab_start=vocab_start, vocab_size=vocab_size)
    )
    loss_fn = linear_cross_entropy if vocab_group is None else vocab_parallel_linear_cross_entropy
    out = loss_fn(
        hidden_shard,
        weight,
        targets_shard,
        token_weights_shard,
        **vocab_parallel,
        bias=bias,
        ignore_index=ignore_index,
        reduction="sum",
        softcap=softcap,
        label_smoothing=label_smoothing,
        shift=False,
        backend=backend,
        return_token_losses=return_token_losses,
        chunk_size=chunk_size,
        memory=memory,
        z_loss_scale=z_loss_scale,
    )
    local_sum, token_losses = out if return_token_losses else (out, None)
    local_weight_sum = valid_weight_sum(
        targets_shard, token_weights_shard, ignore_index, shift=False, dtype=torch.float32
    )
    size, _ = group_size_and_rank(group)
    total_sum, total_weights = _SumOverGroup.apply(
        local_sum.float(), local_weight_sum, group, float(size) if grad_reduction == "mean" else 1.0
    )
    denom = total_weights if normalizer is None else normalizer_tensor(normalizer, torch.float32, total_sum.device)
    loss = safe_divide(total_sum, denom)
    return (loss, token_losses) if return_token_losses else loss
