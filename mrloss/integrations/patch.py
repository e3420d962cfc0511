"""The model patch of the Hugging Face integration: `apply_mrloss(model, **loss_options)` gives a loaded causal LM
*instance* (``*ForCausalLM``, a vision-language ``*ForConditionalGeneration``, also inside a PEFT wrapper) a forward
that, with ``labels``, takes ``token_weights`` and ``num_items_in_batch`` and computes the loss with
`mrloss.linear_cross_entropy` straight from ``lm_head.weight`` -- the ``[B, T, V]`` logits are never built
(``logits=None``). The hidden states come from the model's own forward (`mrloss.integrations.head_input`), so every
input it takes (``pixel_values``, ``image_grid_thw``, ``token_type_ids``, ...) goes through as the model handles
it, and a MoE model's router ``aux_loss`` is the model's own. Without labels the model's own forward runs
(logits as usual, ``logits_to_keep`` honoured: generation).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from typing import Callable

import torch

from mrloss.integrations.head_input import check_head, head_input, router_aux_coefficient
from mrloss.integrations.heads import check_loss_options, head_loss, lm_head_of, unwrap_causal_lm
from mrloss.ops.api import linear_cross_entropy

CALLER = "apply_mrloss"
KEYWORD_ONLY, VAR_KEYWORD = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD
# attribute of the patched model: False makes its forward skip the token metrics (None in the output);
# MultiRegionTrainer sets it per step (only steps that log, and evaluation, compute them)
TOKEN_METRICS_FLAG = "_mrloss_token_metrics"


class WeightSum(torch.Tensor):
    """A ``num_items_in_batch`` that is the Σ of valid token weights of the optimizer step (what
    `mrloss.integrations.hf.MultiRegionTrainer` passes), not a token count: `weight_sum` marks one. Anything else
    next to ``token_weights`` (a stock `transformers.Trainer`'s count, int or float) makes the patched forward warn."""


def weight_sum(total: torch.Tensor) -> WeightSum:
    """``total`` (a 0-dim tensor Σw, e.g. `mrloss.ops.normalization.valid_weight_sum` summed over the step) marked
    as a `WeightSum` (the same storage)."""
    return total.as_subclass(WeightSum)


@dataclasses.dataclass(frozen=True)
class _Patch:
    """What `apply_mrloss` stores on the instance: the model's own forward, its checked head, the loss options."""

    stock_forward: object
    head: object
    options: dict


@functools.cache
def _output_class(base: type) -> type:
    """``base`` (the model's own output class: `CausalLMOutputWithPast`, `MoeCausalLMOutputWithPast`, a VLM's) plus
    ``token_losses [B, T] fp32``: the unweighted cross-entropy of predicting ``labels[:, k]`` at index k
    (target-aligned; 0 at k=0, on ignored and weight-0 targets), and, alike, ``token_accuracy`` (1.0 where the
    argmax is the label) and ``token_entropy`` (of the softmax)."""
    fields = {"token_losses": None, "token_accuracy": None, "token_entropy": None}
    namespace = {"__annotations__": dict.fromkeys(fields, torch.FloatTensor | None), **fields}
    namespace["__doc__"] = _output_class.__doc__
    return dataclasses.dataclass(type(f"MultiRegion{base.__name__}", (base,), namespace))


def apply_mrloss(model, **loss_options):
    """Patch ``model`` (a causal LM instance, or a PEFT model around one) in place; returns it.

    loss_options: any of `mrloss.integrations.heads.LOSS_OPTIONS` (the fields of `mrloss.LossOptions` a user sets:
    backend, chunk_size, label_smoothing, ignore_index, softcap, memory, ...), passed on to
    `mrloss.linear_cross_entropy`.
    Calling it again replaces the options. Only the instance changes; other instances of the class keep the
    stock forward.

    The patched forward, with ``labels [B, T]`` (HF convention: -100 on padding and weight-0 tokens) or
    ``shift_labels [B, T]`` (pre-shifted: index k is the target of position k, what sequence-parallel loaders send;
    ``token_weights`` then aligned with them):
        ``token_weights [B, T] fp32`` aligned with ``input_ids`` (None: 1.0 on every valid label, i.e. the stock HF
        loss); ``num_items_in_batch``: the normalizer, the global sum of valid weights of the optimizer step (None:
        this batch's own sum, i.e. a weighted mean). One that is not a `WeightSum` next to token_weights (a stock
        ``transformers.Trainer``'s token count) is used as given, with a warning (once per model). Labels, weights
        and a tensor num_items_in_batch are moved to the device of the last hidden state.
        loss = Σ_k w_k CE(logits_{k-1}, labels_k) / normalizer (+ router_aux_loss_coef * aux_loss when the model's
        own forward returns a MoE ``aux_loss``: ``output_router_logits=True``), logits never materialized;
        returns the model's own output type with ``loss``, ``logits=None`` and ``token_losses``,
        ``token_accuracy``, ``token_entropy`` ``[B, T] fp32`` (target-aligned, detached; the metrics come from the
        loss's own row pass, no extra matmul; None while the model's `TOKEN_METRICS_FLAG` is False).
    Without labels it is the model's own forward (logits as usual); ``token_weights`` then is an error.
    Raises TypeError when the model's own forward does not compute the logits as its head description says
    (`mrloss.integrations.head_input.check_head`).
    """
    options = check_loss_options(loss_options, caller=CALLER)
    causal_lm = unwrap_causal_lm(model)
    lm_head_of(causal_lm, caller=CALLER)  # fail now, not at the first training step
    stock_forward = causal_lm._mrloss.stock_forward if "_mrloss" in causal_lm.__dict__ else causal_lm.forward
    head = check_head(causal_lm, stock_forward, options.pop("softcap", None), caller=CALLER)
    causal_lm._mrloss = _Patch(stock_forward, head, options)
    causal_lm.forward = types.MethodType(_with_signature(mrloss_forward, stock_forward), causal_lm)
    causal_lm.accepts_loss_kwargs = True
    return model


def mrloss_forward(
    causal_lm, *args, labels=None, shift_labels=None, token_weights=None, num_items_in_batch=None, **kwargs
):
    """The forward `apply_mrloss` gives ``causal_lm`` (see there)."""
    patch = causal_lm._mrloss
    if labels is None and shift_labels is None:
        if token_weights is not None:
            raise ValueError(f"{CALLER}: token_weights were given without labels")
        return patch.stock_forward(*args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)  # the loss covers every position
    if kwargs.get("use_cache") is None:
        kwargs["use_cache"] = False  # a loss pass has no use for a KV cache
    outputs, hidden = head_input(causal_lm, patch.stock_forward, *args, **kwargs)
    targets = shift_labels if shift_labels is not None else labels
    if token_weights is not None:
        token_weights = token_weights.to(hidden.device)
        _warn_if_not_weight_sum(causal_lm, num_items_in_batch)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(hidden.device).as_subclass(torch.Tensor)
    output = head_loss(
        causal_lm,
        patch.head,
        hidden,
        linear_cross_entropy,
        targets.to(hidden.device),
        token_weights,
        caller=CALLER,
        shift=shift_labels is None,
        normalizer=num_items_in_batch,
        return_token_losses=True,
        return_token_metrics=causal_lm.__dict__.get(TOKEN_METRICS_FLAG, True),
        **patch.options,
    )
    loss = output.loss
    if getattr(outputs, "aux_loss", None) is not None:
        loss = loss + router_aux_coefficient(causal_lm, caller=CALLER) * outputs.aux_loss.to(loss.device)
    fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
    metrics = output.token_metrics  # None when not asked for (a training step that does not log)
    result = _output_class(type(outputs))(
        loss=loss,
        **fields,
        token_losses=output.token_losses,
        token_accuracy=None if metrics is None else metrics.accuracy,
        token_entropy=None if metrics is None else metrics.entropy,
    )
    return result.to_tuple() if return_dict is False else result


def _with_signature(forward: Callable, stock_forward: Callable) -> Callable:
    """``forward`` (called with the model first) as a new function whose signature is ``stock_forward``'s plus the
    patched forward's own keywords: what code that inspects ``model.forward`` expects (transformers' ``generate``
    builds ``attention_mask`` / ``position_ids`` only for a forward that names them; the Trainer keeps the dataset
    columns it names)."""

    def patched(causal_lm, *args, **kwargs):
        return forward(causal_lm, *args, **kwargs)

    stock = inspect.signature(stock_forward)
    own = ("labels", "shift_labels", "token_weights", "num_items_in_batch")
    added = [inspect.Parameter(name, KEYWORD_ONLY, default=None) for name in own if name not in stock.parameters]
    fixed = [p for p in stock.parameters.values() if p.kind != VAR_KEYWORD]
    variadic = [p for p in stock.parameters.values() if p.kind == VAR_KEYWORD]
    model = inspect.Parameter("causal_lm", inspect.Parameter.POSITIONAL_ONLY)
    patched.__signature__ = stock.replace(parameters=[model, *fixed, *added, *variadic])
    patched.__name__, patched.__doc__ = forward.__name__, forward.__doc__
    return patched


def _warn_if_not_weight_sum(causal_lm, num_items_in_batch) -> None:
    """Warn once per model when ``num_items_in_batch`` next to ``token_weights`` is not a `WeightSum`: then it is a
    token count (a stock `transformers.Trainer` passes Σ(labels[..., 1:] != -100) of the optimizer step, an int64
    tensor before transformers 5.11, a float one since), so the loss becomes Σw·l / count instead of the weighted
    mean Σw·l / Σw."""
    if num_items_in_batch is None or isinstance(num_items_in_batch, WeightSum):
        return
    if not causal_lm.__dict__.get("_mrloss_warned_token_count", False):
        causal_lm._mrloss_warned_token_count = True
        warnings.warn(
            f"{CALLER}: num_items_in_batch ({num_items_in_batch!r}) is not a Σ of token weights marked by "
            "MultiRegionTrainer but, as a stock transformers.Trainer computes it, a token count, while "
            "token_weights are given: the loss is Σ w·l / token count, not the weighted mean Σ w·l / Σ w. Train "
            "with mrloss.integrations.hf.MultiRegionTrainer (it passes the step's Σ of weights), or pass "
            "mrloss.integrations.patch.weight_sum(Σ of the valid weights).",
            stacklevel=3,
        )
