"""GPU checks at scale (issue #11): the Triton training path against a float64 reference, the HF patch on
CUDA with the default backend, autocast (bf16/fp16) against casting by hand (issue #13), and the peak memory of
the loss. Every test needs CUDA and skips without it.

Tolerances: fp32 (TF32 off): loss, gradients within 1e-5 of the float64 values (max error relative to the
largest reference entry). bf16: the relative error (L2) of each output against float64 is at most 1.25x
that of plain PyTorch in bf16 (materialized logits, F.cross_entropy), plus a sixteenth of bf16's epsilon,
as in tests/test_loss.py. Memory: peak extra below half of the [N, V] bf16 logits.
"""

import pytest
import torch
from tiny_models import tiny_causal_lm

import mrloss
from mrloss.ops.reference import reference_linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOKENS, HIDDEN, VOCAB = 4099, 1031, 50257


def make_inputs(dtype, bias, tokens=TOKENS, hidden_size=HIDDEN, vocab=VOCAB, seed=0):
    """hidden [N, H], weight [V, H], bias [V] | None in ``dtype`` on CUDA; targets [N] (10% -100);
    token_weights [N] fp32 in [0, 2) with 40% zeros. Logits have std about 3."""
    generator = torch.Generator("cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda")

    targets = torch.randint(0, vocab, (tokens,), generator=generator, device="cuda")
    targets[torch.rand(tokens, generator=generator, device="cuda") < 0.1] = -100
    token_weights = torch.rand(tokens, generator=generator, device="cuda") * 2
    token_weights[torch.rand(tokens, generator=generator, device="cuda") < 0.4] = 0.0
    return {
        "hidden": randn(tokens, hidden_size).to(dtype),
        "weight": (randn(vocab, hidden_size) * 3 / hidden_size**0.5).to(dtype),
        "bias": randn(vocab).to(dtype) if bias else None,
        "targets": targets,
        "token_weights": token_weights,
    }


def loss_and_grads(fn, inputs, options, compute_dtype=None):
    """[loss, grad hidden, grad weight, grad bias (None without bias)]; inputs cast to compute_dtype first.
    reduction "none" is back-propagated with a non-uniform upstream gradient in [-0.5, 1.5)."""
    leaves = {
        name: inputs[name].detach().to(compute_dtype or inputs[name].dtype).requires_grad_()
        for name in ("hidden", "weight", "bias")
        if inputs[name] is not None
    }
    loss = fn(
        leaves["hidden"],
        leaves["weight"],
        inputs["targets"],
        inputs["token_weights"],
        bias=leaves.get("bias"),
        **options,
    )
    generator = torch.Generator("cuda").manual_seed(1)
    upstream = (torch.rand(loss.shape, generator=generator, device="cuda") * 2 - 0.5).to(loss.dtype)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), upstream)))
    return [loss.detach()] + [grads.get(name) for name in ("hidden", "weight", "bias")]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_training_path_matches_float64_reference(dtype, reduction, softcap, bias, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    inputs = make_inputs(dtype, bias)
    options = {"reduction": reduction, "softcap": softcap}
    ours = loss_and_grads(mrloss.linear_cross_entropy, inputs, dict(options, backend="triton"))
    exact = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute_dtype=torch.float64)
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    if dtype == torch.float32:
        for name, actual, expected in zip(names, ours, exact):
            if expected is not None:
                error = (actual.double() - expected).abs().max().item()
                assert error <= 1e-5 * expected.abs().max().item(), f"{name}: max error {error:.3g}"
        return
    plain = loss_and_grads(reference_linear_cross_entropy, inputs, dict(options, compute_dtype=None))
    for name, actual, plain_value, expected in zip(names, ours, plain, exact):
        if expected is not None:
            assert actual.dtype == (torch.float32 if name == "loss" else dtype), name
            bound = 1.25 * relative_error(plain_value, expected) + torch.finfo(dtype).eps / 16
            assert relative_error(actual, expected) <= bound, name


def test_hf_patch_on_cuda_with_the_default_backend(monkeypatch):
    """A tiny Llama from a transformers config, patched by apply_mrloss (backend "auto": Triton on CUDA):
    loss and gradients match the model's own logits + a float64 weighted CE (rtol 1e-4: fp32, TF32 off)."""
    from mrloss.integrations.hf import apply_mrloss

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    vocab = 1031
    model = tiny_causal_lm(
        vocab,
        hidden_size=64,
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ).cuda()
    generator = torch.Generator("cuda").manual_seed(2)
    input_ids = torch.randint(3, vocab, (3, 57), generator=generator, device="cuda")
    token_weights = torch.rand(3, 57, generator=generator, device="cuda") * 2
    token_weights[torch.rand(3, 57, generator=generator, device="cuda") < 0.3] = 0.0
    labels = torch.where(token_weights > 0, input_ids, -100)
    logits = model(input_ids=input_ids).logits
    expected = reference_linear_cross_entropy(
        logits, torch.eye(vocab, dtype=torch.float64, device="cuda"), labels, token_weights, shift=True
    )
    params = [p for p in model.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected, params)

    out = apply_mrloss(model)(input_ids=input_ids, labels=labels, token_weights=token_weights)
    assert out.logits is None and out.loss.device.type == "cuda"
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(out.loss, params), expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast_gives_the_hand_cast_loss_and_gradients(dtype, reduction):
    """Issue #13: under ``torch.autocast("cuda", dtype)`` float32 hidden/weight/bias run the loss (backend auto:
    Triton) in ``dtype``, as F.linear would, with the loss and gradients of casting by hand (within one rounding
    of ``dtype``); the gradients come back in float32."""
    inputs = make_inputs(torch.float32, bias=True, tokens=1031, hidden_size=257, vocab=4099)

    def cast_by_hand(hidden, weight, targets, token_weights, bias=None, **options):
        return mrloss.linear_cross_entropy(
            hidden.to(dtype), weight.to(dtype), targets, token_weights, bias=bias.to(dtype), **options
        )

    with torch.autocast("cuda", dtype=dtype):
        autocast = loss_and_grads(mrloss.linear_cross_entropy, inputs, {"reduction": reduction})
    by_hand = loss_and_grads(cast_by_hand, inputs, {"reduction": reduction})
    for got, expected in zip(autocast, by_hand):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_peak_memory_holds_no_full_logits():
    """bf16 N=8192, H=1024, V=128256: the peak memory of forward + backward, beyond the inputs and the
    gradients, stays below half of the [N, V] bf16 logits (2 GiB): room for chunks and an fp32 weight-gradient
    accumulator [V, H] (0.5 GiB), none for the logits."""
    tokens, vocab = 8192, 128256
    inputs = make_inputs(torch.bfloat16, bias=False, tokens=tokens, hidden_size=1024, vocab=vocab)
    hidden, weight = (inputs[name].requires_grad_() for name in ("hidden", "weight"))
    gradient_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = mrloss.linear_cross_entropy(hidden, weight, inputs["targets"], inputs["token_weights"])
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - gradient_bytes
    assert extra < tokens * vocab * 2 / 2, f"peak extra {extra / 2**20:.0f} MiB"
    assert hidden.grad.isfinite().all() and weight.grad.isfinite().all()
