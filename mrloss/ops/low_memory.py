"""Gradients of the fused linear cross-entropy without a float32 ``[V, H]`` buffer (``memory="low"``).

Given each learned row's logsumexp (from a loss-only pass), the gradients of
``sum_i s_i (l_i + zeta lse_i^2)`` are built slice by slice of the vocabulary: for each slice of V_s vocabulary
rows, every chunk of C learned rows recomputes its ``[C, V_s]`` logits block, the backend's slice gradient op
(contract: ``mrloss.ops.chunked``) turns it into dL/dlogits in place, and the block is folded into

    grad_hidden_acc [M, H] fp32  += G @ W_s        (all slices; cast into hidden's dtype once at the end)
    grad_weight_acc [V_s, H] fp32 += G^T @ h_c     (all chunks of this slice; written once in weight's dtype)

(``mrloss.ops.chunked.add_product``: products of the inputs' dtype accumulated in float32, never rounded)
    grad_bias_acc   [V_s] fp32    += sum_c G

so the weight gradient is never accumulated in half precision, and nothing of size ``[V, H]`` exists besides
the gradient itself (in weight's dtype). Extra memory: the fp32 ``[M, H]`` accumulator, one ``[V_s, H]`` fp32
block and one ``[C, V_s]`` logits block (V_s = ``vocab_slice_size``, at most half the vocabulary). Work:
6·M·H·V FLOPs (logits again, two gradient products), 8·M·H·V with the loss-only pass. Deterministic: fixed
loop order, no atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype
from mrloss.ops.chunked import RowOptions, SliceGradOp, add_product, chunk_logits, vocab_slice_size


def low_memory_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scales: torch.Tensor,
    *,
    slice_grad_op: SliceGradOp,
    row_options: RowOptions,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden [N, H] in hidden's dtype, grad_weight [V, H] and grad_bias [V] in weight's dtype), each None
    unless in ``needs_grad``. hidden [N, H], weight [V, H], bias [V] or None (one dtype); rows [M] unique int64
    indices into hidden; targets [M] int64; lse [M] and grad_scales [M] float (accumulation dtype); row_options:
    the formula's options (``mrloss.ops.chunked.RowOptions``)."""
    acc_dtype = accumulation_dtype(hidden.dtype)
    vocab_size, hidden_size = weight.shape
    want_hidden, want_weight, want_bias = needs_grad
    want_bias = want_bias and bias is not None
    hidden_acc = torch.zeros(rows.numel(), hidden_size, dtype=acc_dtype, device=hidden.device) if want_hidden else None
    grad_weight = torch.empty_like(weight) if want_weight else None
    grad_bias = torch.empty_like(bias) if want_bias else None
    chunks = _Chunks(hidden, rows, targets, lse.to(acc_dtype), grad_scales.to(acc_dtype), chunk_size)
    slice_rows = min(vocab_slice_size(chunk_size, hidden_size, vocab_size), -(-vocab_size // 2))  # 2+ slices

    for v_start in range(0, vocab_size, slice_rows):
        vocab = slice(v_start, v_start + slice_rows)
        _slice_gradients(chunks, weight, bias, vocab, (hidden_acc, grad_weight, grad_bias), slice_grad_op, row_options)

    grad_hidden = None
    if want_hidden:
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, hidden_acc.to(hidden.dtype))
    return grad_hidden, grad_weight, grad_bias


class _Chunks(NamedTuple):
    """The learned rows every vocabulary slice walks in chunks of ``size``: hidden [N, H], rows [M], targets [M],
    lse [M] and grad_scales [M] (accumulation dtype)."""

    hidden: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    lse: torch.Tensor
    grad_scales: torch.Tensor
    size: int


def _slice_gradients(chunks: _Chunks, weight, bias, vocab: slice, outputs, op, options: RowOptions) -> None:
    """One vocabulary slice ``vocab`` of the gradients: every chunk's ``[C, V_s]`` logits block recomputed, turned
    into dL/dlogits by the slice gradient ``op`` and folded into ``outputs`` = (hidden_acc [M, H] fp32, grad_weight,
    grad_bias), those not None: added into hidden_acc; the slice's float32 weight and bias accumulators written
    once into rows ``vocab`` of grad_weight and grad_bias."""
    hidden_acc, grad_weight, grad_bias = outputs
    want_weight, want_bias = grad_weight is not None, grad_bias is not None
    acc_dtype = accumulation_dtype(chunks.hidden.dtype)
    num_rows = chunks.rows.numel()
    weight_slice = weight[vocab]
    allocate_acc = torch.empty if num_rows else torch.zeros  # the first chunk's add_product overwrites it
    weight_acc = allocate_acc(weight_slice.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
    bias_acc = torch.zeros(weight_slice.shape[0], dtype=acc_dtype, device=weight.device) if want_bias else None
    for start in range(0, num_rows, chunks.size):
        chunk = slice(start, start + chunks.size)
        chunk_hidden = chunks.hidden.index_select(0, chunks.rows[chunk])
        block = chunk_logits(chunk_hidden, weight_slice, None if bias is None else bias[vocab])
        op(
            block,
            chunks.targets[chunk],
            chunks.lse[chunk],
            chunks.grad_scales[chunk],
            col_offset=vocab.start,
            vocab_size=weight.shape[0],
            **options._asdict(),
        )
        if hidden_acc is not None:
            add_product(hidden_acc[chunk], block, weight_slice)
        if want_weight:
            add_product(weight_acc, block.T, chunk_hidden, first=start == 0)
        if want_bias:
            bias_acc += block.sum(0, dtype=acc_dtype)
    if want_weight:
        grad_weight[vocab] = weight_acc
    if want_bias:
        grad_bias[vocab] = bias_acc
