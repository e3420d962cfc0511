"""Triton row op of the chunked linear cross-entropy: loss per row and dL/dlogits written in place.

Same contract and formula as ``mrloss.torch_backend.cross_entropy_rows`` (documented once, in
``mrloss.chunked``). One program per row, looping over the vocabulary in BLOCK_V tiles:
pass 1 keeps an online max / sum-exp (logsumexp), the sum of logits (label smoothing) and reads the
target logit; pass 2 (only when grad_scales is given) rewrites the row with the gradient in the logits'
dtype. All math in float32 (float64 for float64 logits); no atomics, so results are deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mrloss.ops.backends.dtypes import accumulation_dtype

MAX_BLOCK_V = 4096


def triton_interpreted() -> bool:
    """Whether Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def softcapped(a, softcap, HAS_SOFTCAP: tl.constexpr):
    """Returns (z, tanh(a / softcap)); tanh from exp (no libdevice, so it also runs interpreted)."""
    th = a
    if HAS_SOFTCAP:
        e = tl.exp(-2.0 * tl.abs(a / softcap))
        th = tl.where(a < 0, (e - 1.0) / (1.0 + e), (1.0 - e) / (1.0 + e))
        a = softcap * th
    return a, th


@triton.jit
def _to_bfloat16_rtne(x):
    """float32 -> bfloat16 rounding to nearest even by bit arithmetic (finite x). The interpreter's own
    cast truncates, while GPUs round to nearest even; this keeps interpreted results equal to GPU ones."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    scales_ptr,
    losses_ptr,
    vocab_size,
    softcap,
    label_smoothing,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    MANUAL_BF16_ROUNDING: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    target_logit, _ = softcapped(tl.load(row_ptr + target).to(ACC), softcap, HAS_SOFTCAP)

    running_max = tl.full((), float("-inf"), ACC)
    sum_exp = tl.zeros((), ACC)
    sum_logits = tl.zeros((), ACC)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab_size
        z, _ = softcapped(tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
        sum_logits += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = running_max + tl.log(sum_exp)
    loss = lse - (1.0 - label_smoothing) * target_logit - label_smoothing / vocab_size * sum_logits
    tl.store(losses_ptr + row, loss)

    if WRITE_GRAD:
        scale = tl.load(scales_ptr + row).to(ACC)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < vocab_size
            z, th = softcapped(tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC), softcap, HAS_SOFTCAP)
            grad = tl.exp(z - lse) - label_smoothing / vocab_size
            grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - th * th)
            grad = grad * scale
            if MANUAL_BF16_ROUNDING:
                grad = _to_bfloat16_rtne(grad)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_scales: torch.Tensor | None,
    *,
    softcap: float | None,
    label_smoothing: float,
) -> torch.Tensor:
    """Per-row loss of ``logits [C, V]`` (contiguous rows) against ``targets [C]`` int64 in [0, V);
    with ``grad_scales [C]`` also overwrites ``logits`` with dL/dlogits. See ``mrloss.chunked``."""
    num_rows, vocab_size = logits.shape
    acc_dtype = accumulation_dtype(logits.dtype)
    losses = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if num_rows == 0:
        return losses
    if logits.stride(1) != 1:
        raise ValueError(f"logits rows must be contiguous, got strides {logits.stride()}")
    scales = losses if grad_scales is None else grad_scales.to(acc_dtype).contiguous()  # dummy pointer
    block_v = min(triton.next_power_of_2(vocab_size), MAX_BLOCK_V)
    _cross_entropy_rows_kernel[(num_rows,)](
        logits,
        logits.stride(0),
        targets.contiguous(),
        scales,
        losses,
        vocab_size,
        float(softcap or 1.0),
        float(label_smoothing),
        HAS_SOFTCAP=softcap is not None,
        WRITE_GRAD=grad_scales is not None,
        BLOCK_V=block_v,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        MANUAL_BF16_ROUNDING=logits.dtype == torch.bfloat16 and triton_interpreted(),
        num_warps=8 if block_v >= 2048 else 4,
    )
    return losses
