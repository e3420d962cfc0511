"""The plain-PyTorch formula of the weighted linear cross-entropy.

This is the oracle of the tests (run in float64) and the "plain PyTorch" baseline of the benchmark
(run in the inputs' dtype). It materializes the full ``[N, V]`` logits on purpose: it is written to be
obviously right, not to be fast. The fused implementation lives in ``mrloss.ops.api``.

Math, for token i with hidden h_i, target t_i, weight w_i (valid when t_i != ignore_index):
    a_i = h_i W^T + b                      raw logits, [V]
    z_i = c * tanh(a_i / c)                when softcap c is set, else a_i
    l_i = logsumexp(z_i) - (1 - eps) z_i[t_i] - eps/V * sum_j z_i[j]     (label smoothing eps)
    o_i = l_i + zeta * logsumexp(z_i)^2                                  (z-loss scale zeta; l_i when 0)
    "sum"  = sum_i w_i o_i      "mean" = sum_i w_i l_i / sum_i w_i  (0 when the sum of weights is 0)
    "none" = w_i o_i per token; normalizer n: sum_i w_i o_i / n   (the mean/sum formulas above with o_i too)
With shift=True, the loss at position k is that of predicting targets[..., k] from hidden[..., k-1]
(position 0 of every sequence has no prediction and gets 0).
"""

from __future__ import annotations

import torch

from mrloss.ops.normalization import IGNORE_INDEX, safe_divide


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    shift: bool = False,
    z_loss_scale: float = 0.0,
    compute_dtype: torch.dtype | None = torch.float64,
    return_token_losses: bool = False,
):
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, materialized.

    hidden [..., H], weight [V, H], targets [...] int64, token_weights [...] (None: all 1.0).
    compute_dtype: dtype of every operation (float64 for the oracle; None keeps the inputs' dtype,
    which is what "plain PyTorch" does). Returns the loss (0-dim, or shape of targets for "none") and,
    when return_token_losses, also the detached unweighted per-token loss l_i, without z-loss (0 where skipped).
    """
    dtype = compute_dtype or hidden.dtype
    if token_weights is None:
        token_weights = torch.ones(targets.shape, device=targets.device)
    if shift:
        # target k is predicted by position k-1; position 0 of each sequence predicts nothing.
        pred_hidden = hidden[..., :-1, :]
        targets_used = targets[..., 1:]
        weights_used = token_weights[..., 1:]
    else:
        pred_hidden, targets_used, weights_used = hidden, targets, token_weights

    logits = pred_hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets_used != ignore_index
    safe_targets = torch.where(valid, targets_used, torch.zeros_like(targets_used))
    token_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, -2), safe_targets.flatten(), reduction="none", label_smoothing=label_smoothing
    ).view(targets_used.shape)
    w = torch.where(valid, weights_used.to(dtype), torch.zeros((), dtype=dtype, device=logits.device))
    token_loss = torch.where(w > 0, token_loss, torch.zeros((), dtype=dtype, device=logits.device))
    objective = token_loss
    if z_loss_scale:
        z_loss = z_loss_scale * torch.logsumexp(logits, dim=-1).square()
        objective = token_loss + torch.where(w > 0, z_loss, torch.zeros((), dtype=dtype, device=logits.device))
    weighted = w * objective

    if shift:  # back to target alignment: position 0 holds no prediction
        pad = torch.zeros(targets.shape[:-1] + (1,), dtype=dtype, device=logits.device)
        weighted = torch.cat([pad, weighted], dim=-1)
        token_loss = torch.cat([pad, token_loss], dim=-1)

    if reduction == "none":
        loss = weighted
    else:
        total = weighted.sum()
        if normalizer is not None:
            denom = torch.as_tensor(normalizer, dtype=dtype, device=logits.device)
        elif reduction == "mean":
            denom = w.sum()
        elif reduction == "sum":
            denom = torch.ones((), dtype=dtype, device=logits.device)
        else:
            raise ValueError(f"unknown reduction {reduction!r}")
        loss = safe_divide(total, denom)
    if return_token_losses:
        return loss, token_loss.detach()
    return loss
