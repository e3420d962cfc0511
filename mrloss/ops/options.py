"""The options of one loss call, `LossOptions`: one frozen object, validated once, passed down whole.

`mrloss.linear_cross_entropy` builds it from its keyword arguments; the autograd plan (``mrloss.ops.function``),
the float64 reference, the sequence- and vocabulary-parallel losses and the integrations all take this one object,
so a new option is a field here (plus the formula that uses it). Fields marked per-call (`PER_CALL`: the
reduction, the shift and the ``return_*`` flags) are decided by whoever calls the loss; the others
(`MODEL_OPTIONS`) are what a user may set on a patched model, an integration or a training config.

Checks that need the tensors (shapes, dtypes, devices, the normalizer) are ``mrloss.ops.api.check_inputs``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

IGNORE_INDEX = -100  # the target that is no target (the HF convention)

Reduction = Literal["mean", "sum", "none"]
Backend = Literal["auto", "triton", "torch"]
Memory = Literal["fast", "low"]
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
MEMORY_MODES: tuple[str, ...] = typing.get_args(Memory)

PER_CALL = "per_call"  # field metadata key: True where the caller of the loss, not its user, decides the option


def _per_call(default):
    return dataclasses.field(default=default, metadata={PER_CALL: True})


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Every option of `mrloss.linear_cross_entropy` except the tensors (and ``normalizer``, a per-step value).

    Attributes:
        ignore_index: the target id that is no target.
        reduction: "mean" (Σ w·l / Σ w over valid tokens), "sum" (Σ w·l), "none" (w·l per token).
        softcap: c for logits c·tanh(z / c), a finite float > 0, or None (no cap).
        label_smoothing: eps in [0, 1]: l = lse - (1 - eps) z[t] - eps/V Σ_j z[j].
        shift: a bool: position k-1 predicts targets[..., k] with token_weights[..., k]; per-token outputs stay
            target-aligned (index 0 of each sequence is 0).
        backend: "auto" (Triton on CUDA tensors, PyTorch otherwise), "triton" (on the CPU: TRITON_INTERPRET=1)
            or "torch".
        chunk_size: learned tokens per chunk, an int >= 1, or None (``chunked.default_chunk_size``: 2048 where a
            [C, V] chunk is no larger than the weight, else about the size of hidden, at least 256).
        memory: "fast": gradients built in the forward into a float32 [V, H] buffer, or with few learned rows
            (M <= 2 H in bf16) their [M, V] logit gradients kept for one weight-gradient matmul in backward
            (~6·N·H·V FLOPs); "low": no
            [V, H] float32 buffer and no [N, V], the gradients built in backward by vocabulary slices
            (~8·N·H·V FLOPs); same results to rounding.
        z_loss_scale: zeta >= 0, finite: each token's loss is l + zeta·lse² (PaLM's z-loss, Liger's
            lse_square_scale), under the same weights, reduction and normalizer, its gradient included.
        return_token_losses, return_z_loss, return_token_metrics: what `LossOutput` carries besides the loss.

    Raises ValueError (TypeError for a non-bool flag) naming the option when a value is out of its range.
    """

    ignore_index: int = IGNORE_INDEX
    reduction: Reduction = _per_call("mean")
    softcap: float | None = None
    label_smoothing: float = 0.0
    shift: bool = _per_call(False)
    backend: Backend = "auto"
    chunk_size: int | None = None
    memory: Memory = "fast"
    z_loss_scale: float = 0.0
    return_token_losses: bool = _per_call(False)
    return_z_loss: bool = _per_call(False)
    return_token_metrics: bool = _per_call(False)

    def __post_init__(self) -> None:
        for name, allowed in (("reduction", REDUCTIONS), ("backend", BACKENDS), ("memory", MEMORY_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")
        for name in ("shift", *RETURN_FLAGS):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool (True or False), got {getattr(self, name)!r}")
        if not _is_int(self.ignore_index):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if self.chunk_size is not None and not (_is_int(self.chunk_size) and self.chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not (_is_real(self.label_smoothing) and 0.0 <= self.label_smoothing <= 1.0):
            raise ValueError(f"label_smoothing must be a float in [0, 1], got {self.label_smoothing!r}")
        if self.softcap is not None and not (_is_real(self.softcap) and 0 < self.softcap < math.inf):
            raise ValueError(f"softcap must be a finite float > 0 or None, got {self.softcap!r}")
        if not (_is_real(self.z_loss_scale) and 0.0 <= self.z_loss_scale < math.inf):
            raise ValueError(f"z_loss_scale must be a finite float >= 0, got {self.z_loss_scale!r}")
        for name in ("label_smoothing", "z_loss_scale", "softcap"):  # one type for the kernels and the plan
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else float(value))

    @property
    def returns_output(self) -> bool:
        """Whether the loss comes back as a `mrloss.ops.output.LossOutput` (any return_* flag) or a tensor."""
        return any(getattr(self, name) for name in RETURN_FLAGS)


RETURN_FLAGS = ("return_token_losses", "return_z_loss", "return_token_metrics")
OPTION_NAMES: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LossOptions))
# the options a user sets once for a model, an integration or a training run (not decided per call)
MODEL_OPTIONS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(LossOptions) if not field.metadata.get(PER_CALL)
)


def loss_options(
    keywords: typing.Mapping[str, typing.Any],
    *,
    caller: str,
    base: LossOptions | None = None,
    allowed: typing.Collection[str] = OPTION_NAMES,
) -> LossOptions:
    """``base`` (default: all defaults) with the options in ``keywords`` replaced, validated; TypeError naming
    ``caller`` and the unknown names for keys outside ``allowed``."""
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        raise TypeError(f"{caller}: unknown option(s) {unknown}; expected some of {sorted(allowed)}")
    return dataclasses.replace(base or LossOptions(), **keywords)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
