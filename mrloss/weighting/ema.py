"""Exponential moving average of each region type's loss (shared by both weighting tools)."""

from __future__ import annotations

import math
from typing import Mapping


class RegionLossEMA:
    """Per-region-type EMA of the batch mean loss.

    The first loss seen for a type initialises its EMA; later ones update
    ``ema = decay * ema + (1 - decay) * loss``. ``None`` and non-finite losses (a type absent from the batch,
    an overflowed AMP step) are ignored.
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)
        self.values: dict[str, float] = {}

    def update(self, type_losses: Mapping[str, float | None]) -> None:
        for region_type, loss in type_losses.items():
            if loss is None:
                continue
            loss = float(loss)
            if not math.isfinite(loss):
                continue
            previous = self.values.get(region_type)
            self.values[region_type] = loss if previous is None else self.decay * previous + (1.0 - self.decay) * loss

    def state_dict(self) -> dict:
        return {"values": dict(self.values)}

    def load_state_dict(self, state: Mapping) -> None:
        self.values = {str(key): float(value) for key, value in state["values"].items()}
