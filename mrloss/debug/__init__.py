"""Debugging tools: LossMaskVisualizer (see a sample's loss mask) and MultiRegionTrainingMonitor (per-region
statistics while training). Loaded on first attribute access, so ``import mrloss.debug`` costs nothing."""

import importlib

_EXPORTS = {"LossMaskVisualizer": "mrloss.debug.visualizer", "MultiRegionTrainingMonitor": "mrloss.debug.monitor"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mrloss.debug' has no attribute {name!r}")
