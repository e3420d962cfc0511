"""Launch configurations of the Triton kernels, as plain data.

Each kernel module has one function that maps (device capability, dtypes, shapes, options) to a
``LaunchConfig`` — its launcher calls it, and so does the compile check (``mrloss.ops.backends.triton.compile_check``),
which walks every configuration a GPU can get and compiles it with Triton's real compiler. Nothing that
only the CPU interpreter needs goes into these configurations.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
import triton.language as tl

Capability = tuple[int, int]
GPU_CAPABILITIES: tuple[Capability, ...] = ((8, 0), (9, 0))  # A100 and H100/H200: the compile check's targets
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}  # Triton's


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

    @classmethod
    def of(cls, kernel_name: str, dtype: str, kernel, types: dict[str, str], config: LaunchConfig, divisible_ints=()):
        """The case of ``kernel`` with its signature from ``kernel_signature(kernel, types)``; every pointer and
        the int arguments ``divisible_ints`` as multiples of 16 (allocations are 16-byte aligned)."""
        signature = kernel_signature(kernel, types)
        pointers = tuple(name for name, kind in signature.items() if kind.startswith("*"))
        return cls(kernel_name, dtype, kernel, signature, pointers + tuple(divisible_ints), config)

    def case_id(self, capability: Capability) -> str:
        ints = "ints16" if any(not name.endswith("_ptr") for name in self.divisible_by_16) else "ints"
        return f"sm_{capability[0]}{capability[1]}-{self.kernel_name}-{self.dtype}-{ints}-{self.config.describe()}"


def kernel_signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Runtime argument types of ``kernel`` as a GPU launch sees them, read from the kernel's own parameters.

    Args:
        kernel: a ``@triton.jit`` function (or its interpreted stand-in). Its ``tl.constexpr`` parameters are left
            out; a parameter annotated with a Triton dtype (``softcap: tl.float64``) gets that dtype.
        types: the type of every pointer argument (``*bf16``, ``*i64``; each argument named ``*_ptr``), and
            ``constexpr`` for an argument a launch specializes to a constant (a unit stride). Every other runtime
            argument is a Python int below 2**31: ``i32``.

    Returns:
        {argument name: type} in the kernel's argument order. Raises ValueError for a name the kernel does not
        have, a pointer without a pointer type, or an annotated argument given another type.
    """
    annotations = inspect.get_annotations(kernel.fn)  # strings under `from __future__ import annotations`
    runtime = {}
    for name in kernel.arg_names:
        annotation = _triton_annotation(annotations.get(name))
        if annotation is not tl.constexpr:
            runtime[name] = annotation.name if isinstance(annotation, tl.dtype) else None
    unknown = sorted(set(types) - set(runtime))
    untyped = [name for name in runtime if name.endswith("_ptr") and not types.get(name, "").startswith("*")]
    retyped = [name for name, annotated in runtime.items() if annotated and types.get(name, annotated) != annotated]
    if unknown or untyped or retyped:
        raise ValueError(
            f"{kernel.fn.__name__}: types for unknown arguments {unknown}, pointers without a pointer type "
            f"{untyped}, annotated arguments typed otherwise {retyped}"
        )
    return {name: types.get(name) or annotated or "i32" for name, annotated in runtime.items()}


def _triton_annotation(annotation):
    """The ``triton.language`` object a parameter annotation names (``tl.float64``, ``tl.constexpr``), else None."""
    if isinstance(annotation, str):
        return getattr(tl, annotation.removeprefix("tl."), None) if annotation.startswith("tl.") else None
    return annotation


def triton_interpreted() -> bool:
    """Whether Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_capability(device: torch.device) -> Capability:
    """The CUDA compute capability of ``device``; (0, 0) off CUDA (the interpreter)."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def metric_buffers(losses: torch.Tensor, correct_out: torch.Tensor | None, entropy_out: torch.Tensor | None):
    """(correct, entropy) [M] a launch writes: both (the ones not given allocated like ``losses``) when either is
    asked for, since a kernel with METRICS computes both; (None, None) when neither is."""
    if correct_out is None and entropy_out is None:
        return None, None
    correct = torch.empty_like(losses) if correct_out is None else correct_out
    entropy = torch.empty_like(losses) if entropy_out is None else entropy_out
    return correct, entropy


def _short(value) -> str:
    return str(value).replace("triton.language.", "")
