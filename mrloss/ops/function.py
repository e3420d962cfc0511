"""The ``torch.autograd.Function`` of the fused linear cross-entropy and the plan it runs.

`Plan` holds what one call decided (row op, fused loss-only forward, options, chunk size, which gradients,
memory mode); `LinearCrossEntropyFunction` runs it over the learned rows (chunk driver ``mrloss.ops.chunked``,
or the fused loss-only forward) and builds the gradients in forward ("mean"/"sum" with memory="fast") or in
backward ("none", and memory="low" through the vocabulary-sliced ``mrloss.ops.low_memory``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype
from mrloss.ops.chunked import (
    ChunkedResult,
    FusedLosses,
    RowOp,
    RowOptions,
    RowStats,
    SliceGradOp,
    chunked_linear_cross_entropy,
    deferred_weight_grad,
    scale_gradient,
)
from mrloss.ops.low_memory import low_memory_gradients
from mrloss.ops.options import LossOptions


def _without_autocast(run):
    """Run with autocast off on hidden's device: ``mrloss.ops.api.autocast_inputs`` cast the inputs already, and
    the chunks' matmuls and float32 math must keep the dtypes the plan was made for (also in backward)."""

    @functools.wraps(run)
    def wrapper(self, hidden, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return run(self, hidden, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class Plan:
    """What one call decided: its options, the backend ops, the chunk size and which gradients are wanted."""

    options: LossOptions
    row_op: RowOp
    # loss-only passes use it instead of the chunks, except with token metrics and with memory="low" (whose
    # backward needs the lse of the very logits it recomputes: the chunks' matmul, not the kernel's)
    fused_losses: FusedLosses | None
    slice_grad_op: SliceGradOp | None  # memory="low": gradients by vocabulary slices, in backward
    chunk_size: int
    needs_grad: tuple[bool, bool, bool]  # gradients wanted for (hidden, weight, bias)

    @property
    def per_token(self) -> bool:
        """reduction "none": the upstream gradient is per token, the gradients are built in backward."""
        return self.options.reduction == "none"

    @_without_autocast
    def run(self, hidden, weight, bias, rows, targets, grad_scales, *, metrics=False, defer_weight_grad=False):
        """The chunks (or the fused loss-only forward) over the learned rows: a `ChunkedResult`."""
        if grad_scales is None and self.fused_losses is not None and self.slice_grad_op is None:
            lse, correct, entropy = (
                torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device) if wanted else None
                for wanted in (True, metrics, metrics)
            )
            losses = self.fused_losses(
                hidden,
                weight,
                bias,
                rows,
                targets,
                softcap=self.options.softcap,
                label_smoothing=self.options.label_smoothing,
                lse_out=lse,
                correct_out=correct,
                entropy_out=entropy,
            )
            return ChunkedResult(RowStats(losses, lse, correct, entropy), None, None, None)
        return chunked_linear_cross_entropy(
            hidden,
            weight,
            bias,
            rows,
            targets,
            grad_scales,
            row_op=self.row_op,
            metrics=metrics,
            defer_weight_grad=defer_weight_grad,
            **self._chunking(),
        )

    @_without_autocast
    def gradients(self, hidden, weight, bias, rows, targets, lse, grad_scales):
        """(grad_hidden, grad_weight, grad_bias) of sum_i grad_scales_i (l_i + zeta lse_i^2), built in backward."""
        if self.slice_grad_op is None:
            return self.run(hidden, weight, bias, rows, targets, grad_scales)[1:]
        return low_memory_gradients(
            hidden, weight, bias, rows, targets, lse, grad_scales, slice_grad_op=self.slice_grad_op, **self._chunking()
        )

    @property
    def row_options(self) -> RowOptions:
        """The row formula's options (softcap, label smoothing, z-loss scale) out of ``options``."""
        return RowOptions.of(self.options)

    def _chunking(self) -> dict:
        """The keywords the chunk driver and the low-memory gradients share: the row formula's options, the chunk
        size and the gradients wanted."""
        return dict(row_options=self.row_options, chunk_size=self.chunk_size, needs_grad=self.needs_grad)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V]|None, rows [M], targets [M], scales [M], plan) ->
    (loss, `RowStats` of the M rows: token_losses unweighted, lse, correct, entropy; non-differentiable).

    Per-row objective o_i = l_i + zeta lse_i^2 (``RowOptions.objective``). Reduced (plan.per_token False):
    loss = sum_i scales_i o_i. With plan.slice_grad_op None (memory="fast") the gradients are built in
    forward and backward multiplies them by the scalar upstream gradient (``scale_gradient``: in place, or into the
    weight's dtype in the same pass; no host sync), so they serve one backward only: a second one through the same
    graph raises. Where ``defers_weight_grad`` allows, forward keeps the learned rows' logit gradients instead of
    the float32 weight-gradient buffer and backward makes the weight gradient in one matmul
    (``deferred_weight_grad``). Per token: loss [M] =
    scales_i o_i (scales are the token weights). Per token or memory="low": backward builds the gradients
    with grad scales scales_i * upstream_i (any number of backward passes).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, scales, plan):
        ctx.plan, ctx.dtypes = plan, (hidden.dtype, weight.dtype, weight.dtype)
        ctx.in_backward = plan.per_token or plan.slice_grad_op is not None
        build_grads = any(plan.needs_grad) and not ctx.in_backward
        metrics = plan.options.return_token_metrics
        grad_scales = scales if build_grads else None
        result = plan.run(hidden, weight, bias, rows, targets, grad_scales, metrics=metrics, defer_weight_grad=True)
        stats = result.rows
        if ctx.in_backward:
            ctx.save_for_backward(hidden, weight, bias, rows, targets, scales, stats.lse)
        else:
            deferred = result.grad_logits is not None
            ctx.save_for_backward(
                result.grad_hidden, result.grad_weight, result.grad_bias, result.grad_logits,
                hidden if deferred else None, rows if deferred else None,
            )  # fmt: skip
        objective = plan.row_options.objective(stats.losses, stats.lse)
        loss = objective * scales if plan.per_token else (objective * scales).sum()
        ctx.mark_non_differentiable(*(t for t in stats if t is not None))
        return loss, *stats

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            grads = _differentiable_gradients(ctx, grad_loss)
        elif ctx.in_backward:
            hidden, weight, bias, rows, targets, scales, lse = ctx.saved_tensors
            grads = ctx.plan.gradients(hidden, weight, bias, rows, targets, lse, scales * grad_loss.to(scales.dtype))
        else:
            if getattr(ctx, "grads_consumed", False):
                raise RuntimeError(
                    "linear_cross_entropy: a second backward through the same graph is not supported for "
                    'reduction "mean"/"sum": the gradients built in the forward pass were scaled in place '
                    'by the first backward. Recompute the loss (or use reduction="none" and reduce it).'
                )
            ctx.grads_consumed = True
            grads = _scaled_forward_gradients(ctx, grad_loss)
        return (
            *(None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)),
            None,
            None,
            None,
            None,
        )


def _differentiable_gradients(ctx, grad_loss: torch.Tensor) -> tuple:
    """(grad_hidden, grad_weight, grad_bias) as differentiable functions of the saved inputs and ``grad_loss``, for a
    backward with ``create_graph=True`` (a gradient penalty, a Hessian-vector product): the objective of the learned
    rows recomputed with plain PyTorch ops, in the accumulation dtype, with their [M, V] logits in memory.

    Only where backward has the inputs (reduction "none", memory="low") and the whole vocabulary (no vocabulary
    shard); elsewhere a RuntimeError, never gradients that are silently constants."""
    plan = ctx.plan
    vocab_sharded = "vocab_shard" in getattr(plan.row_op, "keywords", {})
    if not ctx.in_backward or vocab_sharded:
        raise RuntimeError(
            "linear_cross_entropy: double backward (create_graph=True, e.g. a gradient penalty) is not supported "
            + (
                "by the vocabulary-parallel loss. "
                if vocab_sharded
                else 'with memory="fast" and reduction "mean"/"sum" (the gradients are made in the forward pass and '
                'are not differentiable): pass memory="low" or reduction="none", whose backward recomputes them '
                "differentiably, "
            )
            + "or compute that loss with F.linear + F.cross_entropy."
        )
    hidden, weight, bias, rows, targets, scales, _lse = ctx.saved_tensors
    acc_dtype = accumulation_dtype(hidden.dtype)
    inputs = [tensor for tensor, wanted in zip((hidden, weight, bias), plan.needs_grad) if wanted]
    with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.index_select(0, rows).to(acc_dtype) @ weight.to(acc_dtype).T
        if bias is not None:
            logits = logits + bias.to(acc_dtype)
        if plan.options.softcap is not None:
            logits = plan.options.softcap * torch.tanh(logits / plan.options.softcap)
        objective = torch.nn.functional.cross_entropy(
            logits, targets, reduction="none", label_smoothing=plan.options.label_smoothing
        )
        objective = plan.row_options.objective(objective, torch.logsumexp(logits, dim=-1))
        total = (objective * scales * grad_loss.to(acc_dtype)).sum()
        grads = iter(torch.autograd.grad(total, inputs, create_graph=True, allow_unused=True))
    return tuple(next(grads) if wanted else None for wanted in plan.needs_grad)


def _scaled_forward_gradients(ctx, grad_loss: torch.Tensor) -> tuple:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes from the gradients the forward built: each
    multiplied by the scalar ``grad_loss`` (``scale_gradient``), the weight gradient made now where it was
    deferred (``deferred_weight_grad``)."""
    grad_hidden, grad_weight, grad_bias, grad_logits, hidden, rows = ctx.saved_tensors
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    if grad_logits is not None:
        grad_weight = deferred_weight_grad(grad_logits, hidden, rows, grad_loss)
    elif grad_weight is not None:
        grad_weight = scale_gradient(grad_weight, grad_loss, weight_dtype)
    if grad_hidden is not None:
        grad_hidden = scale_gradient(grad_hidden, grad_loss, hidden_dtype)
    if grad_bias is not None:
        grad_bias = scale_gradient(grad_bias, grad_loss, bias_dtype)
    return grad_hidden, grad_weight, grad_bias
