"""backend="auto": a Triton kernel that fails to compile or launch falls back to the PyTorch backend on
the same device with one warning; backend="triton" raises. (The kernels run interpreted here, and
"auto" is pointed at Triton as it is on a CUDA tensor.)"""

import warnings

import pytest
import torch
from helpers import loss_and_grads, make_inputs
from triton.runtime.errors import OutOfResources

import mrloss.ops.api as loss_module
import mrloss.ops.backends.triton.cross_entropy_rows as rows_module
import mrloss.ops.backends.triton.linear_cross_entropy_forward as forward_module
import mrloss.ops.triton_fallback as fallback_module
from mrloss import linear_cross_entropy

INPUTS = make_inputs((3, 7), bias=False, hidden_size=16, vocab=37)


def _out_of_resources(*args, **kwargs):
    raise OutOfResources(300000, 232448, "shared memory")


@pytest.fixture
def broken_triton(monkeypatch):
    monkeypatch.setattr(loss_module, "_auto_backend", lambda hidden: "triton")
    monkeypatch.setattr(fallback_module, "_failed", {})
    monkeypatch.setattr(rows_module, "cross_entropy_rows", _out_of_resources)
    monkeypatch.setattr(forward_module, "linear_cross_entropy_forward", _out_of_resources)


def _loss_and_grads(backend):
    """[loss, grad hidden, grad weight] of ``INPUTS`` (no bias) on ``backend``."""
    return loss_and_grads(linear_cross_entropy, INPUTS, dict(backend=backend))[:3]


def test_auto_falls_back_to_torch_with_one_warning(broken_triton):
    with pytest.warns(RuntimeWarning, match=r"cross_entropy_rows failed on cpu \(OutOfResources.*shared memory"):
        loss, grad_hidden, grad_weight = _loss_and_grads("auto")
    expected = _loss_and_grads("torch")
    assert torch.equal(loss, expected[0])
    assert torch.equal(grad_hidden, expected[1]) and torch.equal(grad_weight, expected[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second step is silent
        _loss_and_grads("auto")


def test_auto_falls_back_for_the_fused_loss_only_forward(broken_triton):
    hidden, weight, targets, token_weights = (INPUTS[name] for name in ("hidden", "weight", "targets", "token_weights"))
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="linear_cross_entropy_forward failed"):
        loss = linear_cross_entropy(hidden, weight, targets, token_weights)
    expected = linear_cross_entropy(hidden.detach(), weight.detach(), targets, token_weights, backend="torch")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # warned once; the fallback fills the token metrics too
        output = linear_cross_entropy(hidden, weight, targets, token_weights, return_token_metrics=True)
    loss, metrics = output.loss, output.token_metrics
    expected_metrics = linear_cross_entropy(
        hidden.detach(), weight.detach(), targets, token_weights, backend="torch", return_token_metrics=True
    ).token_metrics
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(metrics.accuracy, expected_metrics.accuracy)
    torch.testing.assert_close(metrics.entropy, expected_metrics.entropy, rtol=1e-6, atol=1e-6)


def test_explicit_triton_backend_raises(broken_triton):
    with pytest.raises(OutOfResources):
        _loss_and_grads("triton")
