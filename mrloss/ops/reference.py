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

from mrloss.ops.chunked import TokenMetrics
from mrloss.ops.normalization import safe_divide
from mrloss.ops.options import LossOptions, loss_options
from mrloss.ops.output import LossOutput


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = torch.float64,
    options: LossOptions | None = None,
    **keywords,
) -> torch.Tensor | LossOutput:
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, materialized.

    Args:
        hidden: [..., H]; weight: [V, H]; bias: [V] or None; targets: [...] int64;
        token_weights: [...] float (None: all 1.0); normalizer: as in `mrloss.linear_cross_entropy`.
        compute_dtype: dtype of every operation (float64 for the oracle; None keeps the inputs' dtype, which is
            what "plain PyTorch" does).
        options, keywords: a `LossOptions` and/or its fields as keywords (keywords win); backend, chunk_size
            and memory have no effect here.

    Returns:
        The loss (0-dim, or the shape of targets for "none"), or, when a return_* option is set, a `LossOutput`:
        token_losses the detached unweighted per-token loss l_i without z-loss, z_loss the detached z-loss part
        of the loss, token_metrics (accuracy, entropy); per-token values target-aligned, 0 where skipped, in
        the compute dtype.
    """
    options = loss_options(keywords, caller="reference_linear_cross_entropy", base=options)
    dtype = compute_dtype or hidden.dtype
    if token_weights is None:
        token_weights = torch.ones(targets.shape, device=targets.device)
    if options.shift:  # target k is predicted by position k-1; position 0 of each sequence predicts nothing.
        hidden, targets_used, weights_used = hidden[..., :-1, :], targets[..., 1:], token_weights[..., 1:]
    else:
        targets_used, weights_used = targets, token_weights
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if options.softcap is not None:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    valid = targets_used != options.ignore_index
    w = torch.where(valid, weights_used.to(dtype), 0.0)
    token = _per_token(logits, torch.where(valid, targets_used, 0), options, learned=w > 0)
    if options.shift:  # back to target alignment: position 0 holds no prediction
        w, token = _pad_front(w), {name: _pad_front(values) for name, values in token.items()}
    objective = token["losses"] + token["z_loss"] if options.z_loss_scale else token["losses"]
    loss = _reduce(w * objective, w, normalizer, options.reduction)
    if not options.returns_output:
        return loss
    return LossOutput(
        loss,
        token_losses=token["losses"].detach() if options.return_token_losses else None,
        z_loss=_reduce(w * token["z_loss"], w, normalizer, options.reduction).detach()
        if options.return_z_loss
        else None,
        token_metrics=TokenMetrics(token["accuracy"], token["entropy"]) if options.return_token_metrics else None,
    )


def _reduce(weighted: torch.Tensor, weights: torch.Tensor, normalizer, reduction: str) -> torch.Tensor:
    """weighted per token -> "none": itself; normalizer: sum / normalizer; "mean": sum / sum(weights); "sum"."""
    if reduction == "none":
        return weighted
    if normalizer is not None:
        return safe_divide(weighted.sum(), torch.as_tensor(normalizer, dtype=weighted.dtype, device=weighted.device))
    return safe_divide(weighted.sum(), weights.sum()) if reduction == "mean" else weighted.sum()


def _per_token(logits: torch.Tensor, targets: torch.Tensor, options: LossOptions, learned: torch.Tensor) -> dict:
    """Per-token values of logits [..., V], 0 where not learned: losses l_i, z_loss zeta lse_i^2 (0 when zeta is
    0) and, when asked for (they cost [N, V] work), accuracy (the first argmax is the target) and entropy."""
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, -2), targets.flatten(), reduction="none", label_smoothing=options.label_smoothing
    ).view(targets.shape)
    values = {"losses": losses, "z_loss": torch.zeros_like(losses)}
    if options.z_loss_scale:
        values["z_loss"] = options.z_loss_scale * torch.logsumexp(logits, dim=-1).square()
    if options.return_token_metrics:
        log_probs = logits.detach().log_softmax(-1)
        values["accuracy"] = (logits.detach().argmax(-1) == targets).to(logits.dtype)
        values["entropy"] = -(log_probs.exp() * log_probs).sum(-1)
    return {name: torch.where(learned, value, 0.0) for name, value in values.items()}


def _pad_front(values: torch.Tensor) -> torch.Tensor:
    """values [..., T-1] -> [..., T] with 0 at index 0 of the last dimension."""
    return torch.nn.functional.pad(values, (1, 0))
