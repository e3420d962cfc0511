"""How each supported causal-LM architecture turns its last hidden state into logits, and the loss options a
user may set: the one table both integrations (`mrloss.integrations.hf`, `mrloss.integrations.verl.engine`)
compute their fused loss from, and `head_loss`, the one hidden -> head -> loss step both call (PEFT check
included). Imports neither transformers nor verl.

    logits = softcap(lm_head(hidden * hidden_scale))        (softcap: c * tanh(x / c); None: no cap)

Scaling the hidden state instead of the logits is exact because no supported head has a bias.

Sharded heads: under FSDP2 (``fully_shard``) the weight is a DTensor sharded over the data-parallel mesh at rest,
but the forward of the FSDP unit that holds ``lm_head`` all-gathers it, so the patched forward (the root's, when
``lm_head`` is in the root unit: ``fully_shard`` on each decoder layer, then on the model; or accelerate's tail
unit [final norm, lm_head] with reshard_after_forward=False) sees the full tensor. lm_head alone in a unit (verl's
fsdp2 layout) is never called by the fused loss, so its weight would still be the data-parallel shard: the loss
then runs as a forward method of that unit (``register_fsdp_forward_method``), which all-gathers it first.
A DTensor that does reach the loss is a tensor-parallel one:
split by vocabulary rows (``ColwiseParallel``, or transformers' ``tp_plan``) it goes to
`mrloss.parallel_vocab` (`local_head`), replicated it is used as its local tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch.distributed.tensor import DTensor

from mrloss.ops.api import linear_cross_entropy
from mrloss.ops.options import MODEL_OPTIONS, LossOptions
from mrloss.parallel_vocab import local_head, vocab_parallel_linear_cross_entropy

# Options of `mrloss.linear_cross_entropy` a user may set (the fields of `mrloss.LossOptions` not decided per call);
# everything else is decided by the model and the batch. ``softcap`` overrides the model's own cap (None keeps it).
LOSS_OPTIONS = MODEL_OPTIONS


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One architecture's head beyond ``lm_head``; both read from the ``*ForCausalLM`` instance."""

    hidden_scale: Callable[[Any], float | None] = lambda model: None
    softcap: Callable[[Any], float | None] = lambda model: getattr(model.config, "final_logit_softcapping", None)


_PLAIN = HeadSpec()
# Keyed by class name; each entry is covered by tests/test_hf.py against the model's own forward.
SUPPORTED_ARCHITECTURES: dict[str, HeadSpec] = {
    "LlamaForCausalLM": _PLAIN,
    "MistralForCausalLM": _PLAIN,
    "Qwen2ForCausalLM": _PLAIN,
    "Qwen3ForCausalLM": _PLAIN,
    "GemmaForCausalLM": _PLAIN,
    "Phi3ForCausalLM": _PLAIN,
    "Gemma2ForCausalLM": _PLAIN,  # final_logit_softcapping from the config
    "Gemma3ForCausalLM": _PLAIN,
    # logits = lm_head(h) * logit_scale
    "CohereForCausalLM": HeadSpec(hidden_scale=lambda model: model.logit_scale),
    # logits = lm_head(h) / logits_scaling
    "GraniteForCausalLM": HeadSpec(hidden_scale=lambda model: 1.0 / model.config.logits_scaling),
}


@dataclasses.dataclass(frozen=True)
class Head:
    """The head of one model instance: ``logits = softcap(lm_head(hidden * hidden_scale))``."""

    hidden_scale: float | None
    softcap: float | None


def unwrap_causal_lm(model):
    """The ``*ForCausalLM`` instance inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def model_head(causal_lm, softcap_override: float | None = None, *, caller: str) -> Head:
    """`Head` of a ``*ForCausalLM`` instance (``softcap_override`` replaces the model's cap when not None).
    Raises TypeError, naming ``caller``, for an architecture not in `SUPPORTED_ARCHITECTURES`."""
    name = type(causal_lm).__name__
    # by class name, also through wrappers that subclass the model class (FSDP2's fully_shard: FSDPLlamaForCausalLM)
    spec = next(
        (SUPPORTED_ARCHITECTURES[c.__name__] for c in type(causal_lm).__mro__ if c.__name__ in SUPPORTED_ARCHITECTURES),
        None,
    )
    if spec is None:
        raise TypeError(
            f"{caller}: cannot patch {name} (model_type "
            f"{getattr(getattr(causal_lm, 'config', None), 'model_type', None)!r}): mrloss does not know how its head "
            f"maps hidden states to logits; supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    softcap = softcap_override if softcap_override is not None else spec.softcap(causal_lm)
    return Head(hidden_scale=spec.hidden_scale(causal_lm), softcap=softcap)


def check_loss_options(loss_options: Mapping | None, *, caller: str) -> dict:
    """``loss_options`` as a new dict; TypeError naming ``caller`` for keys outside `LOSS_OPTIONS`, ValueError
    (`mrloss.LossOptions`) for a value out of its range."""
    options = dict(loss_options or {})
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"{caller}: unknown loss option(s) {unknown}; allowed: {list(LOSS_OPTIONS)}")
    LossOptions(**options)  # the values are checked now, not at the first step
    return options


def lm_head_of(causal_lm, *, caller: str) -> torch.nn.Module:
    """The output embedding (``lm_head``) of a ``*ForCausalLM`` instance, as one weight matrix: ValueError,
    naming ``caller``, when it carries a PEFT adapter; TypeError when it is not a linear layer with a 2-D weight."""
    lm_head = causal_lm.get_output_embeddings()
    if hasattr(lm_head, "lora_A") or hasattr(lm_head, "base_layer"):
        raise ValueError(
            f"{caller}: the lm_head of {type(causal_lm).__name__} carries a PEFT adapter "
            f"({type(lm_head).__name__}); the fused loss needs the head as one weight matrix. Leave lm_head "
            "out of the adapter's target_modules (use modules_to_save=['lm_head'] to train it fully), or "
            "merge the adapter first (model.merge_and_unload())."
        )
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"{caller}: lm_head of {type(causal_lm).__name__} is {type(lm_head).__name__}, expected a linear "
            "layer with a 2-D weight [vocab, hidden]"
        )
    return lm_head


def head_loss(causal_lm, head: Head, hidden: torch.Tensor, loss_fn: Callable, *args, caller: str, **kwargs):
    """Hidden -> head -> loss: ``loss_fn(hidden * hidden_scale, lm_head.weight, *args, bias=lm_head.bias,
    softcap=head.softcap, **kwargs)``, the lm_head checked by `lm_head_of` (no PEFT adapter on it).
    ``loss_fn``: `mrloss.linear_cross_entropy` (HF) or `mrloss.parallel.sequence_parallel_linear_cross_entropy`
    (verl); the logits are never built. A head split by vocabulary rows (see the module docstring) goes to
    `mrloss.parallel_vocab.vocab_parallel_linear_cross_entropy` (HF) or gets ``vocab_parallel`` (verl); a head that
    is its own ``fully_shard`` unit runs the loss as a forward method of that unit."""
    if head.hidden_scale is not None:
        hidden = hidden * head.hidden_scale
    lm_head = lm_head_of(causal_lm, caller=caller)
    vocab_size = causal_lm.config.get_text_config().vocab_size

    def compute(hidden):
        weight, bias, vocab_parallel = local_head(lm_head, vocab_size)  # read here: after an FSDP all-gather
        if vocab_parallel is None:
            return loss_fn(hidden, weight, *args, bias=bias, softcap=head.softcap, **kwargs)
        fn = vocab_parallel_linear_cross_entropy if loss_fn is linear_cross_entropy else loss_fn
        return fn(hidden, weight, *args, bias=bias, softcap=head.softcap, vocab_parallel=vocab_parallel, **kwargs)

    unit = _sharding_fsdp_unit(causal_lm, lm_head.weight)
    return compute(hidden) if unit is None else _fsdp_forward(unit, compute, hidden)


FSDP_LOSS_METHOD = "mrloss_head_loss"


def _sharding_fsdp_unit(causal_lm, weight: torch.Tensor):
    """The ``fully_shard`` module whose sharded parameter ``weight`` still is (lm_head, or the embedding it is tied
    to, as its own unit: verl's fsdp2 layout), or None (a plain tensor, or a tensor-parallel DTensor)."""
    if not isinstance(weight, DTensor):
        return None
    from torch.distributed.fsdp import FSDPModule

    for module in causal_lm.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if any(fsdp_param.sharded_param is weight for fsdp_param in group.fsdp_params):
                    return module
    return None


def _fsdp_forward(unit, compute: Callable, hidden: torch.Tensor):
    """``compute(hidden)`` as a forward method of the FSDP2 unit (``register_fsdp_forward_method``): all-gathered
    before, resharded after as its policy says, gradients reduce-scattered in backward; the loss never calls
    lm_head's own forward, so FSDP would not otherwise gather its weight."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    if FSDP_LOSS_METHOD not in unit.__dict__:
        setattr(unit, FSDP_LOSS_METHOD, lambda hidden, compute: compute(hidden))
        register_fsdp_forward_method(unit, FSDP_LOSS_METHOD)
    return getattr(unit, FSDP_LOSS_METHOD)(hidden, compute)
