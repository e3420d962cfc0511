"""The ``torch.autograd.Function`` of the fused linear cross-entropy and the plan it runs.

`Plan` holds what one call decided (row op, fused loss-only forward, options, chunk size, which gradients);
`LinearCrossEntropyFunction` runs it over the learned rows (chunk driver ``mrloss.ops.chunked``, or the fused
loss-only forward) and builds the gradients in forward ("mean"/"sum") or in backward ("none").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype
from mrloss.ops.chunked import ChunkedResult, FusedLosses, RowOp, chunked_linear_cross_entropy


def _without_autocast(run):
    """Run with autocast off on hidden's device: ``mrloss.ops.api.autocast_inputs`` cast the inputs already, and
    the chunks' matmuls and float32 math must keep the dtypes the plan was made for (also in backward)."""

    @functools.wraps(run)
    def wrapper(self, hidden, *args):
        with torch.autocast(hidden.device.type, enabled=False):
            return run(self, hidden, *args)

    return wrapper


@dataclass(frozen=True)
class Plan:
    row_op: RowOp
    fused_losses: FusedLosses | None  # loss-only passes use it instead of the chunks when given
    softcap: float | None
    label_smoothing: float
    chunk_size: int
    per_token: bool  # reduction "none": upstream gradient is per token, gradients built in backward
    needs_grad: tuple[bool, bool, bool]  # gradients wanted for (hidden, weight, bias)

    @_without_autocast
    def run(self, hidden, weight, bias, rows, targets, grad_scales):
        if grad_scales is None and self.fused_losses is not None:
            losses = self.fused_losses(
                hidden, weight, bias, rows, targets, softcap=self.softcap, label_smoothing=self.label_smoothing
            )
            return ChunkedResult(losses, None, None, None)
        return chunked_linear_cross_entropy(
            hidden,
            weight,
            bias,
            rows,
            targets,
            grad_scales,
            row_op=self.row_op,
            softcap=self.softcap,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
            needs_grad=self.needs_grad,
        )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V]|None, rows [M], targets [M], scales [M], plan) ->
    (loss, token_losses [M] unweighted, non-differentiable).

    Reduced (plan.per_token False): loss = sum_i scales_i l_i, gradients built in forward; backward
    multiplies those buffers in place by the scalar upstream gradient (no copy, no host sync), so they
    serve one backward only: a second one through the same graph raises. Per token: loss [M] =
    scales_i l_i (scales are the token weights) and backward re-runs the chunks with grad scales
    scales_i * upstream_i (any number of backward passes).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, scales, plan):
        ctx.plan, ctx.dtypes = plan, (hidden.dtype, weight.dtype, weight.dtype)
        build_grads = any(plan.needs_grad) and not plan.per_token
        result = plan.run(hidden, weight, bias, rows, targets, scales if build_grads else None)
        if plan.per_token:
            ctx.save_for_backward(hidden, weight, bias, rows, targets, scales)
            loss = result.losses * scales
        else:
            ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
            loss = (result.losses * scales).sum()
        ctx.mark_non_differentiable(result.losses)
        return loss, result.losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_losses):
        if ctx.plan.per_token:
            hidden, weight, bias, rows, targets, scales = ctx.saved_tensors
            grads = ctx.plan.run(hidden, weight, bias, rows, targets, scales * grad_loss.to(scales.dtype))[1:]
        else:
            if getattr(ctx, "grads_consumed", False):
                raise RuntimeError(
                    "linear_cross_entropy: a second backward through the same graph is not supported for "
                    'reduction "mean"/"sum": the gradients built in the forward pass were scaled in place '
                    'by the first backward. Recompute the loss (or use reduction="none" and reduce it).'
                )
            ctx.grads_consumed = True
            grads = ctx.saved_tensors
            for grad in grads:
                if grad is not None:
                    _scale_in_place(grad, grad_loss)
        return (
            *(None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)),
            None,
            None,
            None,
            None,
        )


SCALE_BLOCK_ELEMENTS = 1 << 24  # float32 temporary of the half-precision scaling: at most 64 MiB


def _scale_in_place(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    """grad *= upstream (0-dim, grad's device), in float32 at least and rounded once into grad's dtype.

    float32/float64 buffers: one ``mul_``. Half-precision buffers (grad_hidden of bf16/fp16 inputs): in
    blocks of rows through a float32 temporary, because a half-precision ``mul_`` by a 0-dim device
    tensor would first round the upstream gradient itself to half precision (on CUDA)."""
    acc_dtype = accumulation_dtype(grad.dtype)
    upstream = upstream.to(acc_dtype)
    if grad.dtype == acc_dtype:
        grad.mul_(upstream)
        return
    rows_per_block = max(1, SCALE_BLOCK_ELEMENTS // max(1, math.prod(grad.shape[1:])))
    for block in grad.split(rows_per_block):
        block.copy_(block.to(acc_dtype) * upstream)
