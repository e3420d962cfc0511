"""Chunk driver of the fused linear cross-entropy, shared by both backends.

Only *learned* tokens (valid target, weight > 0) reach this module: the caller passes their row
indices ``rows`` into ``hidden``, so ignored and zero-weight tokens cost no matmul at all. For chunks
of C learned tokens the driver computes the logits with a plain matmul (cuBLAS on GPU), hands them to a
backend *row op*, and turns the row op's logit gradients into the gradients of hidden, weight and bias.
It never holds more than one ``[C, V]`` logits chunk.

Row op contract (the one place for the formula; ``mrloss.ops.backends.torch`` and
``mrloss.ops.backends.triton.cross_entropy_rows`` implement exactly this, in float32 at least):

    row_op(logits, targets, grad_scales, *, softcap, label_smoothing, z_loss_scale=0.0,
           lse_out=None, correct_out=None, entropy_out=None) -> losses

    logits      [C, V] fp16|bf16|fp32|fp64, contiguous, raw a_i = h_i W^T + b; scratch, overwritten
    targets     [C]    int64 in [0, V)
    grad_scales [C]    float s_i, or None (loss only; logits are then left as scratch)
    losses      [C]    fp32 (fp64 for fp64 logits), the cross-entropy without the z-loss:
        z_i = c * tanh(a_i / c)  with softcap c, else a_i;   lse_i = logsumexp(z_i)
        l_i = lse_i - (1 - eps) * z_i[t_i] - eps / V * sum_j z_i[j]     (eps = label_smoothing)
    the *_out rows [C] (accumulation dtype), each filled when given, at no extra matmul:
        lse_out lse_i;  correct_out 1.0 where argmax_j z_i[j] == t_i else 0.0 (first maximum);
        entropy_out -sum_j p_ij log p_ij with p_i = softmax(z_i)
    and, when grad_scales is given, logits[i] is overwritten (in its own dtype) with the gradient of
    s_i * (l_i + zeta * lse_i^2) (zeta = z_loss_scale):
        s_i * ((1 + 2 zeta lse_i) softmax(z_i) - (1 - eps) * onehot(t_i) - eps / V)
            * (1 - (z_i / c)^2 if softcap else 1)

The low-memory mode (``mrloss.ops.low_memory``) also needs the same gradient on a vocabulary slice, given lse:

    slice_grad_op(logits, targets, lse, grad_scales, *, col_offset, vocab_size, softcap, label_smoothing,
                  z_loss_scale=0.0) -> None
    logits [C, V_s] = columns col_offset ... col_offset + V_s - 1 of the rows (any row stride, unit column
    stride), overwritten with those columns of the gradient above; lse [C] and grad_scales [C] float.

The PyTorch row op also takes ``vocab_shard`` (``mrloss.ops.backends.torch.VocabShard``): the logits are the
columns [start, start + V_local) of a vocabulary of V split over ranks, targets are global ids, and the row max,
Σexp, target logit and Σz are reduced over the shards through its callbacks before the same formula is applied
(``mrloss.parallel_vocab`` passes collectives).

A backend may also offer a fused loss-only forward (``mrloss.ops.backends.triton.linear_cross_entropy_forward``),
the same losses l_i (and lse_i, and the token metrics) without any logits in memory (a_i accumulated in float32);
``mrloss.ops.function`` uses it for passes that need no gradient, with memory="fast":

    fused_losses(hidden, weight, bias, rows, targets, *, softcap, label_smoothing, lse_out=None, correct_out=None,
                 entropy_out=None) -> losses [M] fp32
    (arguments as in ``chunked_linear_cross_entropy``; fp16|bf16|fp32 inputs; the outputs [M] fp32, the metrics
    filled when either is given)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype

RowOp = Callable[..., torch.Tensor]
SliceGradOp = Callable[..., None]
FusedLosses = Callable[..., torch.Tensor]


class RowStats(NamedTuple):
    """Per learned row, [M] in the accumulation dtype: losses l_i (no z-loss), lse_i, and the token metrics
    (``correct`` 1.0/0.0, ``entropy``) or None when not asked for."""

    losses: torch.Tensor
    lse: torch.Tensor
    correct: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


class TokenMetrics(NamedTuple):
    """Per-token metrics without logits, detached float32 (shape of targets in ``linear_cross_entropy``):
    accuracy 1.0 where argmax of the softcapped logits is the target; entropy of their softmax."""

    accuracy: torch.Tensor
    entropy: torch.Tensor


class ChunkedResult(NamedTuple):
    """rows: `RowStats`; gradients are None unless asked for.

    grad_hidden [N, H] in hidden's dtype (zero rows for tokens not in ``rows``);
    grad_weight [V, H] and grad_bias [V] in the accumulation dtype (fp32, or fp64 for fp64 inputs).
    """

    rows: RowStats
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


MIN_CHUNK_SIZE = 256


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk so that one ``[C, V]`` logits chunk takes about as many bytes as the hidden
    states ``[N, H]`` (C ~ N * H / V), rounded up to a multiple of 8 for the matmuls, and at least
    MIN_CHUNK_SIZE: skinnier matmuls lose speed (measured on CPU), and 256 * V logits stay small next
    to the float32 [V, H] weight-gradient buffer whenever H >= 256."""
    chunk = -(-num_tokens * hidden_size // vocab_size)
    return max(MIN_CHUNK_SIZE, -(-chunk // 8) * 8)


MIN_VOCAB_SLICE = 1024


def vocab_slice_size(chunk_size: int, hidden_size: int, vocab_size: int) -> int:
    """Vocabulary rows per slice so that a float32 ``[V_s, H]`` weight-gradient block is about the size of one
    ``[C, V]`` logits chunk (V_s ~ C * V / H), and at least MIN_VOCAB_SLICE (matmul efficiency)."""
    return max(chunk_size * vocab_size // hidden_size, MIN_VOCAB_SLICE)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    grad_scales: torch.Tensor | None,
    *,
    row_op: RowOp,
    softcap: float | None,
    label_smoothing: float,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    z_loss_scale: float = 0.0,
    metrics: bool = False,
) -> ChunkedResult:
    """Per-token losses of the rows ``rows`` of ``hidden`` and, with ``grad_scales``, the gradients of
    ``sum_i grad_scales[i] * (losses[i] + z_loss_scale * lse[i]^2)``.

    hidden [N, H], weight [V, H], bias [V] or None (all one dtype); rows [M] int64 (unique indices into
    hidden), targets [M] int64 in [0, V), grad_scales [M] float or None (loss only);
    needs_grad: which of (hidden, weight, bias) gradients to build; metrics: fill the token metrics. The weight
    and bias gradients are accumulated across chunks in fp32 (fp64 for fp64 inputs), each chunk's product
    computed in the inputs' dtype. Deterministic: chunks run in order, rows are written with ``index_copy_``.
    """
    acc_dtype = accumulation_dtype(hidden.dtype)
    num_rows = rows.numel()
    stats = RowStats(*(torch.empty(num_rows, dtype=acc_dtype, device=hidden.device) for _ in range(2 + 2 * metrics)))
    want_hidden, want_weight, want_bias = (grad_scales is not None and need for need in needs_grad)
    want_bias = want_bias and bias is not None
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if want_bias else None

    for start in range(0, num_rows, chunk_size):
        chunk_rows = rows[start : start + chunk_size]
        chunk_hidden = hidden.index_select(0, chunk_rows)
        if bias is None:
            logits = chunk_hidden @ weight.T
        else:
            logits = torch.addmm(bias, chunk_hidden, weight.T)
        chunk_scales = None if grad_scales is None else grad_scales[start : start + chunk_size]
        chunk = slice(start, start + chunk_size)
        stats.losses[chunk] = row_op(
            logits,
            targets[chunk],
            chunk_scales,
            softcap=softcap,
            label_smoothing=label_smoothing,
            z_loss_scale=z_loss_scale,
            lse_out=stats.lse[chunk],
            correct_out=None if stats.correct is None else stats.correct[chunk],
            entropy_out=None if stats.entropy is None else stats.entropy[chunk],
        )
        if chunk_scales is None:
            continue
        grad_logits = logits  # overwritten in place by the row op
        if want_hidden:
            grad_hidden.index_copy_(0, chunk_rows, grad_logits @ weight)
        if want_weight:
            _accumulate_weight_grad(grad_weight, grad_logits, chunk_hidden)
        if want_bias:
            grad_bias += grad_logits.sum(0, dtype=acc_dtype)
    return ChunkedResult(stats, grad_hidden, grad_weight, grad_bias)


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, chunk_hidden: torch.Tensor):
    """grad_weight [V, H] (accumulation dtype) += grad_logits[C, V]^T @ chunk_hidden [C, H].

    Same dtype: one in-place addmm. Half/bfloat16 inputs: the product is computed in the inputs' dtype
    (tensor cores) and added to the fp32 buffer slice by slice of vocabulary rows, so the temporary is
    one ``[V_slice, H]`` block about the size of the logits chunk, never a second ``[V, H]`` matrix.
    """
    if grad_logits.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_logits.T, chunk_hidden)
        return
    vocab_size, hidden_size = grad_weight.shape
    rows_per_slice = vocab_slice_size(grad_logits.shape[0], hidden_size, vocab_size)
    for start in range(0, vocab_size, rows_per_slice):
        stop = start + rows_per_slice
        grad_weight[start:stop] += grad_logits[:, start:stop].T @ chunk_hidden
