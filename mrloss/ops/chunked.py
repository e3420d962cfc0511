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
        lse_out lse_i;  correct_out 1.0 where argmax_j z_i[j] == t_i else 0.0 (first maximum; the PyTorch row op
        counts a row with a NaN as wrong);
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

import contextlib
import math
import warnings
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
    grad_weight [V, H] and grad_bias [V] in the accumulation dtype (fp32, or fp64 for fp64 inputs);
    grad_logits [M, V] in the inputs' dtype: the learned rows' logit gradients, kept instead of grad_weight (None)
    when the weight gradient is deferred (``defers_weight_grad``; ``deferred_weight_grad`` builds it later).
    """

    rows: RowStats
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None
    grad_logits: torch.Tensor | None = None


MIN_CHUNK_SIZE = 256
# Learned rows per chunk that the weight-gradient product [V, C] x [C, H] -> float32 [V, H] needs to be bound by
# its FLOPs rather than by the float32 buffer's traffic: it moves ~8 V H bytes for 2 C V H FLOPs, C / 4 FLOP per
# byte, against ~265 (lent H100: 798 TFLOP/s bf16 over ~3.0 TB/s) or ~185 (H200, ~4.3 TB/s): 2048 leaves ~2x margin
# (bench/roofline.py predicts the step; the GPU pass also times the old rule's size and 4096).
WEIGHT_GRAD_CHUNK_SIZE = 2048


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: at least ``WEIGHT_GRAD_CHUNK_SIZE`` where memory allows, else what the old rule gives.

    Memory budget: a ``[C, V]`` logits chunk no larger than the weight ``[V, H]`` itself (C <= H), a fraction of
    what the fast mode holds anyway (the weight, its float32 gradient buffer and the gradient). Below that, the
    old rule: one chunk takes about as many bytes as the hidden states ``[N, H]`` (C ~ N * H / V), and at least
    MIN_CHUNK_SIZE (skinnier matmuls lose speed). Rounded up to a multiple of 8 for the matmuls. Fewer, larger
    chunks also mean fewer passes over the float32 ``[V, H]`` buffer (one per chunk, ``add_product``)."""
    chunk = max(MIN_CHUNK_SIZE, -(-num_tokens * hidden_size // vocab_size), min(WEIGHT_GRAD_CHUNK_SIZE, hidden_size))
    return -(-chunk // 8) * 8


def defers_weight_grad(num_rows: int, hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether the weight gradient of ``num_rows`` learned rows is deferred to backward: when their logit gradients
    ``[M, V]`` in the inputs' ``dtype`` take no more memory than the accumulation-dtype ``[V, H]`` buffer they replace
    (M <= 2 H for bf16/fp16, M <= H for fp32/fp64). The deferred gradient is one matmul with K = M, written once in
    the inputs' dtype, instead of one float32 [V, H] read-modify-write per chunk plus a scale and a cast: with few
    learned rows (many zero weights) those fixed passes over [V, H] would cost as much as the matmuls."""
    return num_rows * dtype.itemsize <= hidden_size * accumulation_dtype(dtype).itemsize


MIN_VOCAB_SLICE = 1024


def vocab_slice_size(chunk_size: int, hidden_size: int, vocab_size: int) -> int:
    """Vocabulary rows per slice so that a float32 ``[V_s, H]`` weight-gradient block is about the size of one
    ``[C, V]`` logits chunk (V_s ~ C * V / H), and at least MIN_VOCAB_SLICE (matmul efficiency)."""
    return max(chunk_size * vocab_size // hidden_size, MIN_VOCAB_SLICE)


class RowOptions(NamedTuple):
    """The row formula's options, the keywords of the row op and the slice gradient op (contract above): softcap c
    (float or None), label smoothing eps and z-loss scale zeta (floats)."""

    softcap: float | None
    label_smoothing: float
    z_loss_scale: float = 0.0

    @classmethod
    def of(cls, options) -> RowOptions:
        """The row options of a ``mrloss.ops.options.LossOptions`` (its fields of the same names)."""
        return cls(*(getattr(options, name) for name in cls._fields))

    def objective(self, losses: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """o_i = l_i + zeta lse_i^2 per row (``losses`` itself when zeta is 0)."""
        return losses + self.z_loss_scale * lse.square() if self.z_loss_scale else losses


def chunk_logits(
    chunk_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw logits ``[C, V] = chunk_hidden [C, H] @ weight [V, H]^T (+ bias [V])``, one matmul in the inputs' dtype
    (into ``out`` [C, V], contiguous, when given)."""
    if bias is None:
        return torch.mm(chunk_hidden, weight.T, out=out)
    return torch.addmm(bias, chunk_hidden, weight.T, out=out)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    grad_scales: torch.Tensor | None,
    *,
    row_op: RowOp,
    row_options: RowOptions,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    metrics: bool = False,
    defer_weight_grad: bool = False,
) -> ChunkedResult:
    """Per-token losses of the rows ``rows`` of ``hidden`` and, with ``grad_scales``, the gradients of
    ``sum_i grad_scales[i] * (losses[i] + z_loss_scale * lse[i]^2)``.

    hidden [N, H], weight [V, H], bias [V] or None (all one dtype); rows [M] int64 (unique indices into
    hidden), targets [M] int64 in [0, V), grad_scales [M] float or None (loss only); row_options: the formula's
    options (`RowOptions`); needs_grad: which of (hidden, weight, bias) gradients to build; metrics: fill the
    token metrics. The weight and bias gradients are accumulated across chunks in fp32 (fp64 for fp64 inputs);
    each chunk's weight-gradient product multiplies in the inputs' dtype and adds in fp32 (``add_product``: never
    rounded to bf16). defer_weight_grad: where ``defers_weight_grad`` allows, keep the logit gradients of all rows
    (``grad_logits``) instead (the chunks' logits are computed into it) and leave grad_weight None.
    Deterministic: chunks run in order, rows are written with ``index_copy_``.
    """
    wanted = tuple(grad_scales is not None and need for need in needs_grad)
    defer = defer_weight_grad and wanted[1] and defers_weight_grad(rows.numel(), hidden.shape[1], hidden.dtype)
    result = _result_buffers(hidden, weight, bias, rows.numel(), wanted, metrics, defer)
    stats = result.rows
    for start in range(0, rows.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        chunk_hidden = hidden.index_select(0, rows[chunk])
        kept = result.grad_logits  # deferred: the chunk's logits, then their gradients, are its rows
        logits = chunk_logits(chunk_hidden, weight, bias, out=None if kept is None else kept[chunk])
        chunk_scales = None if grad_scales is None else grad_scales[chunk]
        stats.losses[chunk] = row_op(
            logits,
            targets[chunk],
            chunk_scales,
            lse_out=stats.lse[chunk],
            correct_out=None if stats.correct is None else stats.correct[chunk],
            entropy_out=None if stats.entropy is None else stats.entropy[chunk],
            **row_options._asdict(),
        )
        if chunk_scales is not None:  # the row op overwrote the logits with their gradient
            _add_chunk_gradients(result, logits, rows[chunk], chunk_hidden, weight, first=start == 0)
    return result


def _result_buffers(hidden, weight, bias, num_rows: int, wanted: tuple[bool, bool, bool], metrics: bool, defer: bool):
    """The `ChunkedResult` the chunks fill: [M] row statistics in the accumulation dtype (the metrics with
    ``metrics``), and the gradients of ``wanted`` (hidden, weight, bias) as in `ChunkedResult`, else None; with
    ``defer`` the [M, V] logit gradients instead of the weight gradient's buffer."""
    acc_dtype = accumulation_dtype(hidden.dtype)
    stats = RowStats(*(torch.empty(num_rows, dtype=acc_dtype, device=hidden.device) for _ in range(2 + 2 * metrics)))
    want_hidden, want_weight, want_bias = wanted
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grad_weight = grad_logits = None
    if defer:
        grad_logits = torch.empty(num_rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    elif want_weight:  # every chunk adds into it, the first one with beta=0: no zero fill unless there is no chunk
        allocate_grad_weight = torch.empty if num_rows else torch.zeros
        grad_weight = allocate_grad_weight(weight.shape, dtype=acc_dtype, device=weight.device)
    want_bias = want_bias and bias is not None
    grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if want_bias else None
    return ChunkedResult(stats, grad_hidden, grad_weight, grad_bias, grad_logits)


def _add_chunk_gradients(result: ChunkedResult, grad_logits, chunk_rows, chunk_hidden, weight, *, first: bool) -> None:
    """Fold one chunk's ``grad_logits [C, V]`` into the gradient buffers of ``result`` that are not None: rows
    ``chunk_rows`` of grad_hidden, grad_weight (``first``: overwritten) and grad_bias."""
    if result.grad_hidden is not None:
        result.grad_hidden.index_copy_(0, chunk_rows, grad_logits @ weight)
    if result.grad_weight is not None:
        add_product(result.grad_weight, grad_logits.T, chunk_hidden, first=first)
    if result.grad_bias is not None:
        result.grad_bias.add_(grad_logits.sum(0, dtype=result.grad_bias.dtype))


FALLBACK_BLOCK_ELEMENTS = 1 << 22  # accumulation-dtype temporaries of the CPU paths below: at most 16 MiB per block
_out_dtype_failure: list[str] = []  # why this torch's CUDA addmm(out_dtype=...) could not be used, once


def _row_blocks(num_rows: int, row_elements: int) -> list[slice]:
    """Slices of ``num_rows`` rows, each holding at most FALLBACK_BLOCK_ELEMENTS elements (at least one row)."""
    rows_per_block = max(1, FALLBACK_BLOCK_ELEMENTS // max(1, row_elements))
    return [slice(start, start + rows_per_block) for start in range(0, num_rows, rows_per_block)]


def add_product(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, first: bool = False) -> None:
    """accumulator [M, N] (accumulation dtype) += left [M, K] @ right [K, N] (``first``: = instead of +=; the
    accumulator's content is then ignored, so it may be uninitialized).

    left/right in the accumulator's dtype: one in-place addmm. Half/bfloat16 left/right into a float32 accumulator:
    on CUDA one cuBLAS call that multiplies in the inputs' dtype (tensor cores), accumulates in float32 and adds
    straight into the accumulator (``torch.addmm(..., out_dtype=float32, out=accumulator)``: 8 M N bytes of
    accumulator traffic, no temporary). Elsewhere (aten has no CPU kernel for it) the same float32 arithmetic from
    upcast operands (half/bfloat16 products are exact in float32), in row blocks of at most
    FALLBACK_BLOCK_ELEMENTS upcast elements. If this torch's CUDA build refuses out_dtype, it warns once and adds
    the product computed in the inputs' dtype (rounded to it once per call) block by block.
    """
    beta = 0 if first else 1
    if left.dtype == accumulator.dtype:
        accumulator.addmm_(left, right, beta=beta)
        return
    if accumulator.is_cuda and not _out_dtype_failure:
        try:
            torch.addmm(accumulator, left, right, beta=beta, out_dtype=accumulator.dtype, out=accumulator)
            return
        except RuntimeError as error:  # NotImplementedError included; not out-of-memory
            if isinstance(error, torch.OutOfMemoryError):
                raise
            _out_dtype_failure.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")
            warnings.warn(
                f"mrloss: torch {torch.__version__} cannot add a {left.dtype} product into a {accumulator.dtype} "
                f"buffer with torch.addmm(out_dtype=...) on CUDA ({_out_dtype_failure[0]}); the weight gradient "
                "is accumulated from products rounded to the inputs' dtype instead (slower, less exact)",
                RuntimeWarning,
                stacklevel=2,
            )
    blocks = _row_blocks(left.shape[0], left.shape[1])
    if accumulator.is_cuda:
        for block in blocks:
            product = left[block] @ right
            accumulator[block] = product if first else accumulator[block] + product
        return
    right = right.to(accumulator.dtype)
    for block in blocks:
        accumulator[block].addmm_(left[block].to(accumulator.dtype), right, beta=beta)


def deferred_weight_grad(
    grad_logits: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor, upstream: torch.Tensor
) -> torch.Tensor:
    """The deferred weight gradient ``[V, H] = grad_logits^T [V, M] @ (upstream * hidden[rows]) [M, H]``, in the
    inputs' dtype: one matmul with K = M that accumulates in float32 (fp64 for fp64: cuBLAS with its
    reduced-precision reductions switched off, oneDNN / PyTorch's CPU BLAS in float32 for half/bfloat16) and rounds
    once into the inputs' dtype.

    grad_logits [M, V] and hidden [N, H] in one dtype, rows [M] int64, upstream a 0-dim float tensor (the
    upstream gradient of the reduced loss), folded into the [M, H] operand: computed in float32 and rounded
    once to the inputs' dtype, exact when upstream is a power of two (1, 1/2, ... as gradient accumulation over
    2^k micro-batches gives) or the inputs are float32/float64; otherwise bf16/fp16 operands carry one more
    rounding (relative 2^-9 / 2^-12 per element, the size of the logit gradients' own rounding).
    """
    scaled_rows = scale_gradient(hidden.index_select(0, rows), upstream, hidden.dtype)
    with _full_precision_reductions():
        return grad_logits.T @ scaled_rows


@contextlib.contextmanager
def _full_precision_reductions():
    """cuBLAS half/bfloat16 matmuls reduce in float32 only (no reduced-precision split-K reductions) inside."""
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = flags.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction = saved


def scale_gradient(grad: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * upstream as ``dtype`` (in place when grad has it): computed in grad's accumulation dtype (float32 at
    least), rounded once. upstream: a 0-dim float tensor on grad's device (no host sync).

    On CUDA one elementwise kernel (reads grad, writes the result: a float32 [V, H] buffer scaled and cast to
    bf16 in one pass, a bf16 gradient scaled in place). upstream is passed as a 1-element 1-dim tensor so that it
    takes part in type promotion: a 0-dim one would be rounded to a half dtype first. On a CPU the same, in row
    blocks (its elementwise ops would otherwise make float32 copies of the whole tensor)."""
    upstream = upstream.to(accumulation_dtype(grad.dtype)).reshape(1)
    out = grad if grad.dtype == dtype else torch.empty_like(grad, dtype=dtype)
    if grad.is_cuda or (grad.dtype == upstream.dtype and dtype == grad.dtype):
        return torch.mul(grad, upstream, out=out)
    for block in _row_blocks(grad.shape[0], math.prod(grad.shape[1:])):
        torch.mul(grad[block], upstream, out=out[block])
    return out
