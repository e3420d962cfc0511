"""Vocabulary-parallel (tensor-parallel LM head) weighted linear cross-entropy (any ``torch.distributed`` group).

Each rank of a vocabulary-parallel group holds the rows ``[start, start + V_r)`` of the LM-head weight
(``[V_r, H]``, uneven splits allowed; Megatron's ``VocabParallelEmbedding`` / ``ColwiseParallel`` layout) and the
same hidden states ``[N, H]``, targets and weights (replicated over the group). Per chunk of C learned tokens a
rank computes its logits shard ``[C, V_r]`` and the row op of ``mrloss.ops.backends.torch`` (the one formula,
``mrloss.ops.chunked``) reduces only row statistics over the group:

    all_reduce MAX  of the row max                                  C floats
    all_reduce SUM  of [Σexp, target logit (+ Σz: smoothing, + Σq·log q: entropy)]   2C to 4C floats

so every rank has the loss of the whole vocabulary, and the gradient of its own weight (and bias) shard. The
hidden-state gradient of the learned rows, a partial sum over the shards, is all-reduced once in backward
(N_learned·H values in hidden's dtype; any column-parallel head needs that one). No logits cross ranks: per step
``N_learned·(3 or 4)·4`` bytes of row statistics against ``N·V·bytes`` of logits for an all-gather (at N=16384,
V=128256, bf16: 0.19 MiB against 3.9 GiB; plus 128 MiB of hidden gradient at H=4096 in both).

The loss is the same on every rank; so are the hidden gradients (parameters replicated over the group get the
single-process gradient on every rank, no averaging over the group). Only learned tokens (valid target, weight
> 0) cost work; the row statistics run in PyTorch (the logits matmul is cuBLAS on a GPU; the Triton row kernel
has no shard statistics). z-loss uses the row op's logsumexp, the global one after the reduction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.distributed as dist

from mrloss.ops.api import autocast_inputs, check_inputs, learned_rows_loss
from mrloss.ops.backends.torch import VocabShard, cross_entropy_rows
from mrloss.ops.options import LossOptions, loss_options
from mrloss.ops.output import LossOutput

VOCAB_PARALLEL_BACKENDS = ("auto", "torch")


@dataclasses.dataclass(frozen=True)
class VocabParallelOptions:
    """This rank's shard of an LM head split by vocabulary rows (like Cut Cross-Entropy's ``VocabParallelOptions``).

    Attributes:
        vocab_group: the ``torch.distributed`` group the head is split over (None: one rank holds the whole head).
        vocab_start, vocab_size: this rank's weight shard [V_r, H] holds the rows ``[vocab_start, vocab_start +
            V_r)`` of a vocabulary of ``vocab_size``; both or neither (None: from the ranks' shard sizes in rank
            order, one all-gather per call).
    """

    vocab_group: Any = None
    vocab_start: int | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if (self.vocab_start is None) != (self.vocab_size is None):
            raise ValueError("vocab_start and vocab_size go together: give both or neither")


class _AllReduceGradient(torch.autograd.Function):
    """Identity in forward; the gradient is all-reduced (SUM) over ``group`` in backward (Megatron's
    ``copy_to_tensor_model_parallel_region``): each rank's hidden gradient is the part of its vocabulary shard."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def vocab_range(weight_shard: torch.Tensor, shard: VocabParallelOptions) -> tuple[int, int]:
    """(start, V) of this rank's rows: as ``shard`` gives them, or from the shard sizes all-gathered over its
    group (rank order; one collective of tp integers)."""
    group, vocab_start, vocab_size = shard.vocab_group, shard.vocab_start, shard.vocab_size
    if vocab_start is None:
        if group is None:
            return 0, weight_shard.shape[0]
        device = weight_shard.device  # NCCL gathers device tensors
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([weight_shard.shape[0]], dtype=torch.int64, device=device), group=group)
        sizes = [int(size) for size in sizes]
        vocab_start, vocab_size = sum(sizes[: dist.get_rank(group)]), sum(sizes)
    if not 0 <= vocab_start <= vocab_start + weight_shard.shape[0] <= vocab_size:
        raise ValueError(
            f"weight shard rows [{vocab_start}, {vocab_start + weight_shard.shape[0]}) are not inside the "
            f"vocabulary [0, {vocab_size})"
        )
    if group is None and weight_shard.shape[0] != vocab_size:
        raise ValueError(f"without a vocab_group the weight must be the whole head, [{vocab_size}, H]")
    return vocab_start, vocab_size


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    vocab_parallel: VocabParallelOptions | None = None,
    bias: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    options: LossOptions | None = None,
    **keywords,
) -> torch.Tensor | LossOutput:
    """`mrloss.linear_cross_entropy` over an LM head split by vocabulary rows across ``vocab_parallel.vocab_group``.

    Args:
        hidden: [..., H] fp16|bf16|fp32|fp64, the same on every rank of the group.
        weight_shard: [V_r, H] (V_r >= 1), hidden's dtype: this rank's rows of the [V, H] head.
        targets, token_weights: [...] global ids in [0, V) and weights, the same on every rank.
        vocab_parallel: the shard (`VocabParallelOptions`; None: one rank holds the whole head).
        bias: [V_r], this rank's bias shard, or None. normalizer: as in `linear_cross_entropy`.
        options, keywords: a `mrloss.ops.options.LossOptions` and/or its fields as keywords (keywords win); each
            means what it means in `linear_cross_entropy` (label smoothing's eps/V and the z-loss's logsumexp
            over the whole vocabulary); memory "fast" only (a shard's [V_r, H] buffer is 1/tp of the head's),
            backend "auto" or "torch" (see the module docstring).

    Returns:
        What `linear_cross_entropy` returns, for the whole vocabulary, identical on every rank; the gradient of
        weight_shard / bias is this shard's exact part, hidden's gradient the full one on every rank.
    """
    options = loss_options(keywords, caller="vocab_parallel_linear_cross_entropy", base=options)
    hidden, weight_shard, bias = autocast_inputs(hidden, weight_shard, bias)
    check_inputs(hidden, weight_shard, targets, token_weights, bias, normalizer, options)
    if options.backend not in VOCAB_PARALLEL_BACKENDS or options.memory != "fast":
        raise ValueError(
            f"backend {options.backend!r}, memory {options.memory!r}: the vocabulary-parallel loss runs its row "
            f'statistics in PyTorch with memory="fast"; expected a backend of {VOCAB_PARALLEL_BACKENDS}'
        )
    shard = vocab_parallel or VocabParallelOptions()
    vocab_start, vocab_size = vocab_range(weight_shard, shard)
    group = shard.vocab_group
    return learned_rows_loss(
        hidden,
        weight_shard,
        targets,
        token_weights,
        options,
        bias=bias,
        normalizer=normalizer,
        vocab_size=vocab_size,
        row_op=_row_op(group, vocab_start, vocab_size),
        fused_losses=None,
        slice_grad_op=None,
        learned_hidden=None if group is None else functools.partial(_learned_rows_all_reduced, group=group),
    )


def _learned_rows_all_reduced(hidden_2d: torch.Tensor, rows: torch.Tensor, *, group):
    """(hidden rows, their indices) for `learned_rows_loss`: with a gradient wanted, the learned rows only,
    their gradient all-reduced over ``group`` (M x H values, not N x H); else hidden_2d and rows unchanged."""
    if not (torch.is_grad_enabled() and hidden_2d.requires_grad):
        return hidden_2d, rows
    learned_rows = _AllReduceGradient.apply(hidden_2d.index_select(0, rows), group)
    return learned_rows, torch.arange(rows.numel(), device=rows.device)


def _row_op(group, vocab_start: int, vocab_size: int):
    """The PyTorch row op on this rank's vocabulary columns, its row statistics reduced over ``group``."""
    if group is None:
        return cross_entropy_rows

    def all_reduce(tensor, op):
        dist.all_reduce(tensor, op=op, group=group)
        return tensor

    shard = VocabShard(
        vocab_start,
        vocab_size,
        functools.partial(all_reduce, op=dist.ReduceOp.MAX),
        functools.partial(all_reduce, op=dist.ReduceOp.SUM),
    )
    return functools.partial(cross_entropy_rows, vocab_shard=shard)


def local_head(
    lm_head: torch.nn.Module, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, VocabParallelOptions | None]:
    """(weight, bias, vocab_parallel) of ``lm_head`` (a linear layer [V, H]) as this rank holds it: plain
    tensors, and the `VocabParallelOptions` of the shard when the head is split by vocabulary rows (None when
    it is not).

    - ``weight`` a DTensor (``torch.distributed.tensor.parallel.ColwiseParallel``): Shard(0) on one mesh
      dimension, Replicate on the others -> that dimension's group, offsets from the DTensor layout; all
      Replicate -> the local tensor is the whole head. Other layouts: TypeError. The local tensors are
      differentiable views (``to_local``): their gradients reach the DTensor parameters.
    - transformers' ``tp_plan`` (``lm_head._hf_tp_plan`` "colwise*", plain local tensors cut at
      ceil(V / tp) rows per rank) -> the group of ``lm_head._hf_device_mesh``; V is ``vocab_size``.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if isinstance(weight, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = weight.placements
        sharded = [dim for dim, placement in enumerate(placements) if placement != Replicate()]
        local = weight.to_local(), None if bias is None else bias.to_local()
        if not sharded:
            return (*local, None)
        if len(sharded) > 1 or placements[sharded[0]] != Shard(0):
            raise TypeError(
                f"lm_head weight is a DTensor with placements {placements}: mrloss supports a head split by "
                "vocabulary rows (Shard(0), ColwiseParallel) on one mesh dimension, or a replicated one"
            )
        mesh = weight.device_mesh
        _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
        group = mesh.get_group(sharded[0])
        return (*local, VocabParallelOptions(group, offset[0], weight.shape[0]))
    plan = getattr(lm_head, "_hf_tp_plan", None)
    mesh = getattr(lm_head, "_hf_device_mesh", None)
    if plan is None or mesh is None or mesh.size() == 1:
        return weight, bias, None
    if not str(plan).startswith("colwise"):
        raise TypeError(f"lm_head tp_plan {plan!r}: mrloss supports a head split by vocabulary rows (colwise)")
    start = mesh.get_local_rank() * math.ceil(vocab_size / mesh.size())
    return weight, bias, VocabParallelOptions(mesh.get_group(), start, vocab_size)
