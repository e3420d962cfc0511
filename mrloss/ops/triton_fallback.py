"""backend="auto" on a GPU: the Triton ops, falling back to the PyTorch backend when Triton fails.

A user on an untested GPU or Triton version must not lose a training run to a kernel that does not
compile or launch there. Each Triton op is wrapped: on a Triton compile or launch error it warns once,
naming the kernel, the device and the reason, and from then on that op runs the PyTorch backend on the
same device (the failed call is redone there; a row op that failed wrote nothing). backend="triton"
does not use this wrapper, so it raises the error itself.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

_failed: dict[tuple[str, str], str] = {}  # (kernel, device) -> reason, for this process


def triton_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "Triton could not compile or launch here" (CUDA launch errors are RuntimeErrors)."""
    try:
        from triton.errors import TritonError
    except ImportError:  # older Triton: compile errors have no common base
        from triton.compiler.errors import CompilationError as TritonError
    return (TritonError, RuntimeError)


def with_torch_fallback(triton_op: Callable, torch_op: Callable, kernel: str) -> Callable:
    """``triton_op``, or ``torch_op`` (same arguments and result) once ``triton_op`` failed on a device."""

    @functools.wraps(triton_op)
    def run(tensor: torch.Tensor, *args, **kwargs):
        key = (kernel, str(tensor.device))
        if key not in _failed:
            try:
                return triton_op(tensor, *args, **kwargs)
            except triton_errors() as error:
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                _failed[key] = reason = f"{type(error).__name__}: {str(error).strip()[:500]}"
                warnings.warn(
                    f"mrloss: the Triton kernel {kernel} failed on {tensor.device} ({reason}); "
                    'backend="auto" uses the PyTorch backend for it from now on. Pass backend="triton" '
                    "to raise instead.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return torch_op(tensor, *args, **kwargs)

    return run
