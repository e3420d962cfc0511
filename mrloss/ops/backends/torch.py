"""Row ops of the chunked linear cross-entropy in plain PyTorch (runs anywhere).

The formula and the contract are documented once, in ``mrloss.ops.chunked``; the Triton kernel
``mrloss.ops.backends.triton.cross_entropy_rows`` computes the same thing. Math runs in float32 (float64 for
float64 logits), in place on the chunk where the dtype allows (the softmax overwrites the logits), so
the extra memory is at most two float32 copies of the ``[C, V]`` chunk (one for bf16/fp16 logits, one for the
softcap factor) and none for float32 logits without a softcap, plus buffers of a few rows or columns
(with the entropy one row block of the softmax pass, ``[C, V / MAX_COLUMN_BLOCK]``, ``[C, MAX_COLUMN_BLOCK]``).
The token metrics cost no extra pass over the chunk in memory: accuracy from the maxima of column blocks (the
row max's own pass) and a look into the target's block, entropy from the sums of the softmax pass
(lse - sum p z), which runs by blocks of rows that stay in cache, as the Triton kernel does it by tiles.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype

# Bytes of the chunk per row block of the softmax pass. On a CPU, per thread: z - m, exp and the row sums (and for
# the entropy a copy of z - m and its product with exp) all read the block from the cores' caches, not from memory,
# and every thread has work; on a GPU blocks are large (few launches) and bound the entropy's z - m buffer.
CPU_ROW_BLOCK_BYTES = 512 * 1024
GPU_ROW_BLOCK_BYTES = 64 * 1024 * 1024
# Columns per block of the row max when the accuracy is asked for: the blocks' maxima [C, V / MAX_COLUMN_BLOCK]
# (the same pass as amax) give the first block holding the row max, and only the target's block is read again.
MAX_COLUMN_BLOCK = 256


class VocabShard(NamedTuple):
    """The logits are columns ``[start, start + V_local)`` of a vocabulary of ``vocab_size`` split over ranks.

    all_reduce_max(row_max [C]) -> [C] and all_reduce_sum(stats [k, C]) -> [k, C]: the row statistics over
    every shard (``mrloss.parallel_vocab`` passes collectives; the backend knows nothing of them)."""

    start: int
    vocab_size: int
    all_reduce_max: Callable[[torch.Tensor], torch.Tensor]
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]


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
    vocab_shard: VocabShard | None = None,
) -> torch.Tensor:
    """Per-row loss of ``logits [C, V]`` against ``targets [C]``; with ``grad_scales [C]`` also
    overwrites ``logits`` with dL/dlogits; fills the given ``*_out`` rows. See ``mrloss.ops.chunked``.

    vocab_shard: ``logits [C, V_local]`` are one shard of the vocabulary (targets are global ids): the row
    max, Σexp, target logit and (label smoothing) Σz are reduced over the shards, so losses and ``lse_out``
    are those of the whole vocabulary and the gradient is that of this shard's columns; Σ q log q is reduced
    too for the entropy, and a row is correct when its target logit is the global row max (ties count)."""
    vocab_size = logits.shape[1] if vocab_shard is None else vocab_shard.vocab_size
    col_offset = 0 if vocab_shard is None else vocab_shard.start
    z, softcap_factor = _softcapped(logits, softcap, with_factor=grad_scales is not None)  # z may alias logits
    in_shard, target_columns = _local_targets(targets, col_offset, logits.shape[1])
    target_logits = torch.where(in_shard, z.gather(1, target_columns).squeeze(1), 0)
    sum_z = z.sum(1) if label_smoothing else None
    if correct_out is not None and vocab_shard is None:
        row_max, first_max_at_target = _max_and_first_max(z, target_columns.squeeze(1))
        correct_out.copy_(first_max_at_target)
    else:
        row_max = z.amax(1)
    if vocab_shard is not None:
        row_max = vocab_shard.all_reduce_max(row_max)
    probs, sum_exp, sum_q_shifted = _softmax_sums(z, row_max, with_sum_q_shifted=entropy_out is not None)
    if vocab_shard is not None:
        sum_exp, target_logits, sum_z, sum_q_shifted = _reduce_over_shards(
            vocab_shard, sum_exp, target_logits, sum_z, sum_q_shifted
        )
        if correct_out is not None:
            correct_out.copy_(target_logits >= row_max)
    losses = -(1 - label_smoothing) * target_logits
    if label_smoothing:
        losses = losses - label_smoothing / vocab_size * sum_z
    log_sum_exp = sum_exp.log()
    lse = row_max + log_sum_exp  # the whole vocabulary's, also for a shard
    losses = losses + lse
    if lse_out is not None:
        lse_out.copy_(lse)
    if entropy_out is not None:  # -sum p log p = lse - sum p z = log S - sum q (z - m) / S, q = exp(z - m), S = sum q
        entropy_out.copy_(log_sum_exp - sum_q_shifted / sum_exp)
    if grad_scales is not None:
        grad = probs.div_(sum_exp[:, None])  # softmax
        _finish_grad(
            grad, logits, targets, lse, grad_scales, softcap_factor, col_offset, vocab_size, label_smoothing,
            z_loss_scale,
        )  # fmt: skip
    return losses


def _softcapped(logits: torch.Tensor, softcap: float | None, *, with_factor: bool):
    """(z, factor): ``logits [C, V]`` in the accumulation dtype, softcapped c tanh(a / c) when ``softcap`` is set
    (in place: z aliases logits when they are in that dtype already), and with ``with_factor`` and a softcap the
    derivative 1 - tanh^2 [C, V] (d z / d a), else None."""
    acc_dtype = accumulation_dtype(logits.dtype)
    z = logits if logits.dtype == acc_dtype else logits.to(acc_dtype)
    factor = None
    if softcap is not None:
        z = z.div_(softcap).tanh_()
        if with_factor:
            factor = 1 - z.square()  # d(c tanh(a/c))/da = 1 - tanh^2
        z = z.mul_(softcap)
    return z, factor


def _local_targets(targets: torch.Tensor, col_offset: int, num_cols: int):
    """(inside [C] bool, columns [C, 1] int64): whether each target falls in the columns ``col_offset ...
    col_offset + num_cols - 1``, and its column there (clamped into range where it does not)."""
    local = targets - col_offset
    inside = (local >= 0) & (local < num_cols)
    return inside, local.clamp(0, num_cols - 1)[:, None]


def _max_and_first_max(z: torch.Tensor, columns: torch.Tensor):
    """(row_max [C], first [C] bool): the row maxima of ``z [C, V]`` (as ``amax``) and whether ``columns [C]``
    (int64) is the row's first column holding its maximum (argmax's rule: ties go to the earliest column; a row
    with a NaN has no maximum, never True).

    Without ``torch.max``'s slower index pass: the maxima of blocks of MAX_COLUMN_BLOCK columns (one pass, as
    ``amax``) give the first block holding the row max; the column must be in it and be the first maximum of its
    block, which is the only part of the row read again ([C, MAX_COLUMN_BLOCK])."""
    num_cols, width = z.shape[1], MAX_COLUMN_BLOCK
    full = num_cols - num_cols % width
    block_max = [z[:, :full].unflatten(1, (-1, width)).amax(2)] if full else []
    if full < num_cols:
        block_max.append(z[:, full:].amax(1, keepdim=True))
    block_max = torch.cat(block_max, 1)  # [C, ceil(V / width)]
    row_max = block_max.amax(1)
    first_block = (block_max == row_max[:, None]).to(torch.uint8).argmax(1)  # argmax: the first of equal values
    block_start = columns - columns % width
    block_columns = block_start[:, None] + torch.arange(width, device=z.device)
    # [C, width]; columns past V (last block) read column V - 1 again: after every real one, never a first maximum
    is_max = z.gather(1, block_columns.clamp(max=num_cols - 1)) == row_max[:, None]
    offset = (columns - block_start)[:, None]
    first_in_block = is_max.to(torch.uint8).argmax(1) == offset.squeeze(1)
    first = (first_block == columns // width) & first_in_block & is_max.gather(1, offset).squeeze(1)
    return row_max, first


def _softmax_sums(z: torch.Tensor, row_max: torch.Tensor, *, with_sum_q_shifted: bool):
    """(q, sum_exp, sum_q_shifted): q = exp(z - m) [C, V] in place of z (the unnormalized softmax), its row sums
    S [C] and sum_j q (z - m) [C] (the sums an online pass keeps for the entropy, no log pass) or None.

    By blocks of rows of about CPU_ROW_BLOCK_BYTES per thread on a CPU, so that each block's z - m, exp and sums
    read it from cache: one pass over the chunk in memory (GPU_ROW_BLOCK_BYTES elsewhere). For the entropy z - m
    goes into a buffer of one block (then multiplied by q in place), exp into the block; the same elementwise ops
    either way, so q and S do not depend on the metrics."""
    num_rows, num_cols = z.shape
    block_bytes = CPU_ROW_BLOCK_BYTES * torch.get_num_threads() if z.device.type == "cpu" else GPU_ROW_BLOCK_BYTES
    block_rows = max(1, block_bytes // (num_cols * z.element_size()))
    sum_exp = z.new_empty(num_rows)
    sum_q_shifted = z.new_empty(num_rows) if with_sum_q_shifted else None
    shifted_buffer = z.new_empty(min(block_rows, num_rows), num_cols) if with_sum_q_shifted else None
    for start in range(0, num_rows, block_rows):
        rows = slice(start, start + block_rows)
        block = z[rows]
        if shifted_buffer is None:
            q = block.sub_(row_max[rows, None]).exp_()
        else:
            shifted = torch.sub(block, row_max[rows, None], out=shifted_buffer[: block.shape[0]])
            q = torch.exp(shifted, out=block)
        torch.sum(q, 1, out=sum_exp[rows])
        if shifted_buffer is not None:
            torch.sum(shifted.mul_(q), 1, out=sum_q_shifted[rows])
    return z, sum_exp, sum_q_shifted


def _reduce_over_shards(vocab_shard: VocabShard, sum_exp, target_logits, sum_z, sum_q_shifted):
    """(sum_exp, target_logits, sum_z, sum_q_shifted) [C] summed over the vocabulary shards in one collective
    (of the [2 to 4, C] statistics that are not None)."""
    optional = [stat for stat in (sum_z, sum_q_shifted) if stat is not None]
    stats = vocab_shard.all_reduce_sum(torch.stack([sum_exp, target_logits, *optional])).unbind(0)
    sum_exp, target_logits, optional = stats[0], stats[1], list(stats[2:])
    sum_z = optional.pop(0) if sum_z is not None else None
    sum_q_shifted = optional.pop(0) if sum_q_shifted is not None else None
    return sum_exp, target_logits, sum_z, sum_q_shifted


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
    """Overwrite a vocabulary slice ``logits [C, V_s]`` (columns ``col_offset ...`` of the full rows) with
    dL/dlogits, given each row's ``lse [C]`` (logsumexp of the full softcapped row). See ``mrloss.ops.chunked``."""
    z, softcap_factor = _softcapped(logits, softcap, with_factor=True)
    grad = z.sub_(lse.to(z.dtype)[:, None]).exp_()  # softmax of the slice's columns
    _finish_grad(
        grad, logits, targets, lse, grad_scales, softcap_factor, col_offset, vocab_size, label_smoothing, z_loss_scale
    )


def _finish_grad(grad, logits, targets, lse, grad_scales, softcap_factor, col_offset, vocab_size, eps, z_loss_scale):
    """softmax ``grad [C, V_s]`` (in place) -> s_i ((1 + 2 zeta lse_i) p - (1 - eps) onehot - eps / V) (* softcap
    factor), written into ``logits`` (its dtype). Targets outside the slice's columns get no onehot term."""
    if z_loss_scale:
        grad.mul_((1 + 2 * z_loss_scale * lse.to(grad.dtype))[:, None])
    if eps:
        grad.sub_(eps / vocab_size)
    inside, columns = _local_targets(targets, col_offset, grad.shape[1])
    onehot = inside.to(grad.dtype)[:, None] * (eps - 1)
    grad.scatter_add_(1, columns, onehot)
    if softcap_factor is not None:
        grad.mul_(softcap_factor)
    grad.mul_(grad_scales.to(grad.dtype)[:, None])
    if grad is not logits:
        logits.copy_(grad)
