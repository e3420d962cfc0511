"""Steering tools: per-region-type weight multipliers from the epoch, the difficulty and region dependencies."""

from mrloss.weighting.dependencies import RegionDependencyHandler
from mrloss.weighting.dynamic import DynamicWeightAdjuster
from mrloss.weighting.region_weighting import RegionWeighting

__all__ = ["DynamicWeightAdjuster", "RegionDependencyHandler", "RegionWeighting"]
