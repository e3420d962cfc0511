"""Public API of the fused, zero-weight-skipping weighted linear cross-entropy.

``linear_cross_entropy`` validates its arguments, aligns targets and weights (``shift``, with the one
shift rule of ``mrloss.ops.normalization``), compacts the *learned* tokens (valid target and weight > 0: only
they cost matmul work), and runs one ``torch.autograd.Function`` (``mrloss.ops.function``) over the chunk driver
``mrloss.ops.chunked`` with a backend row op (``mrloss.ops.backends.torch`` or the Triton kernel
``mrloss.ops.backends.triton.cross_entropy_rows``). With the Triton backend, passes that need losses only (no
gradient wanted, or the forward of reduction "none"; token metrics included) run the fused kernel
``mrloss.ops.backends.triton.linear_cross_entropy_forward`` instead: no logits chunk, O(N) extra memory. The
formula is the one of ``mrloss.ops.reference``.

For reduction "mean"/"sum" (and ``normalizer``) the upstream gradient is a scalar, so the gradients are
computed during the forward pass (~6·N_learned·H·V FLOPs in all) and backward only scales them, in
place (so one backward per forward: a second one through the same graph raises RuntimeError).
For "none" the forward computes losses only and backward re-runs the chunks with per-token scales.
``memory="low"`` never holds a float32 ``[V, H]`` buffer: the forward is a loss-only pass that keeps each
row's logsumexp, and backward builds the gradients slice by slice of the vocabulary (``mrloss.ops.low_memory``,
~8·N_learned·H·V FLOPs in all), the weight gradient accumulated in float32 and written once in its dtype.
"""

from __future__ import annotations

import math
import os
import typing
from typing import Callable

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype
from mrloss.ops.chunked import (
    FusedLosses,
    RowOp,
    RowOptions,
    RowStats,
    SliceGradOp,
    TokenMetrics,
    chunked_linear_cross_entropy,
    default_chunk_size,
)
from mrloss.ops.function import LinearCrossEntropyFunction, Plan
from mrloss.ops.normalization import check_normalizer, learned_mask, shift_targets, weight_scales
from mrloss.ops.options import IGNORE_INDEX, Backend, LossOptions, Memory, Reduction, loss_options
from mrloss.ops.output import LossOutput

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    shift: bool = False,
    backend: Backend = "auto",
    return_token_losses: bool = False,
    chunk_size: int | None = None,
    memory: Memory = "fast",
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_metrics: bool = False,
) -> torch.Tensor | LossOutput:
    """Weighted cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``targets``, without ever
    materializing the ``[N, V]`` logits: l_i = lse_i - (1 - eps) z_i[t_i] - eps/V sum_j z_i[j] (+ zeta lse_i^2),
    z_i = softcap(h_i W^T + b), lse_i = logsumexp(z_i); "mean" is sum(w l) / sum(w) over the valid tokens.

    Args:
        hidden: [..., H] fp16|bf16|fp32|fp64.
        weight: [V, H], hidden's dtype. bias: [V], hidden's dtype, or None.
        targets: [...] (hidden's shape without H) integer class ids; ``ignore_index``: no target.
        token_weights: [...] float, finite, >= 0 (None: all 1.0; 0: not learned); constants, no gradient.
        normalizer: reduction "mean"/"sum" only: sum(w l) / normalizer instead, a float >= 0 or a 0-dim tensor
            (on hidden's device or the CPU; used as given, detached, without a host sync); 0, with zero
            gradients, when normalizer <= 0.
        ignore_index, reduction, softcap, label_smoothing, shift, backend, chunk_size, memory, z_loss_scale,
        return_token_losses, return_z_loss, return_token_metrics: the fields of `mrloss.LossOptions`, which
            documents each one's meaning and range.

    Returns:
        The loss (float32; float64 for float64 inputs; 0-dim, or targets' shape for "none", target-aligned
        with ``shift``) when no return_* option is set; otherwise a `mrloss.LossOutput` with the loss and the
        fields asked for (token_losses, z_loss, token_metrics; None where not asked).

    Raises:
        TypeError / ValueError naming the argument, its shape or dtype, or the first bad target / weight.
    """
    options = LossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        label_smoothing=label_smoothing,
        shift=shift,
        backend=backend,
        chunk_size=chunk_size,
        memory=memory,
        z_loss_scale=z_loss_scale,
        return_token_losses=return_token_losses,
        return_z_loss=return_z_loss,
        return_token_metrics=return_token_metrics,
    )
    return fused_linear_cross_entropy(hidden, weight, targets, token_weights, options, bias=bias, normalizer=normalizer)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    options: LossOptions,
    *,
    bias: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor | LossOutput:
    """`linear_cross_entropy` with its options as one `LossOptions` (what the sequence-parallel loss calls).

    Args:
        hidden, weight, targets, token_weights, bias, normalizer: as in `linear_cross_entropy`.
        options: every other option, checked already (`LossOptions.__post_init__`).

    Returns:
        What `linear_cross_entropy` returns: the loss tensor, or a `LossOutput` when a return_* option is set.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_inputs(hidden, weight, targets, token_weights, bias, normalizer, options)
    row_op, fused_losses, slice_grad_op = _backend_ops(options.backend, hidden)
    return learned_rows_loss(
        hidden,
        weight,
        targets,
        token_weights,
        options,
        bias=bias,
        normalizer=normalizer,
        vocab_size=weight.shape[0],
        row_op=row_op,
        fused_losses=fused_losses,
        slice_grad_op=slice_grad_op if options.memory == "low" else None,
    )


# (hidden_2d [N, H], rows [M]) -> (the hidden rows the loss reads, their row indices)
LearnedHidden = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def learned_rows_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    options: LossOptions,
    *,
    bias: torch.Tensor | None,
    normalizer,
    vocab_size: int,
    row_op: RowOp,
    fused_losses: FusedLosses | None,
    slice_grad_op: SliceGradOp | None,
    learned_hidden: LearnedHidden | None = None,
) -> torch.Tensor | LossOutput:
    """`linear_cross_entropy` after its checks, on given backend ops: align (shift), compact the learned rows,
    run the autograd function and scatter the per-token outputs back. Shared with the vocabulary-parallel loss
    (``mrloss.parallel_vocab``): ``weight`` may be a shard of a vocabulary of ``vocab_size`` rows (targets are
    checked against ``vocab_size``, chunks are sized by ``weight``), and ``learned_hidden(hidden_2d, rows) ->
    (hidden rows, their indices)`` may wrap the learned rows before the loss (its gradient all-reduce)."""
    acc_dtype = accumulation_dtype(hidden.dtype)
    learned = _learned_rows(targets, token_weights, options, vocab_size, acc_dtype)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    chunk_size = options.chunk_size or default_chunk_size(hidden_2d.shape[0], hidden.shape[-1], weight.shape[0])
    plan = Plan(
        options,
        row_op,
        fused_losses,
        slice_grad_op,
        chunk_size=max(1, min(chunk_size, learned.rows.numel())),
        needs_grad=tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)),
    )
    rows = learned.rows
    if learned_hidden is not None:
        hidden_2d, rows = learned_hidden(hidden_2d, rows)
    scales = weight_scales(learned.weights, normalizer, options.reduction, dtype=acc_dtype)
    learned_loss, *stats = LinearCrossEntropyFunction.apply(
        hidden_2d, weight, bias, rows, learned.targets, scales, plan
    )
    return _loss_output(learned_loss, stats, scales, learned.output_positions, targets.shape, options)


class _LearnedRows(typing.NamedTuple):
    rows: torch.Tensor  # [M] int64: learned flat positions of the (shifted) targets, the rows of hidden
    targets: torch.Tensor  # [M] int64
    weights: torch.Tensor  # [M] the token weights' dtype (weight_scales scales them before the cast)
    output_positions: torch.Tensor  # [M] int64: where each row's per-token outputs go (target-aligned)


def _learned_rows(targets, token_weights, options: LossOptions, vocab_size: int, acc_dtype) -> _LearnedRows:
    """Align (shift), check the values (one host sync) and compact the learned tokens."""
    if options.shift:  # flat hidden row j predicts flat target j + 1 (never past its sequence)
        targets_used, weights_used = shift_targets(targets, token_weights, ignore_index=options.ignore_index)
    else:
        targets_used, weights_used = targets, token_weights
    targets_used = targets_used.reshape(-1)
    weights_used = None if weights_used is None else weights_used.reshape(-1)
    learned = learned_mask(targets_used, weights_used, options.ignore_index)
    num_learned = _check_values_and_count(targets, token_weights, learned, options.ignore_index, vocab_size, acc_dtype)
    rows = torch.nonzero_static(learned, size=num_learned).squeeze(1)
    if weights_used is None:
        weights = torch.ones(num_learned, dtype=acc_dtype, device=targets.device)
    else:
        weights = weights_used.index_select(0, rows)  # scaled before the cast: weight_scales
    return _LearnedRows(rows, targets_used.index_select(0, rows).long(), weights, rows + 1 if options.shift else rows)


def _loss_output(learned_loss, stats, scales, output_positions, shape, options: LossOptions):
    """The loss (per token: scattered to ``shape``), or `LossOutput` with the per-token outputs asked for."""
    stats = RowStats(*stats)

    def scatter(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # learned rows -> shape of targets
        full = torch.zeros(math.prod(shape), dtype=dtype, device=values.device)
        return full.index_copy_(0, output_positions, values.to(dtype)).view(shape)

    per_token = options.reduction == "none"
    loss = scatter(learned_loss, learned_loss.dtype) if per_token else learned_loss
    if not options.returns_output:
        return loss
    token_losses = scatter(stats.losses, torch.float32) if options.return_token_losses else None
    z_loss = metrics = None
    if options.return_z_loss:  # the z-loss part of the loss: same scales (weights, normalizer), same reduction
        weighted = (options.z_loss_scale * stats.lse.square() * scales).to(learned_loss.dtype)
        z_loss = scatter(weighted, weighted.dtype) if per_token else weighted.sum()
    if options.return_token_metrics:
        metrics = TokenMetrics(scatter(stats.correct, torch.float32), scatter(stats.entropy, torch.float32))
    return LossOutput(loss, token_losses, z_loss, metrics)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`; the keyword options are fixed (and checked) at construction,
    except ``normalizer``, which a call may give (it changes every step) to override the constructor's.

    ``LinearCrossEntropyLoss(reduction="sum", shift=True)(hidden, weight, targets, token_weights, bias)``
    ``LinearCrossEntropyLoss(shift=True)(hidden, weight, targets, token_weights, normalizer=global_sum)``
    """

    def __init__(self, **options):
        super().__init__()
        self.keywords = dict(options)
        self.normalizer = options.pop("normalizer", None)
        self.options = loss_options(options, caller="LinearCrossEntropyLoss")

    def forward(self, hidden, weight, targets, token_weights=None, bias=None, normalizer=None):
        """normalizer: this call's (None: the constructor's, if any). Returns what `linear_cross_entropy` does."""
        normalizer = self.normalizer if normalizer is None else normalizer
        options = self.options
        return fused_linear_cross_entropy(
            hidden, weight, targets, token_weights, options, bias=bias, normalizer=normalizer
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.keywords.items())


def autocast_inputs(hidden, weight, bias):
    """(hidden, weight, bias) in the dtype autocast gives ``F.linear`` on hidden's device when autocast is on there
    (float16/bfloat16/float32 tensors cast to ``torch.get_autocast_dtype``; float64 and non-tensors unchanged),
    else as given. The casts are differentiable: gradients flow back in the original dtypes."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(tensor):
        eligible = isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != torch.float64
        return tensor.to(dtype) if eligible else tensor

    return cast(hidden), cast(weight), cast(bias)


def check_inputs(hidden, weight, targets, token_weights, bias, normalizer, options: LossOptions) -> None:
    """The checks of a loss call that need its tensors; no device sync (the values of targets and weights are
    checked where they are counted, `learned_rows_loss`).

    Args:
        hidden [..., H] float, weight [V, H], targets [...] signed int, token_weights [...] float or None,
        bias [V] or None, normalizer (float, 0-dim tensor or None): as in `linear_cross_entropy`.
        options: the call's `LossOptions` (normalizer with reduction "none", shift of 0-dim targets).

    Raises:
        TypeError for a wrong type or dtype, ValueError for a wrong shape, device or normalizer, naming it.
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (("token_weights", token_weights), ("bias", bias)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    _check_head(hidden, weight, bias)
    _check_targets(hidden, targets, token_weights)
    for name, value in (("weight", weight), ("targets", targets), ("token_weights", token_weights), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"device mismatch: hidden is on {hidden.device} but {name} is on {value.device}")
    if normalizer is not None and options.reduction == "none":
        raise ValueError('normalizer cannot be combined with reduction="none"')
    check_normalizer(normalizer, hidden.device)
    if options.shift and targets.dim() == 0:
        raise ValueError("shift=True needs targets with a sequence dimension, got a 0-dim tensor")


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """hidden [..., H] float; weight [V >= 1, H] and bias [V] in hidden's dtype."""
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden {tuple(hidden.shape)} has H={hidden.shape[-1]} "
            f"but weight {tuple(weight.shape)} has H={weight.shape[1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have V >= 1 rows, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"dtype mismatch: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"dtype mismatch: hidden is {hidden.dtype} but bias is {bias.dtype}")


def _check_targets(hidden: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor | None) -> None:
    """targets [...] signed integers, hidden's shape without H; token_weights float, targets' shape."""
    if (
        targets.dtype == torch.bool
        or targets.is_floating_point()
        or targets.is_complex()
        or not targets.dtype.is_signed
    ):
        raise TypeError(
            f"targets must hold integer class ids in a signed dtype (int64; an unsigned dtype cannot hold "
            f"ignore_index), got {targets.dtype}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"shape mismatch: targets {tuple(targets.shape)} must be hidden's shape without "
            f"its last dim, {tuple(hidden.shape[:-1])} (hidden is {tuple(hidden.shape)})"
        )
    if token_weights is not None:
        if not token_weights.is_floating_point():
            raise TypeError(f"token_weights must be a float tensor, got {token_weights.dtype}")
        if token_weights.shape != targets.shape:
            raise ValueError(
                f"shape mismatch: token_weights {tuple(token_weights.shape)} must match targets {tuple(targets.shape)}"
            )


def _backend_ops(backend: str, hidden: torch.Tensor) -> tuple[RowOp, FusedLosses | None, SliceGradOp]:
    """The row op of the chosen backend, its fused loss-only forward, or None where there is none
    (torch backend; float64, which the fused kernel leaves to the chunks), and its vocabulary-slice gradient
    op (memory="low"). Contracts: ``mrloss.ops.chunked``.
    "auto" on CUDA: the Triton ops, each falling back to the PyTorch backend (one warning) if it fails."""
    from mrloss.ops.backends.torch import cross_entropy_rows as torch_rows
    from mrloss.ops.backends.torch import cross_entropy_slice_grad as torch_slice_grad

    auto = backend == "auto"
    if auto:
        backend = _auto_backend(hidden)
    if backend == "torch":
        return torch_rows, None, torch_slice_grad
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f'backend="triton" needs CUDA tensors (hidden is on {hidden.device}) or '
            "TRITON_INTERPRET=1 set before triton is imported"
        )
    if not _triton_available():
        raise ImportError('backend="triton" needs the triton package (pip install triton)')
    from mrloss.ops.backends.triton.cross_entropy_rows import cross_entropy_rows, cross_entropy_slice_grad
    from mrloss.ops.backends.triton.linear_cross_entropy_forward import linear_cross_entropy_forward

    fused = None if hidden.dtype == torch.float64 else linear_cross_entropy_forward
    if not auto:
        return cross_entropy_rows, fused, cross_entropy_slice_grad
    from mrloss.ops.triton_fallback import with_torch_fallback

    row_op = with_torch_fallback(cross_entropy_rows, torch_rows, "cross_entropy_rows")
    slice_grad_op = with_torch_fallback(cross_entropy_slice_grad, torch_slice_grad, "cross_entropy_rows")
    if fused is not None:
        fused = with_torch_fallback(fused, _chunked_torch_losses, "linear_cross_entropy_forward")
    return row_op, fused, slice_grad_op


def _auto_backend(hidden: torch.Tensor) -> str:
    """backend="auto": Triton on CUDA tensors (when triton is installed), PyTorch otherwise."""
    return "triton" if hidden.is_cuda and _triton_available() else "torch"


def _chunked_torch_losses(
    hidden, weight, bias, rows, targets, *, softcap, label_smoothing, lse_out=None, correct_out=None, entropy_out=None
) -> torch.Tensor:
    """The fused loss-only forward's result from the PyTorch chunks (its fallback), float32."""
    from mrloss.ops.backends.torch import cross_entropy_rows as torch_rows

    chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    result = chunked_linear_cross_entropy(
        hidden,
        weight,
        bias,
        rows,
        targets,
        None,
        row_op=torch_rows,
        row_options=RowOptions(softcap, label_smoothing),
        chunk_size=chunk_size,
        metrics=correct_out is not None or entropy_out is not None,
    )
    for out, values in (
        (lse_out, result.rows.lse),
        (correct_out, result.rows.correct),
        (entropy_out, result.rows.entropy),
    ):
        if out is not None:
            out.copy_(values)
    return result.rows.losses.float()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_values_and_count(targets, token_weights, learned, ignore_index, vocab_size, acc_dtype) -> int:
    """Raise on targets outside [0, V) (other than ignore_index) and on negative token weights or weights not
    finite in ``acc_dtype`` (the dtype the loss uses them in: 1e39 in float64 is inf in float32); return the
    number of learned tokens. One device -> host sync for all three."""
    bad_targets = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    counts = [bad_targets.sum(), learned.sum()]
    if token_weights is not None:
        bad_weights = ~torch.isfinite(token_weights.to(acc_dtype)) | (token_weights < 0)
        counts.append(bad_weights.sum())
    counts = torch.stack(counts).tolist()
    if counts[0]:
        position = _first_position(bad_targets)
        raise ValueError(
            f"targets{position} = {targets[position].item()} is outside [0, V={vocab_size}) "
            f"and is not ignore_index ({ignore_index}); {counts[0]} such target(s) in "
            f"targets of shape {tuple(targets.shape)}"
        )
    if token_weights is not None and counts[2]:
        position = _first_position(bad_weights)
        raise ValueError(
            f"token_weights{position} = {token_weights[position].item()}: token weights must "
            f"be finite and >= 0 (finite in {acc_dtype}, the dtype the loss uses them in); {counts[2]} bad "
            f"value(s) in token_weights of shape "
            f"{tuple(token_weights.shape)}"
        )
    return counts[1]


def _first_position(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(mask.reshape(-1).nonzero()[0, 0], mask.shape))
