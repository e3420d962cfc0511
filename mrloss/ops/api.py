"""Public API of the fused, zero-weight-skipping weighted linear cross-entropy.

``linear_cross_entropy`` validates its arguments, aligns targets and weights (``shift``, with the one
shift rule of ``mrloss.ops.normalization``), compacts the *learned* tokens (valid target and weight > 0: only
they cost matmul work), and runs one ``torch.autograd.Function`` (``mrloss.ops.function``) over the chunk driver
``mrloss.ops.chunked`` with a backend row op (``mrloss.ops.backends.torch`` or the Triton kernel
``mrloss.ops.backends.triton.cross_entropy_rows``). With the Triton backend, passes that need losses only (no
gradient wanted, or the forward of reduction "none"; token metrics included) run the fused kernel
``mrloss.ops.backends.triton.linear_cross_entropy_forward`` instead: no logits chunk, O(N) extra memory. The
formula is the one of ``mrloss.ops.reference``.

For reduction "mean"/"sum" (and ``normalizer``) the upstream gradient is a scalar, so the gradients are
computed during the forward pass (~6·N_learned·H·V FLOPs in all) and backward only scales them, in
place (so one backward per forward: a second one through the same graph raises RuntimeError).
For "none" the forward computes losses only and backward re-runs the chunks with per-token scales.
``memory="low"`` never holds a float32 ``[V, H]`` buffer: the forward is a loss-only pass that keeps each
row's logsumexp, and backward builds the gradients slice by slice of the vocabulary (``mrloss.ops.low_memory``,
~8·N_learned·H·V FLOPs in all), the weight gradient accumulated in float32 and written once in its dtype.
"""

from __future__ import annotations

import math
import os

import torch

from mrloss.ops.backends.dtypes import accumulation_dtype
from mrloss.ops.chunked import (
    FusedLosses,
    RowOp,
    RowStats,
    SliceGradOp,
    TokenMetrics,
    chunked_linear_cross_entropy,
    default_chunk_size,
)
from mrloss.ops.function import LinearCrossEntropyFunction, Plan
from mrloss.ops.normalization import (  # noqa: F401  (check_normalizer, normalizer_tensor: public names here too)
    IGNORE_INDEX,
    check_normalizer,
    learned_mask,
    normalizer_tensor,
    shift_targets,
    weight_scales,
)

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
MEMORY_MODES = ("fast", "low")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    shift: bool = False,
    backend: str = "auto",
    return_token_losses: bool = False,
    chunk_size: int | None = None,
    memory: str = "fast",
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_metrics: bool = False,
):
    """Weighted cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``targets``, without
    ever materializing the ``[N, V]`` logits.

    hidden [..., H] fp16|bf16|fp32|fp64; weight [V, H] and bias [V] of the same dtype;
    targets [...] integer class ids (``ignore_index`` = no target); token_weights [...] float, finite,
    >= 0 (None: all 1.0; 0: not learned; treated as constants, no gradient flows into them).
    l_i = logsumexp(z_i) - (1 - eps) z_i[t_i] - eps/V sum_j z_i[j], z_i = softcap(h_i W^T + b).
    reduction "mean": sum(w l) / sum(w) over valid tokens (0, with zero gradients, when that sum is 0);
    "sum": sum(w l); "none": w l per token, shape of targets. normalizer: sum(w l) / normalizer instead,
    a float >= 0 or a 0-dim tensor (on hidden's device or the CPU; used as given, without a host sync,
    detached); 0, with zero gradients, when normalizer <= 0. shift: position k-1 predicts targets[..., k]
    with token_weights[..., k]; per-token outputs are target-aligned (index 0 of each sequence is 0).
    backend "auto": Triton on CUDA tensors, chunked PyTorch otherwise ("triton" on the CPU needs
    TRITON_INTERPRET=1). chunk_size: learned tokens per chunk (default: chunk logits ~ size of hidden).
    memory "fast": gradients built in the forward into a float32 [V, H] buffer (~6·N·H·V FLOPs); "low": no
    [V, H] float32 buffer and no [N, V], the gradients built in backward by vocabulary slices (~8·N·H·V FLOPs;
    extra memory a float32 [N_learned, H] and a few chunk-sized blocks); same results to rounding.
    z_loss_scale zeta >= 0: each token's loss is l_i + zeta * lse_i^2 (lse_i = logsumexp(z_i), PaLM's z-loss,
    Liger's lse_square_scale), under the same weights, reduction and normalizer, its gradient included.
    Returns the loss (float32; float64 for float64 inputs) or, when any return_* flag is set, a tuple of the
    loss and, in this order, the requested ones of: token_losses, the detached unweighted per-token loss l
    without z-loss (float32, shape of targets, 0 where skipped); z_loss, the detached z-loss part of the loss
    (same reduction; 0 when z_loss_scale is 0); token_metrics, a `TokenMetrics` (accuracy: 1.0 where the
    argmax of z_i is the target, entropy: of softmax(z_i); detached float32, shape of targets, 0 where skipped).
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    _check_arguments(
        hidden,
        weight,
        targets,
        token_weights,
        bias,
        reduction,
        normalizer,
        softcap,
        label_smoothing,
        shift,
        backend,
        chunk_size,
    )
    _check_memory_options(memory, z_loss_scale)
    row_op, fused_losses, slice_grad_op = _backend_ops(backend, hidden)
    return learned_rows_loss(
        hidden,
        weight,
        targets,
        token_weights,
        bias=bias,
        vocab_size=weight.shape[0],
        row_op=row_op,
        fused_losses=fused_losses,
        slice_grad_op=slice_grad_op if memory == "low" else None,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
        softcap=softcap,
        label_smoothing=label_smoothing,
        shift=shift,
        chunk_size=chunk_size,
        z_loss_scale=z_loss_scale,
        return_token_losses=return_token_losses,
        return_z_loss=return_z_loss,
        return_token_metrics=return_token_metrics,
    )


def learned_rows_loss(
    hidden,
    weight,
    targets,
    token_weights,
    *,
    bias,
    vocab_size: int,
    row_op: RowOp,
    fused_losses: FusedLosses | None,
    slice_grad_op: SliceGradOp | None,
    ignore_index: int,
    reduction: str,
    normalizer,
    softcap,
    label_smoothing: float,
    shift: bool,
    chunk_size: int | None,
    z_loss_scale: float,
    return_token_losses: bool,
    return_z_loss: bool,
    return_token_metrics: bool,
    learned_hidden=None,
):
    """`linear_cross_entropy` after its checks, on given backend ops: align (shift), compact the learned rows,
    run the autograd function and scatter the per-token outputs back. Shared with the vocabulary-parallel loss
    (``mrloss.parallel_vocab``): ``weight`` may be a shard of a vocabulary of ``vocab_size`` rows (targets are
    checked against ``vocab_size``, chunks are sized by ``weight``), and ``learned_hidden(hidden_2d, rows) ->
    (hidden rows, their indices)`` may wrap the learned rows before the loss (its gradient all-reduce)."""
    acc_dtype = accumulation_dtype(hidden.dtype)
    if shift:  # flat hidden row j predicts flat target j + 1 (never past its sequence)
        targets_used, weights_used = shift_targets(targets, token_weights, ignore_index=ignore_index)
    else:
        targets_used, weights_used = targets, token_weights
    targets_used = targets_used.reshape(-1)
    weights_used = None if weights_used is None else weights_used.reshape(-1)
    learned = learned_mask(targets_used, weights_used, ignore_index)
    num_learned = _check_values_and_count(targets, token_weights, learned, ignore_index, vocab_size, acc_dtype)

    rows = torch.nonzero_static(learned, size=num_learned).squeeze(1)  # learned flat positions
    learned_targets = targets_used.index_select(0, rows).long()
    if weights_used is None:
        learned_weights = torch.ones(num_learned, dtype=acc_dtype, device=hidden.device)
    else:
        learned_weights = weights_used.index_select(0, rows)  # scaled before the cast: weight_scales
    output_positions = rows + 1 if shift else rows

    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden_2d.shape[0], hidden.shape[-1], weight.shape[0])
    chunk_size = max(1, min(chunk_size, num_learned))
    needs_grad = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    plan = Plan(
        row_op,
        fused_losses,
        softcap,
        float(label_smoothing),
        chunk_size,
        reduction == "none",
        needs_grad,
        z_loss_scale=float(z_loss_scale),
        metrics=return_token_metrics,
        slice_grad_op=slice_grad_op,
    )
    if learned_hidden is not None:
        hidden_2d, rows = learned_hidden(hidden_2d, rows)

    scales = weight_scales(learned_weights, normalizer, reduction, dtype=acc_dtype)
    learned_loss, *stats = LinearCrossEntropyFunction.apply(
        hidden_2d, weight, bias, rows, learned_targets, scales, plan
    )
    stats = RowStats(*stats)

    def scatter(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # learned rows -> shape of targets
        full = torch.zeros(targets.numel(), dtype=dtype, device=hidden.device)
        return full.index_copy_(0, output_positions, values.to(dtype)).view(targets.shape)

    loss = scatter(learned_loss, learned_loss.dtype) if reduction == "none" else learned_loss
    extras = []
    if return_token_losses:
        extras.append(scatter(stats.losses, torch.float32))
    if return_z_loss:
        z_loss = (z_loss_scale * stats.lse.square() * scales).to(learned_loss.dtype)
        extras.append(scatter(z_loss, learned_loss.dtype) if reduction == "none" else z_loss.sum())
    if return_token_metrics:
        extras.append(TokenMetrics(scatter(stats.correct, torch.float32), scatter(stats.entropy, torch.float32)))
    return (loss, *extras) if extras else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`; the keyword options are fixed at construction,
    except ``normalizer``, which a call may give (it changes every step) to override the constructor's.

    ``LinearCrossEntropyLoss(reduction="sum", shift=True)(hidden, weight, targets, token_weights, bias)``
    ``LinearCrossEntropyLoss(shift=True)(hidden, weight, targets, token_weights, normalizer=global_sum)``
    """

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise TypeError(
                f"LinearCrossEntropyLoss: unknown option(s) {sorted(unknown)}; expected some of {sorted(_OPTION_NAMES)}"
            )
        self.options = options

    def forward(self, hidden, weight, targets, token_weights=None, bias=None, normalizer=None):
        """normalizer: this call's (None: the constructor's, if any)."""
        options = self.options if normalizer is None else dict(self.options, normalizer=normalizer)
        return linear_cross_entropy(hidden, weight, targets, token_weights, bias=bias, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


_OPTION_NAMES = {
    "ignore_index",
    "reduction",
    "normalizer",
    "softcap",
    "label_smoothing",
    "shift",
    "backend",
    "return_token_losses",
    "chunk_size",
    "memory",
    "z_loss_scale",
    "return_z_loss",
    "return_token_metrics",
}


def autocast_inputs(hidden, weight, bias):
    """(hidden, weight, bias) in the dtype autocast gives ``F.linear`` on hidden's device when autocast is on there
    (float16/bfloat16/float32 tensors cast to ``torch.get_autocast_dtype``; float64 and non-tensors unchanged),
    else as given. The casts are differentiable: gradients flow back in the original dtypes."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(tensor):
        eligible = isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != torch.float64
        return tensor.to(dtype) if eligible else tensor

    return cast(hidden), cast(weight), cast(bias)


def _check_arguments(
    hidden,
    weight,
    targets,
    token_weights,
    bias,
    reduction,
    normalizer,
    softcap,
    label_smoothing,
    shift,
    backend,
    chunk_size,
):
    """Shape, dtype, device and option checks (no device sync)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (("token_weights", token_weights), ("bias", bias)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden {tuple(hidden.shape)} has H={hidden.shape[-1]} "
            f"but weight {tuple(weight.shape)} has H={weight.shape[1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have V >= 1 rows, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"dtype mismatch: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"dtype mismatch: hidden is {hidden.dtype} but bias is {bias.dtype}")
    if (
        targets.dtype == torch.bool
        or targets.is_floating_point()
        or targets.is_complex()
        or not targets.dtype.is_signed
    ):
        raise TypeError(
            f"targets must hold integer class ids in a signed dtype (int64; an unsigned dtype cannot hold "
            f"ignore_index), got {targets.dtype}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"shape mismatch: targets {tuple(targets.shape)} must be hidden's shape without "
            f"its last dim, {tuple(hidden.shape[:-1])} (hidden is {tuple(hidden.shape)})"
        )
    if token_weights is not None:
        if not token_weights.is_floating_point():
            raise TypeError(f"token_weights must be a float tensor, got {token_weights.dtype}")
        if token_weights.shape != targets.shape:
            raise ValueError(
                f"shape mismatch: token_weights {tuple(token_weights.shape)} must match targets {tuple(targets.shape)}"
            )
    named = [
        ("hidden", hidden),
        ("weight", weight),
        ("targets", targets),
        ("token_weights", token_weights),
        ("bias", bias),
    ]
    for name, value in named:
        if value is not None and value.device != hidden.device:
            raise ValueError(f"device mismatch: hidden is on {hidden.device} but {name} is on {value.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if normalizer is not None and reduction == "none":
        raise ValueError('normalizer cannot be combined with reduction="none"')
    check_normalizer(normalizer, hidden.device)
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0.0 <= label_smoothing <= 1.0
    ):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf
    ):
        raise ValueError(f"softcap must be a finite float > 0 or None, got {softcap!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(shift, bool):  # not CCE's int shift: shift=2 is no "shift by 2"
        raise TypeError(f"shift must be a bool (True: position k-1 predicts targets[..., k]), got {shift!r}")
    if shift and targets.dim() == 0:
        raise ValueError("shift=True needs targets with a sequence dimension, got a 0-dim tensor")


def _check_memory_options(memory, z_loss_scale) -> None:
    if memory not in MEMORY_MODES:
        raise ValueError(f"unknown memory {memory!r}; expected one of {MEMORY_MODES}")
    if (
        isinstance(z_loss_scale, bool)
        or not isinstance(z_loss_scale, (int, float))
        or not 0.0 <= z_loss_scale < math.inf
    ):
        raise ValueError(f"z_loss_scale must be a finite float >= 0, got {z_loss_scale!r}")


def _backend_ops(backend: str, hidden: torch.Tensor) -> tuple[RowOp, FusedLosses | None, SliceGradOp]:
    """The row op of the chosen backend, its fused loss-only forward, or None where there is none
    (torch backend; float64, which the fused kernel leaves to the chunks), and its vocabulary-slice gradient
    op (memory="low"). Contracts: ``mrloss.ops.chunked``.
    "auto" on CUDA: the Triton ops, each falling back to the PyTorch backend (one warning) if it fails."""
    from mrloss.ops.backends.torch import cross_entropy_rows as torch_rows
    from mrloss.ops.backends.torch import cross_entropy_slice_grad as torch_slice_grad

    auto = backend == "auto"
    if auto:
        backend = _auto_backend(hidden)
    if backend == "torch":
        return torch_rows, None, torch_slice_grad
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f'backend="triton" needs CUDA tensors (hidden is on {hidden.device}) or '
            "TRITON_INTERPRET=1 set before triton is imported"
        )
    if not _triton_available():
        raise ImportError('backend="triton" needs the triton package (pip install triton)')
    from mrloss.ops.backends.triton.cross_entropy_rows import cross_entropy_rows, cross_entropy_slice_grad
    from mrloss.ops.backends.triton.linear_cross_entropy_forward import linear_cross_entropy_forward

    fused = None if hidden.dtype == torch.float64 else linear_cross_entropy_forward
    if not auto:
        return cross_entropy_rows, fused, cross_entropy_slice_grad
    from mrloss.ops.triton_fallback import with_torch_fallback

    row_op = with_torch_fallback(cross_entropy_rows, torch_rows, "cross_entropy_rows")
    slice_grad_op = with_torch_fallback(cross_entropy_slice_grad, torch_slice_grad, "cross_entropy_rows")
    if fused is not None:
        fused = with_torch_fallback(fused, _chunked_torch_losses, "linear_cross_entropy_forward")
    return row_op, fused, slice_grad_op


def _auto_backend(hidden: torch.Tensor) -> str:
    """backend="auto": Triton on CUDA tensors (when triton is installed), PyTorch otherwise."""
    return "triton" if hidden.is_cuda and _triton_available() else "torch"


def _chunked_torch_losses(
    hidden, weight, bias, rows, targets, *, softcap, label_smoothing, lse_out=None, correct_out=None, entropy_out=None
) -> torch.Tensor:
    """The fused loss-only forward's result from the PyTorch chunks (its fallback), float32."""
    from mrloss.ops.backends.torch import cross_entropy_rows as torch_rows

    chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    result = chunked_linear_cross_entropy(
        hidden,
        weight,
        bias,
        rows,
        targets,
        None,
        row_op=torch_rows,
        softcap=softcap,
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
        metrics=correct_out is not None or entropy_out is not None,
    )
    for out, values in (
        (lse_out, result.rows.lse),
        (correct_out, result.rows.correct),
        (entropy_out, result.rows.entropy),
    ):
        if out is not None:
            out.copy_(values)
    return result.rows.losses.float()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_values_and_count(targets, token_weights, learned, ignore_index, vocab_size, acc_dtype) -> int:
    """Raise on targets outside [0, V) (other than ignore_index) and on negative token weights or weights not
    finite in ``acc_dtype`` (the dtype the loss uses them in: 1e39 in float64 is inf in float32); return the
    number of learned tokens. One device -> host sync for all three."""
    bad_targets = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    counts = [bad_targets.sum(), learned.sum()]
    if token_weights is not None:
        bad_weights = ~torch.isfinite(token_weights.to(acc_dtype)) | (token_weights < 0)
        counts.append(bad_weights.sum())
    counts = torch.stack(counts).tolist()
    if counts[0]:
        position = _first_position(bad_targets)
        raise ValueError(
            f"targets{position} = {targets[position].item()} is outside [0, V={vocab_size}) "
            f"and is not ignore_index ({ignore_index}); {counts[0]} such target(s) in "
            f"targets of shape {tuple(targets.shape)}"
        )
    if token_weights is not None and counts[2]:
        position = _first_position(bad_weights)
        raise ValueError(
            f"token_weights{position} = {token_weights[position].item()}: token weights must "
            f"be finite and >= 0 (finite in {acc_dtype}, the dtype the loss uses them in); {counts[2]} bad "
            f"value(s) in token_weights of shape "
            f"{tuple(token_weights.shape)}"
        )
    return counts[1]


def _first_position(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(mask.reshape(-1).nonzero()[0, 0], mask.shape))
