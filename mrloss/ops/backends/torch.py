"""Row op of the chunked linear cross-entropy in plain PyTorch (runs anywhere).

The formula and the contract are documented once, in ``mrloss.ops.chunked``; the Triton kernel
``mrloss.ops.backends.triton.cross_entropy_rows`` computes the same thing. Math runs in float32 (float64 for
float64 logits), in place on the chunk where the dtype allows (the softmax overwrites the logits), so
the extra memory is at most two float32 copies of the ``[C, V]`` chunk (one for bf16/fp16 logits, one
more for the softcap factor) and none for float32 logits without softcap.
"""

from __future__ import annotations

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_scales: torch.Tensor | None,
    *,
    softcap: float | None,
    label_smoothing: float,
) -> torch.Tensor:
    """Per-row loss of ``logits [C, V]`` against ``targets [C]``; with ``grad_scales [C]`` also
    overwrites ``logits`` with dL/dlogits. See ``mrloss.ops.chunked`` for the formula."""
    vocab_size = logits.shape[1]
    acc_dtype = accumulation_dtype(logits.dtype)
    z = logits if logits.dtype == acc_dtype else logits.to(acc_dtype)  # may alias logits (scratch)
    softcap_factor = None
    if softcap is not None:
        z = z.div_(softcap).tanh_()
        if grad_scales is not None:
            softcap_factor = 1 - z.square()  # d(c tanh(a/c))/da = 1 - tanh^2
        z = z.mul_(softcap)
    target_logits = z.gather(1, targets[:, None]).squeeze(1)
    losses = -(1 - label_smoothing) * target_logits
    if label_smoothing:
        losses = losses - label_smoothing / vocab_size * z.sum(1)
    row_max = z.amax(1)
    probs = z.sub_(row_max[:, None]).exp_()  # unnormalized softmax, in place: no [C, V] temporary
    sum_exp = probs.sum(1)
    losses = losses + row_max + sum_exp.log()  # + logsumexp
    if grad_scales is None:
        return losses

    grad = probs.div_(sum_exp[:, None])  # softmax
    if label_smoothing:
        grad.sub_(label_smoothing / vocab_size)
    grad.scatter_add_(1, targets[:, None], grad.new_full((grad.shape[0], 1), label_smoothing - 1))
    if softcap_factor is not None:
        grad.mul_(softcap_factor)
    grad.mul_(grad_scales.to(acc_dtype)[:, None])
    if grad is not logits:
        logits.copy_(grad)
    return losses
