"""How a causal LM turns its last hidden state into logits, and the loss options a user may set: the one head
description both integrations (`mrloss.integrations.patch`, `mrloss.integrations.verl.engine`) compute their fused
loss from, and `head_loss`, the one hidden -> head -> loss step both call (PEFT check included). Imports neither
transformers nor verl.

    logits = softcap(scale * (hidden @ W^T + b))        (softcap: c * tanh(x / c); None: no cap)

``hidden`` is what the model's own forward hands its ``lm_head`` (W, b: lm_head's weight and bias); ``scale`` and the
cap are read from the model's text config (`LOGIT_SCALES`, `SOFTCAP_KEYS`). The loss takes ``scale * hidden`` and
``scale * b``. Supported are the models whose own forward computes exactly this: `describe_head` reads the
description, `mrloss.integrations.head_input.check_head` checks it against the model's own code when a model is
patched (no table of class names).

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
from typing import Callable, Mapping

import torch
from torch.distributed.tensor import DTensor

from mrloss.ops.api import linear_cross_entropy
from mrloss.ops.options import MODEL_OPTIONS, LossOptions
from mrloss.parallel_vocab import local_head, vocab_parallel_linear_cross_entropy

# Options of `mrloss.linear_cross_entropy` a user may set (the fields of `mrloss.LossOptions` not decided per call);
# everything else is decided by the model and the batch. ``softcap`` overrides the model's own cap (None keeps it).
LOSS_OPTIONS = MODEL_OPTIONS


# Text-config keys that scale the logits: key -> exponent (1: logits * value, -1: logits / value, 0: applied to the
# hidden state before lm_head, so already in what the head gets). A key whose value is None is left out;
# `check_head` rejects a model whose code uses a key differently.
LOGIT_SCALES = {"logit_scale": 1, "logits_scaling": -1, "lm_head_multiplier": 1, "output_multiplier_scale": 1}
# model_type -> the keys its code reads the other way (reviewed against the modeling code; `check_head` confirms)
LOGIT_SCALE_EXCEPTIONS = {
    "hyperclovax": {"logits_scaling": 1},  # MuP: logits * logits_scaling
    "minicpm3": {"logits_scaling": 0},  # lm_head(hidden / logits_scaling)
}
SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap")  # text-config keys of the cap c in c * tanh(x / c)


@dataclasses.dataclass(frozen=True)
class Head:
    """The head of one model instance: ``logits = softcap(scale * (hidden @ W^T + b))`` (None: 1, no cap)."""

    scale: float | None
    softcap: float | None


def unwrap_causal_lm(model):
    """The ``*ForCausalLM`` instance inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def text_config(causal_lm):
    """The config of the language part of a causal LM (the config itself for a text-only model)."""
    config = causal_lm.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def describe_head(causal_lm) -> Head:
    """`Head` of a causal LM as its text config describes it (`LOGIT_SCALES`, `SOFTCAP_KEYS`); unchecked."""
    config = text_config(causal_lm)
    exponents = {**LOGIT_SCALES, **LOGIT_SCALE_EXCEPTIONS.get(getattr(config, "model_type", None), {})}
    scale = None
    for key, exponent in exponents.items():
        value = getattr(config, key, None)
        if value is not None and exponent != 0:
            scale = (1.0 if scale is None else scale) * float(value) ** exponent
    softcap = next((getattr(config, key) for key in SOFTCAP_KEYS if getattr(config, key, None) is not None), None)
    return Head(scale=None if scale == 1.0 else scale, softcap=softcap)


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
    """Hidden -> head -> loss: ``loss_fn(hidden * scale, lm_head.weight, *args, bias=lm_head.bias * scale,
    softcap=head.softcap, **kwargs)``, the lm_head checked by `lm_head_of` (no PEFT adapter on it).
    ``loss_fn``: `mrloss.linear_cross_entropy` (HF) or `mrloss.parallel.sequence_parallel_linear_cross_entropy`
    (verl); the logits are never built. A head split by vocabulary rows (see the module docstring) goes to
    `mrloss.parallel_vocab.vocab_parallel_linear_cross_entropy` (HF) or gets ``vocab_parallel`` (verl); a head that
    is its own ``fully_shard`` unit runs the loss as a forward method of that unit."""
    if head.scale is not None:
        hidden = hidden * head.scale
    lm_head = lm_head_of(causal_lm, caller=caller)
    vocab_size = causal_lm.config.get_text_config().vocab_size

    def compute(hidden):
        weight, bias, vocab_parallel = local_head(lm_head, vocab_size)  # read here: after an FSDP all-gather
        if bias is not None and head.scale is not None:
            bias = bias * head.scale
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
