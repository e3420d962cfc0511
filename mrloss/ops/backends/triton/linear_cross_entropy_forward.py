"""Fused Triton forward of the linear cross-entropy: per-row losses straight from the hidden states.

Loss only (no gradients, no autograd): the loss-only passes of ``mrloss.ops.api`` with backend="triton"
use it instead of the chunked matmul + row op, so no ``[C, V]`` logits chunk is ever written to
memory; the extra memory is O(M) (the losses). Formula and contract: ``mrloss.ops.chunked`` (row op
contract, ``grad_scales`` None), with a_i = h_i W^T + b computed here in float32.

Tiling: one program per BLOCK_N learned rows (gathered by index from ``hidden``, never copied). It loops
over the vocabulary in BLOCK_V tiles; for each tile the [BLOCK_N, BLOCK_V] logits are accumulated in
float32 registers by ``tl.dot`` over H in BLOCK_H steps (+ bias, softcap), then folded into per-row
running max / sum-exp (online logsumexp), the target logit (picked when the target falls in the tile)
and the sum of logits (label smoothing). Only those four [BLOCK_N] vectors live across tiles. Each row's
logsumexp is stored beside its loss (memory="low" and the z-loss use it). With METRICS (the token metrics of
``mrloss.ops.chunked.TokenMetrics``) two more live across tiles, as in the row kernel: the first column of the
running maximum (accuracy: it is the target) and sum_j exp(z_j - max) z_j (entropy = lse - that / sum-exp).
Each program reads all of ``weight`` once per BLOCK_N rows. No atomics: deterministic.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from mrloss.ops.backends.triton import launch
from mrloss.ops.backends.triton.tl_math import softcapped

# Block sizes are fixed, not autotuned: they were chosen without a GPU to tune on. GPU: the usual
# tensor-core friendly tile (a 64 x 128 fp32 accumulator). Interpreter: small tiles (numpy per tile).
GPU_BLOCKS = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32)
FORWARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the inputs it takes; logits in float32


@triton.jit
def _linear_cross_entropy_forward_kernel(
    hidden_ptr,
    stride_hidden_row,
    stride_hidden_col,
    weight_ptr,
    stride_weight_row,
    stride_weight_col,
    bias_ptr,
    stride_bias,
    rows_ptr,
    targets_ptr,
    losses_ptr,
    lse_ptr,
    correct_ptr,
    entropy_ptr,
    num_rows,
    hidden_size,
    vocab_size,
    softcap: tl.float32,
    label_smoothing: tl.float32,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    METRICS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offsets < num_rows
    hidden_rows = tl.load(rows_ptr + offsets, mask=row_mask, other=0).to(tl.int64)
    targets = tl.load(targets_ptr + offsets, mask=row_mask, other=0)
    hidden_row_ptrs = hidden_ptr + hidden_rows[:, None] * stride_hidden_row

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_logits = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_logits = tl.zeros((BLOCK_N,), tl.float32)  # sum_j exp(z_j - running_max) z_j (entropy)
    best = tl.zeros((BLOCK_N,), tl.int32)  # first column of the maximum (accuracy)
    for v_start in range(0, vocab_size, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab_size
        weight_col_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_weight_row
        logits = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for h_start in range(0, hidden_size, BLOCK_H):
            ks = h_start + tl.arange(0, BLOCK_H)
            k_mask = ks < hidden_size
            ks = ks.to(tl.int64)  # column offsets times a transposed view's large stride
            h = tl.load(
                hidden_row_ptrs + ks[None, :] * stride_hidden_col, mask=row_mask[:, None] & k_mask[None, :], other=0.0
            )
            w = tl.load(
                weight_col_ptrs + ks[:, None] * stride_weight_col,  # [BLOCK_H, BLOCK_V] = W^T tile
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            logits = tl.dot(h, w, logits, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_mask, other=0.0)
            logits += bias.to(tl.float32)[None, :]
        z = softcapped(logits, softcap, HAS_SOFTCAP)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        rescale = tl.exp(running_max - new_max)
        exp_z = tl.exp(z - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(exp_z, axis=1)
        if METRICS:
            sum_exp_logits = sum_exp_logits * rescale + tl.sum(exp_z * tl.where(col_mask[None, :], z, 0.0), axis=1)
            best = tl.where(tile_max > running_max, v_start + tl.argmax(z, axis=1), best)
        running_max = new_max
        sum_logits += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    lse = running_max + tl.log(sum_exp)
    losses = lse - (1.0 - label_smoothing) * target_logit - label_smoothing / vocab_size * sum_logits
    tl.store(losses_ptr + offsets, losses, mask=row_mask)
    tl.store(lse_ptr + offsets, lse, mask=row_mask)
    if METRICS:
        tl.store(correct_ptr + offsets, tl.where(best == targets, 1.0, 0.0), mask=row_mask)
        tl.store(entropy_ptr + offsets, lse - sum_exp_logits / sum_exp, mask=row_mask)


def forward_launch_config(
    dtype: torch.dtype,
    *,
    has_bias: bool,
    has_softcap: bool,
    capability: launch.Capability,
    metrics: bool = False,
    blocks: dict | None = None,
) -> launch.LaunchConfig:
    """The fused forward's configuration on a GPU.

    Args:
        dtype: fp16|bf16|fp32 of hidden, weight and bias.
        has_bias, has_softcap, metrics: a bias; a softcap; the token metrics.
        capability: (major, minor) of the GPU (one configuration fits sm_80 and sm_90).
        blocks: BLOCK_N / BLOCK_V / BLOCK_H overrides.

    Returns:
        The ``LaunchConfig``: 64 x 128 float32 accumulator tiles over 64-wide H steps (32-wide for float32, whose
        IEEE products run on FMA units and would spill registers on sm_80 at 64), 8 warps, 3 stages.
    """
    del capability  # one configuration fits sm_80 and sm_90 (see the compile check's table)
    tiles = dict(GPU_BLOCKS, BLOCK_H=32) if dtype == torch.float32 else GPU_BLOCKS
    return launch.LaunchConfig(
        constexprs=dict(
            HAS_BIAS=has_bias,
            HAS_SOFTCAP=has_softcap,
            METRICS=metrics,
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            **dict(tiles, **(blocks or {})),
        ),
        num_warps=8,
        num_stages=3,
    )


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    label_smoothing: float,
    blocks: dict[str, int] | None = None,
    lse_out: torch.Tensor | None = None,
    correct_out: torch.Tensor | None = None,
    entropy_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row losses of the rows ``rows`` of ``hidden``, without materializing logits (formula:
    ``mrloss.ops.chunked``). Logits are accumulated in float32 (fp32 inputs exactly: IEEE products, no TF32).

    Args:
        hidden: [N, H]; weight: [V, H]; bias: [V] or None. One dtype of fp16|bf16|fp32, any strides (each is read
            through its own strides, never copied).
        rows: [M] int64 indices into hidden; targets: [M] int64 in [0, V) (any strides: made contiguous, O(M)).
        softcap, label_smoothing: the loss options.
        blocks: BLOCK_N / BLOCK_V / BLOCK_H (each a power of two >= 16) overriding the per-device tiles.
        lse_out: [M] fp32 contiguous, filled with each row's logsumexp when given.
        correct_out, entropy_out: [M] fp32 contiguous; when either is given both token metrics are computed:
            1.0 where the first maximum of the softcapped logits is the target (else 0.0), and their softmax's
            entropy.

    Returns:
        losses [M] fp32.
    """
    if hidden.dtype not in FORWARD_DTYPES:
        raise TypeError(f"linear_cross_entropy_forward takes float16, bfloat16 or float32, got {hidden.dtype}")
    num_rows = rows.numel()
    losses = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    if num_rows == 0:
        return losses
    lse = torch.empty_like(losses) if lse_out is None else lse_out
    correct, entropy = launch.metric_buffers(losses, correct_out, entropy_out)
    config = forward_launch_config(
        hidden.dtype,
        has_bias=bias is not None,
        has_softcap=softcap is not None,
        capability=launch.device_capability(hidden.device),
        metrics=correct is not None,
        blocks=blocks,
    )
    options = config.options()
    if launch.triton_interpreted():
        hidden, weight, bias = _for_interpreter(config, blocks, hidden, weight, bias)
        options = {}  # no launch options
    _launch_forward(
        hidden, weight, bias, rows, targets, (losses, lse, correct, entropy), float(softcap or 1.0),
        float(label_smoothing), config, options,
    )  # fmt: skip
    return losses


def _for_interpreter(config: launch.LaunchConfig, blocks, hidden, weight, bias):
    """(hidden, weight, bias) and ``config`` (updated in place) for the interpreter, numpy per tile: small tiles
    (``blocks`` still winning), and bfloat16 dot operands as float32, because the interpreter multiplies their raw
    bits (the products are exact in float32 either way)."""
    config.constexprs.update(INTERPRETER_BLOCKS, **(blocks or {}))
    if hidden.dtype == torch.bfloat16:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    return hidden, weight, bias


def _launch_forward(hidden, weight, bias, rows, targets, outputs, softcap, label_smoothing, config, options) -> None:
    """One program per BLOCK_N rows; ``outputs`` = (losses, lse, correct, entropy) [M] fp32 are written, the metrics
    when not None (else a dummy pointer, never written without METRICS)."""
    losses, lse, correct, entropy = outputs
    vocab_size, hidden_size = weight.shape
    num_rows = rows.numel()
    grid = (triton.cdiv(num_rows, config.constexprs["BLOCK_N"]),)
    _linear_cross_entropy_forward_kernel[grid](
        hidden,
        hidden.stride(0),
        hidden.stride(1),
        weight,
        weight.stride(0),
        weight.stride(1),
        weight if bias is None else bias,
        0 if bias is None else bias.stride(0),  # weight: dummy bias pointer
        rows.contiguous(),
        targets.contiguous(),
        losses,
        lse,
        losses if correct is None else correct,  # losses: dummy pointers
        losses if entropy is None else entropy,
        num_rows,
        hidden_size,
        vocab_size,
        softcap,
        label_smoothing,
        **config.constexprs,
        **options,
    )


def compile_cases(capability: launch.Capability):
    """Every configuration the launcher can choose on a GPU of ``capability``, for contiguous hidden and weight
    (their column strides are 1: a constant on a GPU launch).

    Args:
        capability: (major, minor) of the target GPU.

    Returns:
        An iterator of ``CompileCase``s (fp16|bf16|fp32 inputs x bias x softcap x metrics).
    """
    for dtype, has_bias, has_softcap, metrics in itertools.product(FORWARD_DTYPES, *[(False, True)] * 3):
        config = forward_launch_config(
            dtype, has_bias=has_bias, has_softcap=has_softcap, capability=capability, metrics=metrics
        )
        config = launch.LaunchConfig(
            dict(config.constexprs, stride_hidden_col=1, stride_weight_col=1), config.num_warps, config.num_stages
        )
        inputs, per_row = f"*{launch.TYPE_NAMES[dtype]}", "*fp32"
        types = dict(
            hidden_ptr=inputs, weight_ptr=inputs, bias_ptr=inputs, rows_ptr="*i64", targets_ptr="*i64",
            losses_ptr=per_row, lse_ptr=per_row, correct_ptr=per_row, entropy_ptr=per_row,
            stride_hidden_col="constexpr", stride_weight_col="constexpr",
        )  # fmt: skip
        divisible_ints = ("stride_hidden_row", "stride_weight_row", "hidden_size", "vocab_size")
        yield launch.CompileCase.of(
            "linear_cross_entropy_forward", launch.TYPE_NAMES[dtype], _linear_cross_entropy_forward_kernel, types,
            config, divisible_ints,
        )  # fmt: skip
