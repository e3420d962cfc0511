"""Pieces shared by the weighting tools: config key checks, the per-type multiplier base class."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from mrloss.weighting.ema import RegionLossEMA


def reject_unknown_keys(config: Mapping, allowed: Iterable[str], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when ``config`` has a key outside ``allowed``."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(config).__name__}")
    allowed = sorted(allowed)
    unknown = sorted(str(key) for key in config if key not in allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are {allowed}")


def with_defaults(config: Mapping | None, defaults: Mapping, where: str) -> dict:
    """``config`` (None: empty) over ``defaults``, after refusing keys outside ``defaults`` (named ``where``)."""
    config = dict(config or {})
    reject_unknown_keys(config, defaults, where)
    return {**defaults, **config}


def true_or_false(value, where: str) -> bool:
    """``value`` checked to be a bool (a YAML true/false); ``TypeError`` naming ``where`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: expected true/false, got {value!r}")
    return value


def finite_number(
    value, where: str, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a float, checked finite and within ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{where}: {value!r} is outside {bounds}")
    return value


def apply_type_multipliers(
    token_weights: torch.Tensor,
    region_type_ids: torch.Tensor,
    region_types: list[str],
    multipliers: Mapping[str, float],
) -> torch.Tensor:
    """New token weights ``token_weights * m[type]``; tokens outside every region (id -1) keep their weight.

    token_weights: float tensor, any shape (``[B, T]`` from the collator); region_type_ids: int tensor of the
    same shape, values in ``[-1, len(region_types))``; multipliers: region type -> factor (missing types: 1).
    Returns a new tensor of token_weights' dtype and device; the input is not modified.
    """
    if not torch.is_tensor(token_weights) or not token_weights.is_floating_point():
        raise TypeError(
            f"token_weights must be a floating-point tensor, got {getattr(token_weights, 'dtype', type(token_weights))}"
        )
    if (
        not torch.is_tensor(region_type_ids)
        or region_type_ids.is_floating_point()
        or region_type_ids.dtype == torch.bool
    ):
        raise TypeError(
            f"region_type_ids must be an integer tensor, got {getattr(region_type_ids, 'dtype', type(region_type_ids))}"
        )
    if region_type_ids.shape != token_weights.shape:
        raise ValueError(
            f"region_type_ids shape {tuple(region_type_ids.shape)} != token_weights shape {tuple(token_weights.shape)}"
        )
    bad = (region_type_ids < -1) | (region_type_ids >= len(region_types))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"region_type_ids{list(position)} = {int(region_type_ids[position])} is not -1 or an "
            f"index into region_types (length {len(region_types)})"
        )
    # last entry serves id -1 (outside every region)
    table = [float(multipliers.get(name, 1.0)) for name in region_types] + [1.0]
    table = torch.tensor(table, dtype=token_weights.dtype, device=token_weights.device)
    return token_weights * table[region_type_ids.long()]


class RegionMultiplierTool:
    """Base of the weighting tools: subclasses define ``type_multipliers(region_types, epoch)``.

    ``adjust`` applies those multipliers to a batch and remembers them; ``multipliers()`` returns what the
    last ``adjust`` applied (region type -> factor), for logging.
    """

    def __init__(self) -> None:
        self._last_multipliers: dict[str, float] = {}

    def type_multipliers(self, region_types: list[str], epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def adjust(
        self, token_weights: torch.Tensor, region_type_ids: torch.Tensor, region_types: list[str], epoch: int
    ) -> torch.Tensor:
        """New token weights ``[B, T]`` (same dtype): each token's weight times its region type's multiplier.

        region_type_ids ``[B, T]`` int64 indexes ``region_types`` (-1 = outside every region: unchanged);
        epoch is 1-based (the first epoch is 1; from HF's float ``state.epoch`` use ``int(state.epoch) + 1``).
        Under the Σw-normalised mean a factor shared by every weighted token cancels out: multipliers act
        relative to other region types and to tokens outside regions.
        """
        multipliers = self.type_multipliers(list(region_types), epoch)
        adjusted = apply_type_multipliers(token_weights, region_type_ids, list(region_types), multipliers)
        self._last_multipliers = multipliers
        return adjusted

    def multipliers(self) -> dict[str, float]:
        """Region type -> multiplier applied by the last ``adjust`` call (empty before the first)."""
        return dict(self._last_multipliers)


class LossTrackingTool(RegionMultiplierTool):
    """A weighting tool whose whole state is an EMA of each region type's batch mean loss (``self.ema``)."""

    def __init__(self, ema_decay, config_name: str) -> None:
        """ema_decay: in [0, 1) (validated here, named ``<config_name>.ema_decay`` in errors)."""
        super().__init__()
        decay = finite_number(ema_decay, f"{config_name}.ema_decay", low=0.0, high=1.0)
        if decay == 1.0:
            raise ValueError(f"{config_name}.ema_decay: 1.0 would never update the EMA; use a value in [0, 1)")
        self.ema = RegionLossEMA(decay)

    def update(self, type_losses: Mapping[str, float | None]) -> None:
        """Feed one batch's mean loss per region type (e.g. the monitor's ``mean_loss``) into the EMA."""
        self.ema.update(type_losses)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.ema.load_state_dict(state["ema"])


def check_epoch(epoch) -> int:
    """Validate a 1-based integer epoch."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be a 1-based int (first epoch = 1), got {epoch!r}")
    return epoch
