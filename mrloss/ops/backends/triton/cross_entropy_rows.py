"""Triton row op of the chunked linear cross-entropy: loss per row and dL/dlogits written in place.

Same contract and formula as ``mrloss.ops.backends.torch.cross_entropy_rows`` (documented once, in
``mrloss.ops.chunked``). One program per row, looping over the vocabulary in BLOCK_V tiles:
pass 1 keeps an online max / sum-exp (logsumexp), the sum of logits (label smoothing), with METRICS the
first maximum's column and sum exp(z) z (entropy), and reads the target logit; pass 2 (only when grad_scales
is given) rewrites the row with the gradient in the logits' dtype. With GIVEN_LSE (memory="low") pass 1 is
skipped and the row is a vocabulary slice starting at col_offset. All math in float32 (float64 for float64
logits); no atomics, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrloss.ops.backends.dtypes import accumulation_dtype
from mrloss.ops.backends.triton import launch
from mrloss.ops.backends.triton.tl_math import softcapped, tanh

SMALL_BLOCK_V = 1024  # vocabularies up to this size: one tile
MAX_BLOCK_V = 4096  # larger vocabularies: 4096-wide tiles
# Warps per program: each thread holds one 16-byte vector of a tile, at least 4 values (8 bf16/fp16, 4 fp32 or
# fp64 values), with at most 32 warps (a block's maximum of 1024 threads), 16 for fp64 (1024 threads leave 64
# registers a thread, too few for float64 values). More values per thread made ptxas spill (8 fp32 values on sm_80
# with triton 3.6; 8 bf16 values do not); so did 2 fp64 values (16 warps), around float64 division's calls.
VECTOR_BYTES = 16
MIN_VALUES_PER_THREAD = 4
MAX_WARPS = 32


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    scales_ptr,
    losses_ptr,
    lse_ptr,
    correct_ptr,
    entropy_ptr,
    num_cols,
    col_offset,
    softcap: tl.float64,  # the float options arrive in float64 (exact for float64 rows), used in ACC
    label_smoothing: tl.float64,
    smoothing_per_class: tl.float64,  # label_smoothing / V, divided on the host: no division in the kernel
    z_loss_scale: tl.float64,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    GIVEN_LSE: tl.constexpr,
    METRICS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    softcap = tl.full((), softcap, ACC)
    label_smoothing = tl.full((), label_smoothing, ACC)
    z_loss_scale = tl.full((), z_loss_scale, ACC)
    smoothing_per_class = tl.full((), smoothing_per_class, ACC)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row) - col_offset  # column of the target in this row's columns

    if GIVEN_LSE:  # a vocabulary slice of the row (memory="low"): lse of the full row is given
        lse = tl.load(lse_ptr + row).to(ACC)
    else:
        running_max = tl.full((), float("-inf"), ACC)
        sum_exp = tl.zeros((), ACC)
        sum_logits = tl.zeros((), ACC)
        sum_exp_logits = tl.zeros((), ACC)  # sum_j exp(z_j - running_max) z_j (entropy)
        best = tl.zeros((), tl.int32)  # first column of the maximum (accuracy)
        for start in range(0, num_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < num_cols
            z = softcapped(tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC), softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            tile_max = tl.max(z, axis=0)
            new_max = tl.maximum(running_max, tile_max)
            rescale = tl.exp(running_max - new_max)
            exp_z = tl.exp(z - new_max)
            sum_exp = sum_exp * rescale + tl.sum(exp_z, axis=0)
            if METRICS:
                sum_exp_logits = sum_exp_logits * rescale + tl.sum(exp_z * tl.where(mask, z, 0.0), axis=0)
                best = tl.where(tile_max > running_max, start + tl.argmax(z, axis=0), best)
            running_max = new_max
            sum_logits += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = running_max + tl.log(sum_exp)
        # read after the loop, not held through it (on sm_80 ptxas spilled it at 4 warps)
        target_logit = softcapped(tl.load(row_ptr + target).to(ACC), softcap, HAS_SOFTCAP)
        loss = lse - (1.0 - label_smoothing) * target_logit - smoothing_per_class * sum_logits
        tl.store(losses_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if METRICS:
            tl.store(correct_ptr + row, tl.where(best == target, 1.0, 0.0).to(ACC))
            tl.store(entropy_ptr + row, lse - sum_exp_logits / sum_exp)

    if WRITE_GRAD:
        scale = tl.load(scales_ptr + row).to(ACC)
        softmax_scale = 1.0 + 2.0 * z_loss_scale * lse  # z-loss: d(zeta lse^2)/dz = 2 zeta lse softmax
        for start in range(0, num_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < num_cols
            a = tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                th = tanh(a / softcap)
                z = softcap * th
            else:
                z = a
            grad = softmax_scale * tl.exp(z - lse) - smoothing_per_class
            grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - th * th)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def rows_launch_config(
    vocab_size: int,
    logits_dtype: torch.dtype,
    *,
    has_softcap: bool,
    write_grad: bool,
    capability: launch.Capability,
    given_lse: bool = False,
    metrics: bool = False,
) -> launch.LaunchConfig:
    """The row kernel's configuration (the same on sm_80 and sm_90: a memory-bound loop, no shared-memory tiles).

    Args:
        vocab_size: the columns of the rows (of the slice with ``given_lse``).
        logits_dtype: fp16|bf16|fp32|fp64 logits; fp64 rows accumulate in float64, the others in float32.
        has_softcap, write_grad: a softcap; the gradient pass (``grad_scales`` given).
        capability: (major, minor) of the GPU, (0, 0) interpreted.
        given_lse: the gradient of a vocabulary slice from a given lse (memory="low").
        metrics: the token metrics (accuracy, entropy) in the first pass.

    Returns:
        The ``LaunchConfig``: tiles of 1024 columns up to 1024 columns, else of 4096, with the warps that give each
        thread one 16-byte vector of a tile, at least 4 values: 4 | 16 warps for bf16/fp16, 8 | 32 for fp32, 8 | 16
        for fp64.
    """
    del capability  # kept in the signature: every launch config is a function of the device too
    block_v = SMALL_BLOCK_V if vocab_size <= SMALL_BLOCK_V else MAX_BLOCK_V
    wide = accumulation_dtype(logits_dtype) == torch.float64
    values_per_thread = max(MIN_VALUES_PER_THREAD, VECTOR_BYTES // logits_dtype.itemsize)
    max_warps = MAX_WARPS if logits_dtype.itemsize <= 4 else MAX_WARPS // 2
    num_warps = min(max_warps, block_v // (32 * values_per_thread))
    return launch.LaunchConfig(
        constexprs=dict(
            HAS_SOFTCAP=has_softcap,
            WRITE_GRAD=write_grad,
            GIVEN_LSE=given_lse,
            METRICS=metrics,
            BLOCK_V=block_v,
            ACC=tl.float64 if wide else tl.float32,
        ),
        num_warps=num_warps,
        num_stages=1,
    )


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_scales: torch.Tensor | None,
    *,
    softcap: float | None,
    label_smoothing: float,
    z_loss_scale: float = 0.0,
    lse_out: torch.Tensor | None = None,
    correct_out: torch.Tensor | None = None,
    entropy_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The row op of ``mrloss.ops.chunked`` (its contract has the formula), one program per row.

    Args:
        logits: [C, V] fp16|bf16|fp32|fp64, unit column stride; with ``grad_scales`` overwritten in place with
            dL/dlogits in its own dtype.
        targets: [C] int64 in [0, V).
        grad_scales: [C] float (each row's factor s_i), or None: loss only.
        softcap, label_smoothing, z_loss_scale: the loss options (Python floats, used in the accumulation dtype).
        lse_out, correct_out, entropy_out: [C] contiguous, accumulation dtype; filled when given.

    Returns:
        losses [C] fp32 (fp64 for fp64 logits), without the z-loss.
    """
    num_rows, vocab_size = logits.shape
    acc_dtype = accumulation_dtype(logits.dtype)
    losses = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if num_rows == 0:
        return losses
    if lse_out is None:
        lse_out = torch.empty_like(losses)
    correct, entropy = launch.metric_buffers(losses, correct_out, entropy_out)
    _launch_rows(
        logits, targets, grad_scales, losses, lse_out, correct, entropy, 0, vocab_size,
        softcap=softcap, label_smoothing=label_smoothing, z_loss_scale=z_loss_scale, given_lse=False,
    )  # fmt: skip
    return losses


def cross_entropy_slice_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scales: torch.Tensor,
    *,
    col_offset: int,
    vocab_size: int,
    softcap: float | None,
    label_smoothing: float,
    z_loss_scale: float = 0.0,
) -> None:
    """The slice gradient op of ``mrloss.ops.chunked`` (memory="low"): the row kernel's gradient pass alone.

    Args:
        logits: [C, V_s] columns ``col_offset ... col_offset + V_s - 1`` of the rows (any row stride, unit column
            stride), fp16|bf16|fp32|fp64; overwritten in place with those columns of dL/dlogits.
        targets: [C] int64 global column ids in [0, vocab_size).
        lse: [C] float, each full row's logsumexp (of the softcapped logits).
        grad_scales: [C] float, each row's factor s_i.
        col_offset, vocab_size: where the slice starts; the full row's width V.
        softcap, label_smoothing, z_loss_scale: the loss options.

    Returns:
        None (the result is in ``logits``).
    """
    if logits.shape[0] == 0:
        return
    lse = lse.to(accumulation_dtype(logits.dtype)).contiguous()
    _launch_rows(
        logits, targets, grad_scales, lse, lse, None, None, col_offset, vocab_size,
        softcap=softcap, label_smoothing=label_smoothing, z_loss_scale=z_loss_scale, given_lse=True,
    )  # fmt: skip


def _launch_rows(logits, targets, grad_scales, losses, lse, correct, entropy, col_offset, vocab_size, **options):
    """One program per row of ``logits [C, num_cols]``; losses/lse/correct/entropy [C] are written (read: lse
    with given_lse), None ones not touched (a dummy pointer is passed)."""
    num_rows, num_cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits rows must be contiguous, got strides {logits.stride()}")
    if logits.dtype == torch.bfloat16 and grad_scales is not None and launch.triton_interpreted():
        # The interpreter's float32 -> bfloat16 cast truncates where GPUs round to nearest even: run on
        # a float32 copy and let torch round it, so interpreted results equal GPU ones.
        scratch = logits.float()
        _launch_rows(scratch, targets, grad_scales, losses, lse, correct, entropy, col_offset, vocab_size, **options)
        logits.copy_(scratch)
        return
    acc_dtype = accumulation_dtype(logits.dtype)
    scales = losses if grad_scales is None else grad_scales.to(acc_dtype).contiguous()  # dummy pointer
    config = rows_launch_config(
        num_cols,
        logits.dtype,
        has_softcap=options["softcap"] is not None,
        write_grad=grad_scales is not None,
        capability=launch.device_capability(logits.device),
        given_lse=options["given_lse"],
        metrics=correct is not None,
    )
    _cross_entropy_rows_kernel[(num_rows,)](
        logits,
        logits.stride(0),
        targets.contiguous(),
        scales,
        losses,
        lse,
        losses if correct is None else correct,
        losses if entropy is None else entropy,
        num_cols,
        col_offset,
        float(options["softcap"] or 1.0),
        float(options["label_smoothing"]),
        float(options["label_smoothing"]) / vocab_size,
        float(options["z_loss_scale"]),
        **config.constexprs,
        **config.options(),
    )


# (write_grad, given_lse, metrics) the launchers use: loss only, loss + gradient, each with or without the
# token metrics, and the gradient of a vocabulary slice from a given lse (memory="low")
ROW_MODES = (
    (False, False, False),
    (True, False, False),
    (False, False, True),
    (True, False, True),
    (True, True, False),
)


def compile_cases(capability: launch.Capability):
    """Every configuration the launcher can choose on a GPU of ``capability``.

    Args:
        capability: (major, minor) of the target GPU.

    Returns:
        An iterator of ``CompileCase``s, each configuration once (for fp16|bf16|fp32|fp64 logits).
    """
    seen = set()
    for dtype in launch.TYPE_NAMES:
        for vocab_size in (1000, SMALL_BLOCK_V, SMALL_BLOCK_V + 1, 128256):
            for has_softcap in (False, True):
                for write_grad, given_lse, metrics in ROW_MODES:
                    config = rows_launch_config(
                        vocab_size, dtype, has_softcap=has_softcap, write_grad=write_grad, capability=capability,
                        given_lse=given_lse, metrics=metrics,
                    )  # fmt: skip
                    divisible_ints = ("stride_row", "num_cols") if vocab_size % 16 == 0 else ()
                    key = (dtype, divisible_ints, config.describe())
                    if key not in seen:
                        seen.add(key)
                        yield launch.CompileCase.of(
                            "cross_entropy_rows", launch.TYPE_NAMES[dtype], _cross_entropy_rows_kernel,
                            _pointer_types(dtype), config, divisible_ints,
                        )  # fmt: skip


def _pointer_types(dtype: torch.dtype) -> dict[str, str]:
    """The row kernel's pointer types for ``dtype`` logits: int64 targets, every per-row vector in the
    accumulation dtype (the other arguments' types come from the kernel: ``kernel_signature``)."""
    per_row = f"*{launch.TYPE_NAMES[accumulation_dtype(dtype)]}"
    vectors = ("scales_ptr", "losses_ptr", "lse_ptr", "correct_ptr", "entropy_ptr")
    return dict(logits_ptr=f"*{launch.TYPE_NAMES[dtype]}", targets_ptr="*i64", **dict.fromkeys(vectors, per_row))
