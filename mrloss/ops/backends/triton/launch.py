"""Launch configurations of the Triton kernels, as plain data.

Each kernel module has one function that maps (device capability, dtypes, shapes, options) to a
``LaunchConfig`` — its launcher calls it, and so does the compile check (``mrloss.ops.backends.triton.compile_check``),
which walks every configuration a GPU can get and compiles it with Triton's real compiler. Nothing that
only the CPU interpreter needs goes into these configurations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

Capability = tuple[int, int]
GPU_CAPABILITIES: tuple[Capability, ...] = ((8, 0), (9, 0))  # A100 and H100/H200: the compile check's targets


@dataclass(frozen=True)
class LaunchConfig:
    """constexpr arguments of a kernel plus its launch options (``num_warps``, ``num_stages``)."""

    constexprs: dict = field(hash=False)
    num_warps: int
    num_stages: int

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)

    def describe(self) -> str:
        values = ", ".join(f"{name}={_short(value)}" for name, value in self.constexprs.items())
        return f"{values}, warps={self.num_warps}, stages={self.num_stages}"


@dataclass(frozen=True)
class CompileCase:
    """One kernel configuration as a GPU launch would compile it: argument types (pointers ``*bf16``,
    Python ints ``i32``, floats ``fp32``), the arguments a launch sees as multiples of 16 (Triton
    specializes those), and the launch config."""

    kernel_name: str
    dtype: str
    kernel: object
    signature: dict = field(hash=False)
    divisible_by_16: tuple[str, ...]
    config: LaunchConfig

    def case_id(self, capability: Capability) -> str:
        ints = "ints16" if any(not name.endswith("_ptr") for name in self.divisible_by_16) else "ints"
        return f"sm_{capability[0]}{capability[1]}-{self.kernel_name}-{self.dtype}-{ints}-{self.config.describe()}"


def triton_interpreted() -> bool:
    """Whether Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_capability(device: torch.device) -> Capability:
    """The CUDA compute capability of ``device``; (0, 0) off CUDA (the interpreter)."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def _short(value) -> str:
    return str(value).replace("triton.language.", "")
