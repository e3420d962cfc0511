"""The result of a loss call that asked for more than the loss: `LossOutput`, fields by name."""

from __future__ import annotations

import dataclasses

import torch

from mrloss.ops.chunked import TokenMetrics


@dataclasses.dataclass(frozen=True)
class LossOutput:
    """What `mrloss.linear_cross_entropy` (and the parallel losses) return when a ``return_*`` option is set;
    with none set they return ``loss`` alone, a tensor. A field not asked for is None.

    Attributes:
        loss: the loss, with gradient: 0-dim, or the shape of targets for reduction "none"; float32 (float64
            for float64 inputs).
        token_losses: ``return_token_losses``: the detached unweighted per-token loss l (without z-loss),
            float32, shape of targets, target-aligned, 0 where a token is not learned.
        z_loss: ``return_z_loss``: the detached z-loss part of ``loss`` (same weights, reduction and normalizer;
            0 without a z-loss), the dtype and shape of loss.
        token_metrics: ``return_token_metrics``: `TokenMetrics` (accuracy: 1.0 where the first argmax of the
            logits is the target; entropy of their softmax), detached float32, shape of targets, 0 where skipped.
    """

    loss: torch.Tensor
    token_losses: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    token_metrics: TokenMetrics | None = None
