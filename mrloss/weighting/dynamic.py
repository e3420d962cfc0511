"""DynamicWeightAdjuster: per-region-type weight multipliers from the epoch and from each type's difficulty."""

from __future__ import annotations

from typing import Mapping

from mrloss.weighting.common import LossTrackingTool, check_epoch, finite_number, true_or_false, with_defaults

DEFAULTS = {
    "difficulty_scaling": False,  # scale each type by its relative EMA loss
    "epoch_weights": {},  # {"2": {"methodology": 1.5}}: 1-based epoch -> {region type: multiplier} (or a number)
    "ema_decay": 0.9,  # EMA of each type's batch mean loss
    "exponent": 1.0,  # difficulty = (ema_type / mean_ema) ** exponent
    "min_multiplier": 0.5,  # clamp of the difficulty multiplier
    "max_multiplier": 2.0,
}


class DynamicWeightAdjuster(LossTrackingTool):
    """Multiply the weights of region tokens by ``epoch_multiplier(epoch) * difficulty(type)``.

    config keys (unknown keys are errors), defaults in ``DEFAULTS``:
      - ``epoch_weights``: ``{epoch: {region type: multiplier}}``, epochs 1-based (keys may be strings, as in
        YAML/JSON); types an entry does not name get 1.0; a number instead of the mapping scales every type alike.
        Epoch e uses the entry of the largest key <= e: epochs past the last key keep it, epochs before the
        first key get 1.0. A factor shared by every weighted token cancels in the mean Σw·l/Σw, so an entry acts
        only where it differs between the region types, or against weighted tokens outside every region
        (``default_weight > 0``); `check_epoch_weights_act` refuses a schedule that cannot act on a data set.
      - ``difficulty_scaling``: when true, a type's multiplier is also
        ``clamp((ema[type] / mean_ema) ** exponent, min_multiplier, max_multiplier)``, where ``ema`` is the EMA
        (``ema_decay``) of the type's batch mean loss fed through ``update`` and ``mean_ema`` the plain mean of
        the EMAs of the types in ``region_types`` that have one. Types without an EMA yet get 1.0.
    Tokens outside every region keep their weight (see ``RegionMultiplierTool.adjust``).
    """

    def __init__(self, config: Mapping | None = None) -> None:
        config = with_defaults(config, DEFAULTS, "dynamic_weights")
        self.difficulty_scaling = true_or_false(config["difficulty_scaling"], "dynamic_weights.difficulty_scaling")
        self.epoch_weights = _parse_epoch_weights(config["epoch_weights"])
        self.exponent = finite_number(config["exponent"], "dynamic_weights.exponent", low=0.0)
        self.min_multiplier = finite_number(
            config["min_multiplier"], "dynamic_weights.min_multiplier", low=0.0, low_open=True
        )
        self.max_multiplier = finite_number(
            config["max_multiplier"], "dynamic_weights.max_multiplier", low=self.min_multiplier
        )
        super().__init__(config["ema_decay"], "dynamic_weights")

    def epoch_multiplier(self, epoch: int, region_type: str | None = None) -> float:
        """Multiplier of ``region_type`` in the 1-based ``epoch``: from the entry of the largest ``epoch_weights``
        key <= epoch (1.0 before the first key, and for a type the entry does not name). ``region_type`` None: the
        multiplier of a type no entry names (an entry that is a number applies to every type)."""
        check_epoch(epoch)
        entry: float | dict[str, float] = 1.0
        for key, value in self.epoch_weights:
            if key <= epoch:
                entry = value
        return entry.get(region_type, 1.0) if isinstance(entry, dict) else entry

    def check_epoch_weights_act(self, region_types: list[str], *, weighted_outside: bool) -> None:
        """ValueError when ``epoch_weights`` cannot change any weighted mean on data with these ``region_types``:
        every entry scales all of them alike (the factor cancels in Σw·l/Σw) and no weighted token lies outside
        every region (``weighted_outside`` False) for it to act against; or an entry names a type the data lacks."""
        named = {name for _, entry in self.epoch_weights if isinstance(entry, dict) for name in entry}
        missing = sorted(named - set(region_types))
        if missing:
            raise ValueError(
                f"dynamic_weights.epoch_weights: names region type(s) {missing} that are not in the data's region "
                f"types {list(region_types)}"
            )
        if not self.epoch_weights or weighted_outside or not region_types:
            return
        for key, _ in self.epoch_weights:
            if len({self.epoch_multiplier(key, name) for name in region_types}) > 1:
                return
        raise ValueError(
            "dynamic_weights.epoch_weights: every epoch scales all region types "
            f"({', '.join(region_types)}) alike and no token outside a region is weighted, so the factor cancels "
            'in the weighted mean Σw·l/Σw and changes nothing; give per-type multipliers (e.g. {"2": '
            f'{{"{region_types[-1]}": 1.5}}}}) or remove epoch_weights'
        )

    def difficulty_multipliers(self, region_types: list[str]) -> dict[str, float]:
        """``clamp((ema[t] / mean_ema) ** exponent, min, max)`` per type (1.0 without an EMA or when disabled)."""
        seen = {t: self.ema.values[t] for t in region_types if t in self.ema.values}
        mean_ema = sum(seen.values()) / len(seen) if seen else 0.0
        if not self.difficulty_scaling or mean_ema <= 0.0:
            return {t: 1.0 for t in region_types}
        return {
            t: min(max((seen[t] / mean_ema) ** self.exponent, self.min_multiplier), self.max_multiplier)
            if t in seen
            else 1.0
            for t in region_types
        }

    def type_multipliers(self, region_types: list[str], epoch: int) -> dict[str, float]:
        return {t: self.epoch_multiplier(epoch, t) * d for t, d in self.difficulty_multipliers(region_types).items()}


def _parse_epoch_weights(epoch_weights) -> list[tuple[int, float | dict[str, float]]]:
    """``[(epoch, multiplier or {region type: multiplier})]`` sorted by epoch, every value checked > 0 and finite."""
    if not isinstance(epoch_weights, Mapping):
        raise TypeError(
            "dynamic_weights.epoch_weights: expected a mapping epoch -> {region type: multiplier}, got "
            f"{epoch_weights!r}"
        )
    parsed = {}
    for key, value in epoch_weights.items():
        where = f"dynamic_weights.epoch_weights[{key!r}]"
        try:
            epoch = int(str(key).strip())
        except ValueError:
            raise ValueError(f"{where}: key must be a 1-based epoch number") from None
        if epoch < 1:
            raise ValueError(f"{where}: key must be a 1-based epoch number")
        if epoch in parsed:
            raise ValueError(f"{where}: epoch {epoch} appears twice")
        if isinstance(value, Mapping):
            parsed[epoch] = {
                str(name): finite_number(factor, f"{where}[{name!r}]", low=0.0, low_open=True)
                for name, factor in value.items()
            }
        else:
            parsed[epoch] = finite_number(value, where, low=0.0, low_open=True)
    return sorted(parsed.items())
