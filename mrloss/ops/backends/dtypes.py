"""Accumulation dtype shared by the chunk driver and every backend (the bottom of ``mrloss.ops``)."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)
