"""The implementations compared, each given its best legal use for a *weighted* loss.

Every implementation computes the same number: ``sum_i w_i * l_i / sum_i w_i`` over valid tokens, from
hidden [N, H], weight [V, H], targets [N] (IGNORE_INDEX where w = 0) and token_weights [N] fp32. None of
the baselines takes per-token weights, so each returns per-token losses (``reduction="none"``), zero-weight
tokens carry ``ignore_index`` (which the implementation may skip), and the caller multiplies by the
weights and divides by their sum. ``IMPLS[name].loss_fn(hidden, weight, targets, token_weights, softcap)``
returns that 0-dim loss.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch

from bench.cases import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation: what it needs, and how it runs on a CPU.

    cpu: "timed" (runs natively), "interpreted" (Triton kernels under TRITON_INTERPRET=1: correctness
    is checked on small cases, never timed), or "no" (cannot run; ``cpu_reason`` says why).
    """

    name: str
    loss_fn: Callable  # (hidden, weight, targets, token_weights, softcap) -> 0-dim loss
    how: str
    module: str | None = None  # top-level package that must be installed
    torch_function: str | None = None  # a torch.nn.functional function it needs (not in every torch)
    cpu: str = "timed"
    cpu_reason: str = ""
    softcap: bool = True
    cpu_softcap_reason: str = ""  # set when the softcap path cannot run on a CPU
    primary: bool = False  # an mrloss implementation (the numerator of the ratios)


def availability(impl: Impl, device_type: str, softcap: float | None) -> tuple[str, str]:
    """("ok" | "missing" | "unsupported", reason) of running ``impl`` on a device type and a case."""
    if impl.module is not None and importlib.util.find_spec(impl.module) is None:
        return "missing", f"{impl.module} is not installed"
    if impl.torch_function is not None and not hasattr(torch.nn.functional, impl.torch_function):
        return "missing", f"torch {torch.__version__} has no torch.nn.functional.{impl.torch_function}"
    if softcap is not None and not impl.softcap:
        return "unsupported", "no logit softcap option"
    if device_type == "cpu" and impl.cpu == "no":
        return "unsupported", impl.cpu_reason
    if device_type == "cpu" and softcap is not None and impl.cpu_softcap_reason:
        return "unsupported", impl.cpu_softcap_reason
    return "ok", ""


def _weighted_mean(token_losses: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    return (token_losses.float() * token_weights).sum() / token_weights.sum()


def _plain(hidden, weight, targets, token_weights, softcap):
    from mrloss.ops.reference import reference_linear_cross_entropy

    return reference_linear_cross_entropy(
        hidden, weight, targets, token_weights, softcap=softcap, ignore_index=IGNORE_INDEX, compute_dtype=None
    )


def _torch_chunked(hidden, weight, targets, token_weights, softcap):
    token_losses = torch.nn.functional.linear_cross_entropy(
        hidden,
        weight,
        targets,
        reduction="none",
        ignore_index=IGNORE_INDEX,
        options=torch.nn.LinearCrossEntropyOptions(),
    )
    return _weighted_mean(token_losses, token_weights)


def _liger(hidden, weight, targets, token_weights, softcap):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    token_losses = liger_fused_linear_cross_entropy(
        hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", softcap=softcap
    )
    return _weighted_mean(token_losses, token_weights)


def _cce(impl: str):
    def loss_fn(hidden, weight, targets, token_weights, softcap):
        from cut_cross_entropy import linear_cross_entropy

        token_losses = linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE_INDEX, softcap=softcap, reduction="none", impl=impl
        )
        return _weighted_mean(token_losses, token_weights)

    return loss_fn


def _trl(hidden, weight, targets, token_weights, softcap):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    # TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, SFTTrainer's default) scores only the rows whose
    # label is not -100 on a Triton device: it compacts them before the call. Done here on every device (on a CPU
    # TRL itself would score every row), so that the CPU numbers measure what a GPU run does.
    learned = targets != IGNORE_INDEX
    log_probs, *_ = ChunkedLogProbFunction.apply(
        hidden[learned],
        weight,
        None,
        targets[learned],
        1.0,
        _CHUNKED_LOGPROB_CHUNK_SIZE,
        softcap,
        1.0,
        ("log_probs",),
    )
    return -(log_probs * token_weights[learned]).sum() / token_weights.sum()


def _mrloss(backend: str, memory: str = "fast", chunk_size: int | None = None):
    def loss_fn(hidden, weight, targets, token_weights, softcap):
        import mrloss

        return mrloss.linear_cross_entropy(
            hidden,
            weight,
            targets,
            token_weights,
            softcap=softcap,
            ignore_index=IGNORE_INDEX,
            backend=backend,
            memory=memory,
            chunk_size=chunk_size,
        )

    return loss_fn


def _chunk_loss_and_grads(hidden_chunk, weight, targets_chunk, scaled_weights_chunk, softcap: float | None):
    """Loss sum and gradients of one row chunk (compiled): hidden_chunk [C, H], weight [V, H].

    scaled_weights_chunk [C] fp32 holds w_i / sum(w) (0 on ignored rows). Returns (loss [] fp32,
    grad_hidden [C, H] input dtype, grad_weight [V, H] fp32).
    """
    logits = (hidden_chunk @ weight.T).float()
    if softcap is not None:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)
    safe_targets = torch.where(targets_chunk == IGNORE_INDEX, 0, targets_chunk)
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
    loss = (scaled_weights_chunk * (lse - target_logits)).sum()
    one_hot = torch.nn.functional.one_hot(safe_targets, logits.shape[1]).float()
    grad_logits = (torch.exp(logits - lse[:, None]) - one_hot) * scaled_weights_chunk[:, None]
    if softcap is not None:
        grad_logits = grad_logits * (1 - capped * capped)
    grad_logits = grad_logits.to(hidden_chunk.dtype)
    return loss, grad_logits @ weight, (grad_logits.T @ hidden_chunk).float()


_compiled_chunk = None


class _CompiledChunkedCE(torch.autograd.Function):
    """Weighted mean CE whose gradients are computed in forward, chunk by chunk (the Liger recipe)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, softcap):
        global _compiled_chunk
        if _compiled_chunk is None:
            _compiled_chunk = torch.compile(_chunk_loss_and_grads, dynamic=False)
        tokens, hidden_size = hidden.shape
        rows_per_chunk = _liger_chunk_rows(tokens, hidden_size, weight.shape[0])
        scaled = torch.where(targets == IGNORE_INDEX, 0.0, token_weights) / token_weights.sum()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            chunk_loss, chunk_grad_hidden, chunk_grad_weight = _compiled_chunk(
                hidden[rows], weight, targets[rows], scaled[rows], softcap
            )
            loss += chunk_loss
            grad_hidden[rows] = chunk_grad_hidden
            grad_weight += chunk_grad_weight
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def _liger_chunk_rows(tokens: int, hidden_size: int, vocab: int) -> int:
    """Rows per chunk so a chunk's [C, V] logits are about the size of hidden [N, H] (Liger's rule)."""
    inc_factor = -(-vocab // hidden_size)
    target = -(-tokens // inc_factor)
    return min(1 << (target - 1).bit_length(), tokens)


def _torch_compile_chunked(hidden, weight, targets, token_weights, softcap):
    return _CompiledChunkedCE.apply(hidden, weight, targets, token_weights, softcap)


IMPLS = {
    impl.name: impl
    for impl in [
        Impl(
            "plain",
            _plain,
            "mrloss.reference.reference_linear_cross_entropy(compute_dtype=None): materialized [N, V] logits "
            "in the input dtype + F.cross_entropy(reduction='none') * w / sum(w)",
        ),
        Impl(
            "torch-chunked",
            _torch_chunked,
            "torch.nn.functional.linear_cross_entropy(reduction='none', ignore_index=-100, "
            "options=LinearCrossEntropyOptions()) (auto acc_policy / chunking_method) * w / sum(w)",
            torch_function="linear_cross_entropy",
            softcap=False,
        ),
        Impl(
            "torch-compile-chunked",
            _torch_compile_chunked,
            "bench.baselines: torch.compile'd chunk (logits, lse, d logits, both matmuls) over Liger-sized "
            "row chunks, gradients computed in forward, weights folded in; no compaction of zero-weight rows",
        ),
        Impl(
            "liger",
            _liger,
            "liger_kernel fused linear CE, reduction='none', ignore_index=-100 on w=0, softcap passed "
            "through, * w / sum(w) (its backward recomputes the chunks)",
            module="liger_kernel",
            cpu="interpreted",
            cpu_softcap_reason="Liger's softcap path fails under the Triton CPU interpreter "
            "(InterpreterError: 'float' object has no attribute 'to')",
        ),
        Impl(
            "cce",
            _cce("cce"),
            "cut_cross_entropy.linear_cross_entropy(impl='cce', reduction='none', ignore_index=-100 on w=0 "
            "(rows filtered out), softcap passed through, default filter_eps) * w / sum(w)",
            module="cut_cross_entropy",
            cpu="no",
            cpu_reason="CCE's Triton kernels fail under the CPU interpreter "
            "(InterpreterError in _cce_lse_forward_kernel)",
        ),
        Impl(
            "cce-torch-compile",
            _cce("torch_compile"),
            "cut_cross_entropy.linear_cross_entropy(impl='torch_compile', reduction='none', ignore_index=-100: "
            "valid rows gathered, their logits materialized) * w / sum(w)",
            module="cut_cross_entropy",
        ),
        Impl(
            "trl",
            _trl,
            "trl.kernels.ChunkedLogProbFunction (SFTTrainer's fused LM head: vocabulary chunks of "
            "trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, softcap passed through, log-probs only) on the rows "
            "with a target (compacted first, as TRL does on a GPU), -sum(w log p) / sum(w); on a CPU its torch "
            "fallback of the Triton tile kernels",
            module="trl",
        ),
        Impl(
            "mrloss-triton",
            _mrloss("triton"),
            "mrloss.linear_cross_entropy(backend='triton', token_weights=w)",
            cpu="interpreted",
            primary=True,
        ),
        Impl(
            "mrloss-torch",
            _mrloss("torch"),
            "mrloss.linear_cross_entropy(backend='torch', token_weights=w)",
            primary=True,
        ),
        Impl(
            "mrloss-triton-low",
            _mrloss("triton", "low"),
            "mrloss.linear_cross_entropy(backend='triton', memory='low', token_weights=w): no float32 [V, H] buffer, "
            "gradients by vocabulary slices in backward",
            cpu="interpreted",
            primary=True,
        ),
        Impl(
            "mrloss-torch-low",
            _mrloss("torch", "low"),
            "mrloss.linear_cross_entropy(backend='torch', memory='low', token_weights=w)",
            primary=True,
        ),
    ]
}


def resolve(name: str) -> Impl:
    """``IMPLS[name]``, or for ``<mrloss implementation>@C`` (e.g. ``mrloss-triton@4096``) that implementation with
    ``chunk_size=C`` (the chunk-size sweep of the GPU pass). KeyError for anything else."""
    base, sep, chunk = name.partition("@")
    impl = IMPLS[base]
    if not sep:
        return impl
    if not impl.primary or not chunk.isdigit() or int(chunk) < 1:
        raise KeyError(name)
    backend = "triton" if "triton" in base else "torch"
    memory = "low" if base.endswith("-low") else "fast"
    return dataclasses.replace(
        impl, name=name, loss_fn=_mrloss(backend, memory, int(chunk)), how=f"{impl.how}, chunk_size={chunk}"
    )


def known(name: str) -> bool:
    try:
        resolve(name)
    except KeyError:
        return False
    return True
