"""How each supported causal-LM architecture turns its last hidden state into logits, and the loss options a
user may set: the one table both integrations (`mrloss.integrations.hf`, `mrloss.integrations.verl.engine`)
compute their fused loss from, and `head_loss`, the one hidden -> head -> loss step both call (PEFT check
included). Imports neither transformers nor verl.

    logits = softcap(lm_head(hidden * hidden_scale))        (softcap: c * tanh(x / c); None: no cap)

Scaling the hidden state instead of the logits is exact because no supported head has a bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

# Options of `mrloss.linear_cross_entropy` a user may set; everything else is decided by the model and the batch.
# ``softcap`` overrides the model's own cap (None keeps the model's).
LOSS_OPTIONS = ("backend", "chunk_size", "label_smoothing", "ignore_index", "softcap", "memory", "z_loss_scale")


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
    spec = SUPPORTED_ARCHITECTURES.get(name)
    if spec is None:
        raise TypeError(
            f"{caller}: cannot patch {name} (model_type "
            f"{getattr(getattr(causal_lm, 'config', None), 'model_type', None)!r}): mrloss does not know how its head "
            f"maps hidden states to logits; supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    softcap = softcap_override if softcap_override is not None else spec.softcap(causal_lm)
    return Head(hidden_scale=spec.hidden_scale(causal_lm), softcap=softcap)


def check_loss_options(loss_options: Mapping | None, *, caller: str) -> dict:
    """``loss_options`` as a new dict; TypeError naming ``caller`` for keys outside `LOSS_OPTIONS`."""
    options = dict(loss_options or {})
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"{caller}: unknown loss option(s) {unknown}; allowed: {list(LOSS_OPTIONS)}")
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
    (verl); the logits are never built."""
    if head.hidden_scale is not None:
        hidden = hidden * head.hidden_scale
    lm_head = lm_head_of(causal_lm, caller=caller)
    return loss_fn(hidden, lm_head.weight, *args, bias=getattr(lm_head, "bias", None), softcap=head.softcap, **kwargs)
