"""Triton device functions shared by the kernels (no kernels here)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh from one exp, stable for any |x| (no libdevice, so it also runs interpreted)."""
    e = tl.exp(-2.0 * tl.abs(x))
    return tl.where(x < 0, (e - 1.0) / (1.0 + e), (1.0 - e) / (1.0 + e))


@triton.jit
def softcapped(a, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(a / softcap), or a itself without softcap."""
    if HAS_SOFTCAP:
        a = softcap * tanh(a / softcap)
    return a
