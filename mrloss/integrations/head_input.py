"""What a model's own forward hands its ``lm_head``, reached through that forward itself: the one way both
integrations (`mrloss.integrations.patch`, `mrloss.integrations.verl.engine`) get the last hidden state, whatever the
model calls its decoder (``.model``, ``.transformer``, Llama-4 text's ``.model`` under ``base_model_prefix``
"language_model", a vision-language model's vision tower + language model) and whatever it does to the decoder's
output before the head.

- `head_input`: the model's own forward with ``lm_head`` swapped for a capture that returns ``[..., 1]`` zeros
  instead of ``[..., V]`` logits (so no logits are built); the model's own outputs come back with what the head got.
- `check_head`: the model's own code against its `mrloss.integrations.heads.Head` description, when it is patched.
- `router_aux_coefficient`: the factor the model's own forward puts on its ``aux_loss`` (MoE).
Imports no transformers: it works on any ``torch.nn.Module`` with ``get_output_embeddings``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch

from mrloss.integrations.heads import Head, describe_head, text_config

CHECK_TOKENS, CHECK_ROWS = 4, 8  # the self-check's sequence length and fake vocabulary
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5  # float32 logits of the fake head, |logits| in [0.1, 30]
# (owner, attribute) of the coefficient a MoE forward puts on its aux_loss, first found wins
ROUTER_AUX_COEFFICIENTS = (
    ("model", "router_aux_loss_coef"),
    ("model", "aux_loss_coef"),
    ("text", "router_aux_loss_coef"),
)


class _HeadCapture(torch.nn.Module):
    """Stands in for ``lm_head``: records each input [..., H], returns ``head(input)``."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.head, self.inputs = head, []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.inputs.append(hidden)
        return self.head(hidden)


def _no_logits(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_zeros(*hidden.shape[:-1], 1)


@contextlib.contextmanager
def _lm_head_replaced(causal_lm, replacement: torch.nn.Module):
    """``causal_lm``'s output embedding module replaced by ``replacement`` (set on its parent module) inside."""
    lm_head = causal_lm.get_output_embeddings()
    path = next((name for name, module in causal_lm.named_modules() if module is lm_head), None)
    if not path:
        raise TypeError(f"{type(causal_lm).__name__}: its output embeddings are not one of its submodules")
    parent_path, _, name = path.rpartition(".")
    parent = causal_lm.get_submodule(parent_path)
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, lm_head)


def head_input(causal_lm, forward: Callable, *args, **kwargs):
    """``(outputs, hidden)``: ``forward(*args, **kwargs)`` (the model's own forward, or a wrapper calling it: PEFT's)
    with the ``lm_head`` of ``causal_lm`` replaced by a capture; ``hidden [..., T, H]`` is what the head got
    (every position: pass no ``logits_to_keep``), ``outputs`` the model's output (its logits ``[..., T, 1]`` zeros;
    its ``aux_loss`` and every other field as the model computes them). Pass no labels: the model would compute
    its loss from those zeros."""
    capture = _HeadCapture(_no_logits)
    with _lm_head_replaced(causal_lm, capture):
        outputs = forward(*args, **kwargs)
    if len(capture.inputs) != 1:
        raise RuntimeError(
            f"{type(causal_lm).__name__}'s forward called its lm_head {len(capture.inputs)} times (expected once)"
        )
    return outputs, capture.inputs[0]


def decoder_of(causal_lm) -> torch.nn.Module:
    """The module the forward of ``causal_lm`` runs before its head: its one child that is itself a transformers
    model (``.model``, ``.transformer``, ...), else ``get_decoder()``. Only `check_head` uses it (to skip running
    it); the loss reaches the hidden states through the model's own forward (`head_input`)."""
    children = [m for m in causal_lm.children() if hasattr(m, "config") and hasattr(m, "get_input_embeddings")]
    return children[0] if len(children) == 1 else causal_lm.get_decoder()


class _DecoderStubOutput(dict):
    """A decoder's output with ``last_hidden_state`` only: every other field reads None."""

    def __getattr__(self, name):
        return self.get(name)

    def __getitem__(self, key):
        return self["last_hidden_state"] if key == 0 else super().__getitem__(key)

    def to_tuple(self):
        return (self["last_hidden_state"],)


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Callable):
    """``module.forward`` is ``forward`` inside (an instance attribute: hooks still run; a previous one comes back)."""
    had, previous = "forward" in module.__dict__, module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def check_head(causal_lm, forward: Callable, softcap_override: float | None = None, *, caller: str) -> Head:
    """`describe_head` of ``causal_lm``, checked (``softcap_override``, when not None, then replaces its cap):
    ``forward`` (the model's own) runs on ``CHECK_TOKENS`` tokens with the decoder returning random hidden states
    (`decoder_of`: not run) and ``lm_head`` replaced by a float32 linear layer of ``CHECK_ROWS`` rows (bias when
    lm_head has one), whose logits span 0.1 to 30 so that a scale or a cap shows; the model's logits must be
    ``softcap(scale * (x @ W^T + b))`` of what that layer got (float32, `CHECK_RTOL`). Independent of the real
    weights' values, dtype, device (meta too) and sharding.
    Raises TypeError, naming ``caller``, when the model's code computes something else or cannot be run this way."""
    head = describe_head(causal_lm)
    lm_head = causal_lm.get_output_embeddings()
    hidden_size = lm_head.weight.shape[-1]
    generator = torch.Generator().manual_seed(0)
    decoder_hidden = torch.randn(1, CHECK_TOKENS, hidden_size, generator=generator)
    magnitudes = torch.logspace(-1, math.log10(30.0), CHECK_ROWS)
    weight = torch.randn(CHECK_ROWS, hidden_size, generator=generator) / hidden_size**0.5 * magnitudes[:, None]
    bias = None if getattr(lm_head, "bias", None) is None else torch.randn(CHECK_ROWS, generator=generator)
    fake = _HeadCapture(lambda x: torch.nn.functional.linear(x.float(), weight.to(x.device), _to(bias, x.device)))
    decoder = decoder_of(causal_lm)
    inputs = {"input_ids": torch.zeros(1, CHECK_TOKENS, dtype=torch.long, device=_input_device(causal_lm))}
    if getattr(text_config(causal_lm), "output_router_logits", None) is not None:
        inputs["output_router_logits"] = False
    try:
        with torch.no_grad(), _lm_head_replaced(causal_lm, fake):
            with _forward_replaced(decoder, lambda *a, **k: _DecoderStubOutput(last_hidden_state=decoder_hidden)):
                logits = forward(**inputs).logits
        if len(fake.inputs) != 1:
            raise RuntimeError(f"its forward called lm_head {len(fake.inputs)} times (expected once)")
        expected = _apply_head(head, torch.nn.functional.linear(fake.inputs[0].float(), weight, bias).cpu())
        logits = logits.float().cpu()
    except Exception as error:  # noqa: BLE001 (any failure means: not checked, so not supported)
        raise TypeError(f"{_cannot_patch(causal_lm, caller)}: its head could not be checked: {error!r}") from error
    if logits.shape != expected.shape or not torch.allclose(logits, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
        difference = (logits - expected).abs().max().item() if logits.shape == expected.shape else "shape"
        raise TypeError(
            f"{_cannot_patch(causal_lm, caller)}: its forward does not compute logits = softcap(scale * (hidden @ "
            f"W^T + b)) with scale={head.scale} and softcap={head.softcap} as read from its config (largest "
            f"difference {difference}); mrloss would compute a different loss than the model's own"
        )
    return head if softcap_override is None else dataclasses.replace(head, softcap=softcap_override)


def _to(tensor, device):
    return None if tensor is None else tensor.to(device)


def _input_device(causal_lm) -> torch.device:
    weight = getattr(causal_lm.get_input_embeddings(), "weight", None)
    return torch.device("cpu") if weight is None or weight.device.type == "meta" else weight.device


def _apply_head(head: Head, logits: torch.Tensor) -> torch.Tensor:
    if head.scale is not None:
        logits = logits * head.scale
    return logits if head.softcap is None else head.softcap * torch.tanh(logits / head.softcap)


def _cannot_patch(causal_lm, caller: str) -> str:
    model_type = getattr(getattr(causal_lm, "config", None), "model_type", None)
    return f"{caller}: cannot patch {type(causal_lm).__name__} (model_type {model_type!r})"


def router_aux_coefficient(causal_lm, *, caller: str) -> float:
    """The coefficient the forward of a MoE ``causal_lm`` puts on its ``aux_loss`` when it has labels
    (`ROUTER_AUX_COEFFICIENTS`); TypeError, naming ``caller``, when it has none of them."""
    owners = {"model": causal_lm, "text": text_config(causal_lm)}
    for owner, name in ROUTER_AUX_COEFFICIENTS:
        value = getattr(owners[owner], name, None)
        if value is not None:
            return float(value)
    raise TypeError(
        f"{_cannot_patch(causal_lm, caller)}: its forward returns a router aux_loss but mrloss finds no coefficient "
        f"for it (looked for {ROUTER_AUX_COEFFICIENTS})"
    )
