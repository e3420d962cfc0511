"""What a model's own forward hands its ``lm_head``, reached through that forward itself: the one way both
integrations (`mrloss.integrations.patch`, `mrloss.integrations.verl.engine`) get the last hidden state, whatever the
model calls its decoder (``.model``, ``.transformer``, Llama-4 text's ``.model`` under ``base_model_prefix``
"language_model", a vision-language model's vision tower + language model) and whatever it does to the decoder's
output before the head.

- `head_input`: the model's own forward with ``lm_head`` swapped for a capture that returns ``[..., 1]`` zeros
  instead of ``[..., V]`` logits (so no logits are built); the model's own outputs come back with what the head got.
- `check_head`: the model's own code (logits and loss) against its `mrloss.integrations.heads.Head` description,
  when it is patched.
- `router_aux_coefficient`: the factor the model's own forward puts on its ``aux_loss`` (MoE).
Imports no transformers: it works on any ``torch.nn.Module`` with ``get_output_embeddings``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from typing import Callable

import torch

from mrloss.integrations.heads import Head, describe_head, text_config
from mrloss.ops.normalization import IGNORE_INDEX

CHECK_TOKENS, CHECK_ROWS = 4, 8  # the self-check's sequence length and fake lm_head rows
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5  # float32 logits of the fake head, |logits| in [0.1, 30]
# (owner, attribute) of the coefficient a MoE forward puts on its aux_loss, first found wins
ROUTER_AUX_COEFFICIENTS = (
    ("model", "router_aux_loss_coef"),
    ("model", "aux_loss_coef"),
    ("text", "router_aux_loss_coef"),
)


class _HeadCapture(torch.nn.Module):
    """Stands in for ``lm_head``: records each input [..., H], returns ``head(input)``; ``weight`` and ``bias`` read
    as given (some forwards cast the hidden state to ``lm_head.weight.dtype``), not registered as parameters;
    ``out_features``: the width of the logits the model expects (some forwards pass it to their loss)."""

    def __init__(self, head: Callable, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int):
        super().__init__()
        self.head, self.inputs, self._tensors = head, [], (weight, bias)
        self.in_features, self.out_features = weight.shape[-1], out_features

    @property
    def weight(self) -> torch.Tensor:
        return self._tensors[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self._tensors[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.inputs.append(hidden)
        return self.head(hidden)


def _no_logits(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_zeros(*hidden.shape[:-1], 1)


# causal LM -> the submodule path of its output embeddings (found once per model; checked on every use, so that a
# head replaced later, e.g. wrapped by PEFT after apply_mrloss, is found again)
_LM_HEAD_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lm_head_path(causal_lm, lm_head: torch.nn.Module) -> str:
    """The submodule path of ``lm_head`` in ``causal_lm``: the remembered one while it still leads to ``lm_head``,
    else found by walking ``named_modules()`` (and remembered). TypeError when it is not a submodule."""
    path = _LM_HEAD_PATHS.get(causal_lm)
    if path is None or _submodule(causal_lm, path) is not lm_head:
        path = next((name for name, module in causal_lm.named_modules() if module is lm_head), None)
        if not path:
            raise TypeError(f"{type(causal_lm).__name__}: its output embeddings are not one of its submodules")
        _LM_HEAD_PATHS[causal_lm] = path
    return path


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


@contextlib.contextmanager
def _lm_head_replaced(causal_lm, replacement: torch.nn.Module):
    """``causal_lm``'s output embedding module replaced by ``replacement`` (set on its parent module) inside."""
    lm_head = causal_lm.get_output_embeddings()
    parent_path, _, name = _lm_head_path(causal_lm, lm_head).rpartition(".")
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
    lm_head = causal_lm.get_output_embeddings()
    capture = _HeadCapture(_no_logits, lm_head.weight, getattr(lm_head, "bias", None), _logits_width(causal_lm))
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


class _HeadProbe:
    """What `check_head` runs the model's own forward with: random decoder output ``[1, CHECK_TOKENS, hidden]``, a
    float32 fake lm_head (``CHECK_ROWS`` random rows, bias when lm_head has one, |logits| from 0.1 to 30 so that a
    scale or a cap shows, repeated over the real vocabulary width so that the model's own loss code runs) and
    random labels (one ignored)."""

    def __init__(self, causal_lm):
        lm_head = causal_lm.get_output_embeddings()
        vocab, in_features = _logits_width(causal_lm), lm_head.weight.shape[-1]
        config = text_config(causal_lm)
        generator = torch.Generator().manual_seed(0)
        hidden_size = getattr(config, "hidden_size", None) or in_features
        self.decoder_hidden = torch.randn(1, CHECK_TOKENS, hidden_size, generator=generator)
        magnitudes = torch.logspace(-1, math.log10(30.0), CHECK_ROWS)
        self.weight = torch.randn(CHECK_ROWS, in_features, generator=generator) / in_features**0.5 * magnitudes[:, None]
        self.bias = None if getattr(lm_head, "bias", None) is None else torch.randn(CHECK_ROWS, generator=generator)
        self.columns = torch.arange(vocab) % CHECK_ROWS
        self.labels = torch.randint(0, vocab, (1, CHECK_TOKENS), generator=generator)
        self.labels[0, 1] = IGNORE_INDEX
        self.capture = _HeadCapture(self.head, self.weight, self.bias, vocab)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x.float(), self.weight.to(x.device), _to(self.bias, x.device))
        return logits[..., self.columns.to(x.device)]

    def run(self, causal_lm, forward: Callable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's own (logits, loss) on the probe (float32, CPU)."""
        device = _input_device(causal_lm)
        inputs = {"input_ids": torch.zeros_like(self.labels, device=device), "labels": self.labels.to(device)}
        if getattr(text_config(causal_lm), "output_router_logits", None) is not None:
            inputs["output_router_logits"] = False
        stub = _DecoderStubOutput(last_hidden_state=self.decoder_hidden.to(device))
        with torch.no_grad(), _lm_head_replaced(causal_lm, self.capture):
            with _forward_replaced(decoder_of(causal_lm), lambda *args, **kwargs: stub):
                outputs = forward(**inputs)
        if len(self.capture.inputs) != 1:
            raise RuntimeError(f"its forward called lm_head {len(self.capture.inputs)} times (expected once)")
        loss = None if outputs.loss is None else outputs.loss.float().cpu()
        return outputs.logits.float().cpu(), loss

    def expected(self, head: Head) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) as the description says: the mean cross-entropy of the shifted labels."""
        logits = _apply_head(head, self.head(self.capture.inputs[0].float().cpu()))
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], self.labels[0, 1:], ignore_index=IGNORE_INDEX)
        return logits, loss


def check_head(causal_lm, forward: Callable, softcap_override: float | None = None, *, caller: str) -> Head:
    """`describe_head` of ``causal_lm``, checked (``softcap_override``, when not None, then replaces its cap):
    ``forward`` (the model's own) runs on a `_HeadProbe` (the decoder, `decoder_of`, is not run; lm_head is a fake)
    and must give the logits ``softcap(scale * (x @ W^T + b))`` of what the fake head got and, as its loss of the
    labels, their mean cross-entropy shifted by one (float32, `CHECK_RTOL`). Independent of the real weights'
    values, dtype, device (meta too) and sharding.
    Raises TypeError, naming ``caller``, when the model's code computes something else or cannot be run this way."""
    head = describe_head(causal_lm)
    probe = _HeadProbe(causal_lm)
    try:
        with _without_autocast():  # float32 throughout, also when patched inside an autocast region
            logits, loss = probe.run(causal_lm, forward)
            expected_logits, expected_loss = probe.expected(head)
    except Exception as error:  # noqa: BLE001 (any failure means: not checked, so not supported)
        raise TypeError(f"{_cannot_patch(causal_lm, caller)}: its head could not be checked: {error!r}") from error
    if not _close(logits, expected_logits):
        raise TypeError(
            f"{_cannot_patch(causal_lm, caller)}: its forward does not compute logits = softcap(scale * (hidden @ "
            f"W^T + b)) with scale={head.scale} and softcap={head.softcap} as read from its config; mrloss would "
            "compute a different loss than the model's own"
        )
    if loss is None or not _close(loss, expected_loss):
        raise TypeError(
            f"{_cannot_patch(causal_lm, caller)}: its own loss of labels is not the mean cross-entropy of the labels "
            f"shifted by one (got {loss}, expected {float(expected_loss):.6g}); mrloss would compute another loss"
        )
    return head if softcap_override is None else dataclasses.replace(head, softcap=softcap_override)


@contextlib.contextmanager
def _without_autocast():
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL)


def _logits_width(causal_lm) -> int:
    """The vocabulary width of the model's logits: its text config's ``vocab_size`` (an lm_head sharded by
    transformers' ``tp_plan`` holds a slice of the rows), else lm_head's rows."""
    return getattr(text_config(causal_lm), "vocab_size", None) or causal_lm.get_output_embeddings().weight.shape[0]


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
