"""TEMPORARY STUB (being replaced by the fused implementation): public API of the weighted linear
cross-entropy. It delegates to the materializing reference so other modules can be built against
the final signature meanwhile."""
from __future__ import annotations

import torch

from mrloss.reference import reference_linear_cross_entropy


def linear_cross_entropy(
    hidden, weight, targets, token_weights=None, *, bias=None, ignore_index=-100, reduction="mean",
    normalizer=None, softcap=None, label_smoothing=0.0, shift=False, backend="auto",
    return_token_losses=False, chunk_size=None,
):
    out = reference_linear_cross_entropy(
        hidden, weight, targets, token_weights, bias=bias, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer, softcap=softcap, label_smoothing=label_smoothing, shift=shift,
        compute_dtype=torch.float32, return_token_losses=return_token_losses,
    )
    if return_token_losses:
        return out[0].to(hidden.dtype), out[1].float()
    return out.to(hidden.dtype)


class LinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, hidden, weight, targets, token_weights=None, bias=None):
        return linear_cross_entropy(hidden, weight, targets, token_weights, bias=bias, **self.options)
