"""RegionWeighting: the dynamic weights and the region dependencies as one step of the training loop."""

from __future__ import annotations

from typing import Mapping

from mrloss.weighting.common import RegionMultiplierTool, reject_unknown_keys
from mrloss.weighting.dependencies import RegionDependencyHandler
from mrloss.weighting.dynamic import DynamicWeightAdjuster

SECTION_KEYS = ("dynamic_weights", "region_dependencies")


class RegionWeighting(RegionMultiplierTool):
    """Both tools, either optional; a type's multiplier is the product of theirs, applied to weights once.

    Per training step: ``token_weights = weighting.adjust(token_weights, region_type_ids, region_types, epoch)``
    before the loss (the normaliser Σw must be taken from the adjusted weights), then
    ``weighting.update(type_losses)`` with the batch's mean loss per region type, and
    ``monitor.log_batch_stats(..., multipliers=weighting.multipliers())`` to record what was done.
    """

    def __init__(
        self,
        dynamic_weights: DynamicWeightAdjuster | None = None,
        region_dependencies: RegionDependencyHandler | None = None,
    ) -> None:
        super().__init__()
        self.dynamic_weights = dynamic_weights
        self.region_dependencies = region_dependencies

    @classmethod
    def from_config(cls, section: Mapping | None) -> RegionWeighting:
        """``{"dynamic_weights": <DynamicWeightAdjuster config> | None, "region_dependencies": <RegionDependencyHandler
        config> | None}``; a missing or None entry leaves that tool off, unknown keys are errors."""
        section = dict(section or {})
        reject_unknown_keys(section, SECTION_KEYS, "weighting")
        dynamic, dependencies = section.get("dynamic_weights"), section.get("region_dependencies")
        return cls(
            DynamicWeightAdjuster(dynamic) if dynamic is not None else None,
            RegionDependencyHandler(dependencies) if dependencies is not None else None,
        )

    @property
    def named_tools(self) -> dict[str, RegionMultiplierTool]:
        """Configured tools by config-section key."""
        tools = dict(zip(SECTION_KEYS, (self.dynamic_weights, self.region_dependencies)))
        return {name: tool for name, tool in tools.items() if tool is not None}

    @property
    def tools(self) -> list[RegionMultiplierTool]:
        return list(self.named_tools.values())

    @property
    def enabled(self) -> bool:
        """False when neither tool is configured (``adjust`` then returns equal weights)."""
        return bool(self.tools)

    def type_multipliers(self, region_types: list[str], epoch: int) -> dict[str, float]:
        multipliers = {t: 1.0 for t in region_types}
        for tool in self.tools:
            for region_type, factor in tool.type_multipliers(region_types, epoch).items():
                multipliers[region_type] *= factor
        return multipliers

    def update(self, type_losses: Mapping[str, float | None]) -> None:
        """Feed one batch's mean loss per region type to every tool's EMA (under data parallelism, pass
        losses reduced over ranks so that every rank computes the same weights)."""
        for tool in self.tools:
            tool.update(type_losses)

    def state_dict(self) -> dict:
        return {name: tool.state_dict() for name, tool in self.named_tools.items()}

    def load_state_dict(self, state: Mapping) -> None:
        if set(state) != set(self.named_tools):
            raise ValueError(
                f"weighting state holds {sorted(state)} but the configured tools are {sorted(self.named_tools)}"
            )
        for name, tool in self.named_tools.items():
            tool.load_state_dict(state[name])
