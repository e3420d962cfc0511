"""mrloss.linear_cross_entropy (both backends) against the float64 reference, plus its edge cases: validation,
autocast, extreme weight scales, unsigned targets.

The Triton backend runs through the interpreter here (TRITON_INTERPRET=1, set by conftest.py), so the
shapes stay small and odd. GPU tests at the end use larger shapes and skip without CUDA: the Triton training
path at scale against float64, CUDA autocast against casting by hand, the peak memory of the loss.
"""

import contextlib

import pytest
import torch
from helpers import (
    BACKENDS,
    GRADIENT_NAMES,
    MEMORY_MODES,
    assert_matches,
    cast_by_hand,
    loss_and_grads,
    make_inputs,
    memory_option,
    relative_error,
)

import mrloss.ops.backends.torch
from mrloss import LinearCrossEntropyLoss, LossOutput, linear_cross_entropy
from mrloss.ops.normalization import shift_targets, valid_weight_sum
from mrloss.ops.reference import reference_linear_cross_entropy

# (shape, bias, options): every reduction, normalizer (float and 0-dim tensor), softcap, label
# smoothing, shift on [B, T, H] input, with and without bias and token weights.
CASES = {
    "mean-bias": ((37,), True, dict()),
    "sum-softcap-smoothing": ((37,), False, dict(reduction="sum", softcap=4.0, label_smoothing=0.1)),
    "none-shift": ((3, 13), True, dict(reduction="none", shift=True, label_smoothing=0.05)),
    "normalizer-shift-softcap": ((3, 13), False, dict(normalizer=17.5, shift=True, softcap=3.0)),
    "tensor-normalizer-sum": ((37,), True, dict(reduction="sum", normalizer=torch.tensor(9.25))),
    "mean-no-token-weights": ((37,), True, dict(token_weights=None)),
    "mean-zloss-softcap-smoothing": ((37,), True, dict(z_loss_scale=0.01, softcap=4.0, label_smoothing=0.1)),
    "none-zloss-shift": ((3, 13), False, dict(reduction="none", shift=True, z_loss_scale=0.05)),
}
MEMORY = MEMORY_MODES


def case_inputs(case, dtype=torch.float32):
    shape, bias, options = CASES[case]
    inputs = make_inputs(shape, dtype, bias=bias)
    options = dict(options)
    if "token_weights" in options:
        inputs["token_weights"] = options.pop("token_weights")
    return inputs, options


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_float64_reference(backend, case, memory, monkeypatch):
    inputs, options = case_inputs(case)
    ours = loss_and_grads(
        linear_cross_entropy, inputs, dict(options, backend=backend, **memory_option(memory, monkeypatch))
    )
    expected = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute=torch.float64)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == ours[2].dtype == torch.float32
    assert_matches(ours, expected, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,case",
    [
        (torch.bfloat16, "mean-bias"),
        (torch.bfloat16, "none-shift"),
        (torch.bfloat16, "sum-softcap-smoothing"),
        (torch.float16, "normalizer-shift-softcap"),
        (torch.bfloat16, "mean-zloss-softcap-smoothing"),
    ],
)
@pytest.mark.parametrize("memory", MEMORY)
def test_half_precision_no_worse_than_plain_pytorch(backend, dtype, case, memory, monkeypatch):
    """Our error against float64 is at most that of plain PyTorch run in the same dtype (x1.25, plus a
    sixteenth of the dtype's epsilon for results where plain PyTorch happens to round luckily)."""
    inputs, options = case_inputs(case, dtype)
    ours = loss_and_grads(
        linear_cross_entropy, inputs, dict(options, backend=backend, **memory_option(memory, monkeypatch))
    )
    plain = loss_and_grads(reference_linear_cross_entropy, inputs, dict(options, compute_dtype=None))
    exact = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute=torch.float64)
    assert [g.dtype for g in ours[1:] if g is not None] == [dtype] * (3 if inputs["bias"] is not None else 2)
    floor = torch.finfo(dtype).eps / 16
    for name, a, p, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), ours, plain, exact):
        if e is not None:
            assert relative_error(a, e) <= 1.25 * relative_error(p, e) + floor, name


def test_float64_gradcheck_torch_backend():
    """gradcheck needs several backward passes through one graph: reduction "none" (recomputed in
    backward) takes it; the reduced losses (gradients built in the forward, one backward per forward)
    are held to the float64 reference's autograd gradients instead."""
    inputs = make_inputs((2, 5), torch.float64, hidden_size=4, vocab=7)
    options = dict(reduction="none", shift=True, softcap=2.0, label_smoothing=0.2)

    def fn(hidden, weight, bias):
        return linear_cross_entropy(
            hidden,
            weight,
            inputs["targets"],
            inputs["token_weights"],
            bias=bias,
            backend="torch",
            chunk_size=3,
            **options,
        )

    leaves = [inputs[n].clone().requires_grad_() for n in ("hidden", "weight", "bias")]
    assert torch.autograd.gradcheck(fn, leaves)
    options = dict(reduction="mean", label_smoothing=0.1, softcap=2.0)
    ours = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend="torch", chunk_size=3))
    assert_matches(ours, loss_and_grads(reference_linear_cross_entropy, inputs, options), rtol=1e-12)


def test_float64_triton_matches_reference():
    inputs, options = case_inputs("none-shift", torch.float64)
    ours = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend="triton"))
    expected = loss_and_grads(reference_linear_cross_entropy, inputs, options)
    assert_matches(ours, expected, rtol=1e-12)


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["sum-softcap-smoothing", "none-shift", "mean-zloss-softcap-smoothing"])
def test_float64_is_exact_with_label_smoothing_softcap_and_z_loss(case, backend, memory, monkeypatch):
    """Loss and every gradient within 1e-14 (relative L2) of the float64 reference. Before: the Triton row kernel
    formed label_smoothing / vocab_size (and softcap, z_loss_scale) in float32: errors 1e-12 (loss) to 1e-10."""
    inputs, options = case_inputs(case, torch.float64)
    ours = loss_and_grads(
        linear_cross_entropy, inputs, dict(options, backend=backend, **memory_option(memory, monkeypatch))
    )
    expected = loss_and_grads(reference_linear_cross_entropy, inputs, options)
    for name, actual, exact in zip(GRADIENT_NAMES, ours, expected):
        if exact is not None:
            assert relative_error(actual, exact) <= 1e-14, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlearned_tokens_get_exactly_zero_hidden_grad(backend):
    inputs = make_inputs((3, 13))
    _, grad_hidden, _, _ = loss_and_grads(linear_cross_entropy, inputs, dict(shift=True, backend=backend))
    # with shift, row k predicts targets[..., k+1]: it is unlearned when that target is ignored / weight 0
    next_learned = (inputs["targets"][:, 1:] != -100) & (inputs["token_weights"][:, 1:] > 0)
    learned_rows = torch.cat([next_learned, torch.zeros(3, 1, dtype=torch.bool)], dim=1)
    assert (grad_hidden[~learned_rows] == 0).all()
    assert (grad_hidden[learned_rows].abs().sum(-1) > 0).all()


def test_only_learned_tokens_reach_the_matmul(monkeypatch):
    inputs = make_inputs((37,))
    seen_rows = []
    row_op = mrloss.ops.backends.torch.cross_entropy_rows

    def recording_row_op(logits, *args, **kwargs):
        seen_rows.append(logits.shape[0])
        return row_op(logits, *args, **kwargs)

    monkeypatch.setattr(mrloss.ops.backends.torch, "cross_entropy_rows", recording_row_op)
    loss_and_grads(linear_cross_entropy, inputs, dict(backend="torch", chunk_size=5))
    learned = ((inputs["targets"] != -100) & (inputs["token_weights"] > 0)).sum().item()
    assert sum(seen_rows) == learned < 37
    assert max(seen_rows) == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(reduction="sum"), dict(reduction="none"), dict(normalizer=4.0), dict(normalizer=torch.tensor(0.0))],
)
def test_nothing_to_learn_gives_zero_loss_and_zero_grads(backend, options):
    inputs = make_inputs((2, 7))
    inputs["token_weights"] = torch.zeros(2, 7)
    loss, *grads = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend=backend))
    assert not loss.isnan().any() and (loss == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_positive_normalizer_gives_zero(backend):
    """0 (a global batch with nothing to learn), and tensors <= 0 (used as given: no host sync)."""
    inputs = make_inputs((37,))
    for normalizer in (0.0, 0, torch.tensor(0.0), torch.tensor(-3.0)):
        loss, *grads = loss_and_grads(linear_cross_entropy, inputs, dict(normalizer=normalizer, backend=backend))
        assert loss.item() == 0.0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MEMORY)
def test_nan_tensor_normalizer_gives_nan_loss_and_gradients(backend, memory, monkeypatch):
    """A NaN 0-dim normalizer (used as given: no host sync) propagates as a plain division would: NaN loss, NaN
    gradients of the learned rows and of the head. Before: loss 0 and zero gradients (training did nothing)."""
    inputs = make_inputs((37,))
    normalizer = torch.tensor(float("nan"))
    loss, grad_hidden, grad_weight, grad_bias = loss_and_grads(
        linear_cross_entropy, inputs, dict(normalizer=normalizer, backend=backend, **memory_option(memory, monkeypatch))
    )
    learned = (inputs["targets"] != -100) & (inputs["token_weights"] > 0)
    assert loss.isnan()
    assert grad_hidden[learned].isnan().all() and (grad_hidden[~learned] == 0).all()
    assert grad_weight.isnan().all() and grad_bias.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalized", [False, True], ids=["mean", "tensor-normalizer"])
def test_tiny_float64_weights_with_float32_hidden(backend, normalized):
    """float64 token weights of 1e-300 (0 in float32) next to float32 hidden give the loss and gradients of the
    same weights at scale 1: they are scaled by their maximum in float64 before the cast. Before: loss 0."""
    inputs = make_inputs((37,))
    weights = inputs["token_weights"].double()
    results = []
    for scale in (1.0, 1e-300):
        scaled = weights * scale
        options = dict(backend=backend, normalizer=scaled.sum() * 1.5) if normalized else dict(backend=backend)
        results.append(loss_and_grads(linear_cross_entropy, inputs | {"token_weights": scaled}, options))
    assert results[0][0] > 0
    assert_matches(results[1], [r.double() for r in results[0]], rtol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        dict(memory="low"),
        dict(reduction="none", shift=True),
        dict(memory="low", softcap=3.0, label_smoothing=0.1, z_loss_scale=0.01, normalizer=9.5),
    ],
)
def test_double_backward_gradient_penalty_matches_pytorch(options):
    """create_graph=True (a gradient penalty loss + 10·‖∂loss/∂h‖²): the backward of memory="low" and reduction
    "none" recomputes its gradients differentiably, so h.grad and weight.grad are PyTorch's (F.linear +
    F.cross_entropy in float64). Before: the second-order term silently missing (‖h.grad‖ 1.41 against 7.11)."""
    inputs = make_inputs((3, 13), torch.float64, hidden_size=8, vocab=29)
    targets, token_weights = inputs["targets"], inputs["token_weights"].double()
    shift = options.get("shift", False)
    shifted_targets, shifted_weights = shift_targets(targets, token_weights) if shift else (targets, token_weights)

    def pytorch(hidden, weight, bias):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        if "softcap" in options:
            logits = options["softcap"] * torch.tanh(logits / options["softcap"])
        learned = (shifted_targets != -100) & (shifted_weights > 0)
        logits, learned_weights = logits[learned], shifted_weights[learned]
        token_loss = torch.nn.functional.cross_entropy(
            logits, shifted_targets[learned], reduction="none", label_smoothing=options.get("label_smoothing", 0.0)
        )
        token_loss = token_loss + options.get("z_loss_scale", 0.0) * torch.logsumexp(logits, -1).square()
        return (learned_weights * token_loss).sum() / options.get("normalizer", 1.0 if shift else learned_weights.sum())

    def ours(hidden, weight, bias):
        loss = linear_cross_entropy(hidden, weight, targets, token_weights, bias=bias, backend="torch", **options)
        return loss.sum()

    grads = []
    for loss_fn in (pytorch, ours):
        leaves = [inputs[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
        loss = loss_fn(*leaves)
        (grad_hidden,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
        (loss + 10 * grad_hidden.square().sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(*grads):
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_double_backward_of_fast_reduced_loss_is_refused():
    """memory="fast" with reduction "mean"/"sum" builds its gradients in the forward pass, not differentiably: a
    create_graph backward raises and says what to use, instead of gradients without the second-order term."""
    inputs = make_inputs((37,))
    hidden = inputs["hidden"].clone().requires_grad_()
    loss = linear_cross_entropy(hidden, inputs["weight"], inputs["targets"], inputs["token_weights"])
    with pytest.raises(RuntimeError, match=r'double backward.*memory="fast".*pass memory="low"'):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize(
    "normalizer", [torch.tensor(13.5), torch.tensor(13.5, dtype=torch.float64), torch.tensor(27, dtype=torch.int64)]
)
def test_zero_dim_tensor_normalizer_equals_float(normalizer):
    inputs = make_inputs((37,))
    expected = loss_and_grads(linear_cross_entropy, inputs, dict(normalizer=float(normalizer)))
    ours = loss_and_grads(linear_cross_entropy, inputs, dict(normalizer=normalizer))
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_module_takes_the_normalizer_per_call():
    inputs = make_inputs((3, 13))
    module = LinearCrossEntropyLoss(shift=True, normalizer=5.0)
    args = (inputs["hidden"], inputs["weight"], inputs["targets"], inputs["token_weights"], inputs["bias"])
    for normalizer in (None, 11.0, torch.tensor(7.25)):
        expected = linear_cross_entropy(
            *args[:4], bias=args[4], shift=True, normalizer=5.0 if normalizer is None else normalizer
        )
        assert torch.equal(module(*args, normalizer=normalizer), expected)


@contextlib.contextmanager
def saved_for_backward():
    """A list of the tensors autograd saves for backward inside the block."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        yield saved


@pytest.mark.parametrize("path", ["deferred", "buffered"])
def test_backward_scales_without_host_sync(path, monkeypatch):
    """A non-unit upstream gradient (DDP, sequence parallelism) scales the gradients built in the forward pass with
    no device -> host sync in backward, and the values are the upstream times those at upstream 1. Buffered (more
    learned rows than ``defers_weight_grad`` allows): the weight gradient IS the saved float32 [V, H] buffer, scaled
    in place. Deferred: no [V, H] tensor is saved, only the [M, V] logit gradients; the weight gradient is made in
    backward (the upstream folded into the hidden rows: bitwise the scaled gradient for a power of two)."""
    if path == "buffered":
        memory_option("fast-buffered", monkeypatch)
    inputs = make_inputs((37,))
    hidden, weight, bias = (inputs[name].clone().requires_grad_() for name in ("hidden", "weight", "bias"))
    learned_rows = int(((inputs["targets"] != -100) & (inputs["token_weights"] > 0)).sum())
    at_one = torch.autograd.grad(
        linear_cross_entropy(hidden, weight, inputs["targets"], inputs["token_weights"], bias=bias),
        (hidden, weight, bias),
    )
    for upstream in (torch.tensor(1 / 3), torch.tensor(0.25)):
        with saved_for_backward() as saved:
            loss = linear_cross_entropy(hidden, weight, inputs["targets"], inputs["token_weights"], bias=bias)

        def no_sync(*args):
            raise AssertionError("device -> host sync in backward")

        with monkeypatch.context() as patch:
            for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
                patch.setattr(torch.Tensor, name, no_sync)
            grads = torch.autograd.grad(loss, (hidden, weight, bias), upstream)
        buffers = [t for t in saved if t.shape == weight.shape]
        if path == "buffered":
            assert any(grads[1].data_ptr() == t.data_ptr() for t in buffers)
        else:
            assert not buffers and any(t.shape == (learned_rows, weight.shape[0]) for t in saved)
        exact = path == "buffered" or upstream == 0.25
        for name, grad, grad_at_one in zip(GRADIENT_NAMES[1:], grads, at_one):
            if exact or name != "grad_weight":
                assert torch.equal(grad, grad_at_one * upstream), (name, upstream)
            else:  # float32 rows times 1/3, rounded once each
                torch.testing.assert_close(grad, grad_at_one * upstream, rtol=0, atol=1e-6 * grad.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_weight_gradient_is_deferred_exactly_when_the_logit_gradients_are_no_larger(dtype, monkeypatch):
    """memory="fast" keeps the learned rows' [M, V] logit gradients instead of the [V, H] accumulation-dtype buffer
    when they take no more memory (M <= 2 H for half dtypes, M <= H otherwise), and the two paths give the same
    gradients to a few units of the dtype (the upstream gradient, not a power of two here, is folded into the hidden
    rows on one path and into the float32 sums on the other)."""
    hidden_size = 16
    limit = 2 * hidden_size if dtype in (torch.bfloat16, torch.float16) else hidden_size
    for rows in (limit, limit + 1):
        inputs = make_inputs((rows,), dtype, hidden_size=hidden_size, vocab=101, ignored_fraction=0.0)
        inputs["token_weights"] = torch.rand(rows, generator=torch.Generator().manual_seed(rows)) + 0.5
        with saved_for_backward() as saved:
            grads = loss_and_grads(linear_cross_entropy, inputs, {})
        deferred = any(t.shape == (rows, 101) for t in saved)
        assert deferred == (rows == limit) and deferred != any(t.shape == (101, hidden_size) for t in saved)
        with monkeypatch.context() as patch:
            memory_option("fast-buffered", patch)
            buffered = loss_and_grads(linear_cross_entropy, inputs, {})
        for name, ours, theirs in zip(GRADIENT_NAMES, grads, buffered):
            assert relative_error(ours, theirs) <= 4 * torch.finfo(dtype).eps, name  # a few roundings apart


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deferred_weight_gradient_accumulates_in_float32_and_rounds_once(dtype):
    """The deferred weight gradient (one matmul over all M learned rows) sums its M products in float32 and rounds
    once: within half a unit of the dtype (relative L2) of the float64 product of the same operands, at M = 3001
    where a half-precision accumulation would be ~sqrt(M) units off; the upstream gradient is folded into the
    hidden rows (a power of two: exactly)."""
    from mrloss.ops.chunked import deferred_weight_grad

    gen = torch.Generator().manual_seed(3)
    grad_logits = torch.randn(3001, 257, generator=gen).to(dtype)
    hidden = torch.randn(3100, 129, generator=gen).to(dtype)
    rows = torch.randperm(3100, generator=gen)[:3001]
    grad_weight = deferred_weight_grad(grad_logits, hidden, rows, torch.tensor(0.25))
    exact = grad_logits.double().T @ (hidden[rows].double() * 0.25)
    assert grad_weight.dtype == dtype
    assert relative_error(grad_weight, exact) <= torch.finfo(dtype).eps / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_upstream_scaling_rounds_once(dtype):
    """Half-precision hidden gradients are scaled in float32 (the upstream gradient is not rounded to
    half precision first) and rounded once; an upstream of 1 leaves them bitwise unchanged."""
    inputs = make_inputs((37,), dtype)
    hidden = inputs["hidden"].clone().requires_grad_()
    args = (inputs["weight"], inputs["targets"], inputs["token_weights"])
    (at_one,) = torch.autograd.grad(linear_cross_entropy(hidden, *args, bias=inputs["bias"]), hidden)
    for upstream in (torch.tensor(1.0), torch.tensor(1 / 3), torch.tensor(1000.0 / 7)):
        (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, *args, bias=inputs["bias"]), hidden, upstream)
        assert torch.equal(grad, (at_one.float() * upstream).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_through_the_same_graph(backend):
    """Reduced losses: the in-place scaled gradient buffers serve one backward; a second one raises
    instead of returning doubly scaled gradients. reduction "none" recomputes: any number of times."""
    inputs = make_inputs((37,))
    hidden = inputs["hidden"].clone().requires_grad_()
    args = (inputs["weight"], inputs["targets"], inputs["token_weights"])
    loss = linear_cross_entropy(hidden, *args, backend=backend)
    (first,) = torch.autograd.grad(loss * 2, hidden, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss * 2, hidden)
    (again,) = torch.autograd.grad(linear_cross_entropy(hidden, *args, backend=backend) * 2, hidden)
    assert torch.equal(first, again)
    losses = linear_cross_entropy(hidden, *args, reduction="none", backend=backend)
    grads = [torch.autograd.grad(losses.sum(), hidden, retain_graph=True)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(reduction="none", softcap=3.0), dict(reduction="mean", shift=True)])
def test_strided_inputs_match_reference(backend, options):
    """Non-contiguous views (step 2) of every input: with reduction "none" the Triton backend reads
    hidden, weight and bias through their strides in the fused forward."""
    inputs = make_inputs((3, 13))
    views = {}
    for name, value in inputs.items():  # the same values, every other element of a larger tensor
        storage = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype)
        storage[..., ::2] = value
        if name in ("hidden", "weight", "bias"):
            storage.requires_grad_()
        views[name] = storage[..., ::2]
    assert views["bias"].stride() == (2,) and not any(view.is_contiguous() for view in views.values())
    loss = linear_cross_entropy(**views, **options, backend=backend)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) * 2 - 0.5  # as loss_and_grads
    ours = [loss.detach(), *torch.autograd.grad(loss, [views[n] for n in ("hidden", "weight", "bias")], upstream)]
    expected = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute=torch.float64)
    assert_matches(ours, expected, rtol=1e-5)


def test_scalar_upstream_gradient_scales_the_gradients():
    inputs = make_inputs((37,))
    hidden = inputs["hidden"].clone().requires_grad_()
    args = (inputs["weight"], inputs["targets"], inputs["token_weights"])
    (grad_once,) = torch.autograd.grad(linear_cross_entropy(hidden, *args), hidden)
    (grad_scaled,) = torch.autograd.grad(linear_cross_entropy(hidden, *args) * 3.0, hidden)
    torch.testing.assert_close(grad_scaled, 3.0 * grad_once)


def test_no_grad_and_constant_inputs():
    inputs = make_inputs((37,))
    expected = reference_linear_cross_entropy(
        **{k: v.double() if v.is_floating_point() and k != "token_weights" else v for k, v in inputs.items()}
    )
    for context in (torch.no_grad, torch.enable_grad):
        with context():
            loss = linear_cross_entropy(**inputs)
        assert not loss.requires_grad
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def recording(monkeypatch, module, name, calls):
    """Replace ``module.name`` by a wrapper that appends ``name`` to ``calls``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize(
    "reduction,mode,calls_fused,calls_row_op",
    [
        ("mean", "no_grad", True, False),
        ("sum", "constant_inputs", True, False),
        ("none", "grad", True, True),  # fused forward, row op in the backward pass
        ("mean", "grad", False, True),  # gradients are built during the forward pass: chunks
    ],
)
def test_triton_loss_only_passes_use_the_fused_forward(monkeypatch, reduction, mode, calls_fused, calls_row_op):
    import mrloss.ops.backends.triton.cross_entropy_rows
    import mrloss.ops.backends.triton.linear_cross_entropy_forward

    calls = []
    recording(
        monkeypatch, mrloss.ops.backends.triton.linear_cross_entropy_forward, "linear_cross_entropy_forward", calls
    )
    recording(monkeypatch, mrloss.ops.backends.triton.cross_entropy_rows, "cross_entropy_rows", calls)
    inputs = make_inputs((3, 13))
    options = dict(reduction=reduction, shift=True, softcap=4.0, label_smoothing=0.1)
    expected = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute=torch.float64)
    if mode == "grad":
        ours = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend="triton"))
    else:
        if mode == "no_grad":
            inputs["hidden"].requires_grad_()
        with torch.no_grad() if mode == "no_grad" else contextlib.nullcontext():
            ours = [linear_cross_entropy(**inputs, **options, backend="triton")]
        assert not ours[0].requires_grad
    assert ("linear_cross_entropy_forward" in calls) == calls_fused
    assert ("cross_entropy_rows" in calls) == calls_row_op
    if calls_fused:
        assert calls[0] == "linear_cross_entropy_forward"  # the forward pass comes first
    assert_matches(ours, expected[: len(ours)], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(reduction="none", label_smoothing=0.1), dict(softcap=3.0)])
def test_unlearned_hidden_rows_are_never_read(backend, options):
    """Hidden rows of unlearned tokens filled with NaN change nothing, bitwise: no path reads them
    (fused forward, chunks with gradients, reduction "none" backward, loss only)."""
    inputs = make_inputs((3, 13), torch.bfloat16)
    options = dict(options, shift=True, backend=backend)
    next_learned = (inputs["targets"][:, 1:] != -100) & (inputs["token_weights"][:, 1:] > 0)
    learned_rows = torch.cat([next_learned, torch.zeros(3, 1, dtype=torch.bool)], dim=1)
    poisoned = dict(inputs, hidden=inputs["hidden"].masked_fill(~learned_rows[..., None], float("nan")))
    clean = loss_and_grads(linear_cross_entropy, inputs, options)
    dirty = loss_and_grads(linear_cross_entropy, poisoned, options)
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty) if a is not None)
    assert all(t.isfinite().all() for t in dirty if t is not None)
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(**inputs, **options), linear_cross_entropy(**poisoned, **options))


def test_module_matches_function():
    inputs = make_inputs((3, 13))
    module = LinearCrossEntropyLoss(reduction="sum", shift=True, softcap=4.0)
    assert "shift=True" in repr(module)
    expected = linear_cross_entropy(**inputs, reduction="sum", shift=True, softcap=4.0)
    assert torch.equal(
        module(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["token_weights"], inputs["bias"]), expected
    )
    with pytest.raises(TypeError, match="unknown option"):
        LinearCrossEntropyLoss(reduce="sum")


def test_loss_output_has_the_fields_asked_for_and_a_plain_tensor_otherwise():
    inputs = make_inputs((3, 13))
    options = dict(shift=True, backend="torch", z_loss_scale=0.01)
    plain = linear_cross_entropy(**inputs, **options)
    assert isinstance(plain, torch.Tensor) and plain.dim() == 0
    flags = ("return_token_losses", "return_z_loss", "return_token_metrics")
    for asked in [(flag,) for flag in flags] + [flags]:
        output = linear_cross_entropy(**inputs, **options, **dict.fromkeys(asked, True))
        assert isinstance(output, LossOutput), asked
        assert torch.equal(output.loss, plain), asked
        assert (output.token_losses is not None) == ("return_token_losses" in asked)
        assert (output.z_loss is not None) == ("return_z_loss" in asked)
        assert (output.token_metrics is not None) == ("return_token_metrics" in asked)
    assert output.token_losses.shape == output.token_metrics.accuracy.shape == inputs["targets"].shape
    assert output.z_loss.dim() == 0 and 0 < output.z_loss < output.loss
    with pytest.raises(TypeError, match="cannot unpack"):  # fields by name, not by position
        loss, token_losses = output
    module = LinearCrossEntropyLoss(shift=True, return_token_losses=True)
    assert isinstance(
        module(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["token_weights"]), LossOutput
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_loss_output_field_matches_the_reference(backend, reduction):
    """The float64 reference computes every LossOutput field too (token losses, z-loss, accuracy, entropy)."""
    inputs = make_inputs((3, 13), torch.float64, vocab=7)  # a small vocabulary: some argmaxes are the target
    options = dict(reduction=reduction, shift=True, softcap=4.0, z_loss_scale=0.05,
                   return_token_losses=True, return_z_loss=True, return_token_metrics=True)  # fmt: skip
    ours = linear_cross_entropy(**inputs, **options, backend=backend)
    expected = reference_linear_cross_entropy(**inputs, **options)
    torch.testing.assert_close(ours.loss, expected.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.z_loss, expected.z_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.token_losses.double(), expected.token_losses, rtol=1e-6, atol=1e-6)  # fp32 out
    assert torch.equal(ours.token_metrics.accuracy.double(), expected.token_metrics.accuracy)
    torch.testing.assert_close(
        ours.token_metrics.entropy.double(), expected.token_metrics.entropy, rtol=1e-6, atol=1e-6
    )
    assert expected.token_metrics.accuracy.sum() > 0 and (expected.z_loss > 0).any()


def test_auto_backend_on_cpu_is_torch_and_triton_needs_interpreter(monkeypatch):
    inputs = make_inputs((5,))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    linear_cross_entropy(**inputs)  # "auto" picks torch on the CPU
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_cross_entropy(**inputs, backend="triton")


def _bad(**changes):
    inputs = make_inputs((2, 5), hidden_size=6, vocab=11)
    inputs.update(changes)
    return inputs


VALIDATION_ERRORS = [
    (lambda: _bad(hidden=torch.randn(2, 5, 7)), ValueError, r"hidden size mismatch.*H=7.*H=6"),
    (lambda: _bad(weight=torch.randn(11)), ValueError, r"weight must have shape \[V, H\]"),
    (lambda: _bad(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"targets \(2, 4\)"),
    (lambda: _bad(token_weights=torch.ones(10)), ValueError, r"token_weights \(10,\) must match targets"),
    (lambda: _bad(bias=torch.randn(10)), ValueError, r"bias must have shape \[V\]=\(11,\)"),
    (lambda: _bad(weight=torch.randn(11, 6, dtype=torch.float64)), TypeError, r"hidden is torch.float32 but weight"),
    (lambda: _bad(bias=torch.randn(11, dtype=torch.bfloat16)), TypeError, r"but bias is torch.bfloat16"),
    (lambda: _bad(hidden=torch.randn(2, 5, 6).long()), TypeError, r"hidden must be float16"),
    (lambda: _bad(targets=torch.zeros(2, 5)), TypeError, r"targets must hold integer class ids"),
    (lambda: _bad(token_weights=torch.ones(2, 5, dtype=torch.long)), TypeError, r"token_weights must be a float"),
    (
        lambda: _bad(targets=torch.tensor([[0, 1, 2, 3, 4], [5, 11, -100, 0, 0]])),
        ValueError,
        r"targets\(1, 1\) = 11 is outside \[0, V=11\)",
    ),
    (
        lambda: _bad(targets=torch.tensor([[0, 1, -3, 3, 4], [5, 1, -100, 0, 0]])),
        ValueError,
        r"targets\(0, 2\) = -3 is outside",
    ),
    (
        lambda: _bad(token_weights=torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, -0.5, 1]])),
        ValueError,
        r"token_weights\(1, 3\) = -0.5.*finite and >= 0",
    ),
    (
        lambda: _bad(token_weights=torch.tensor([[1.0, float("nan"), 1, 1, 1], [1, 1, 1, 1, 1]])),
        ValueError,
        r"token_weights\(0, 1\) = nan",
    ),
    (
        lambda: _bad(token_weights=torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, float("inf"), 1, 1]])),
        ValueError,
        r"token_weights\(1, 2\) = inf",
    ),
    (lambda: dict(_bad(), reduction="avg"), ValueError, r"unknown reduction 'avg'"),
    (lambda: dict(_bad(), backend="cuda"), ValueError, r"unknown backend 'cuda'"),
    (lambda: dict(_bad(), reduction="none", normalizer=3.0), ValueError, r"normalizer cannot be combined"),
    (lambda: dict(_bad(), normalizer=torch.ones(2)), ValueError, r"normalizer must be a float or a 0-dim"),
    (lambda: dict(_bad(), normalizer="10"), TypeError, r"normalizer must be a float"),
    (lambda: dict(_bad(), normalizer=-3.0), ValueError, r"normalizer must be a finite number >= 0.*-3.0"),
    (lambda: dict(_bad(), normalizer=-1), ValueError, r"normalizer must be a finite number >= 0"),
    (lambda: dict(_bad(), normalizer=float("inf")), ValueError, r"normalizer must be a finite number"),
    (lambda: dict(_bad(), normalizer=float("nan")), ValueError, r"normalizer must be a finite number.*nan"),
    (lambda: dict(_bad(), shift=2), TypeError, r"shift must be a bool.*got 2"),
    (
        lambda: dict(_bad(), normalizer=torch.tensor(3.0, device="meta")),
        ValueError,
        r"hidden is on cpu but normalizer is on meta",
    ),
    (lambda: dict(_bad(), label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    (lambda: dict(_bad(), softcap=0.0), ValueError, r"softcap must be a finite float > 0"),
    (lambda: dict(_bad(), chunk_size=0), ValueError, r"chunk_size must be a positive int"),
    (lambda: dict(_bad(), hidden="x"), TypeError, r"hidden must be a torch.Tensor"),
]


@pytest.mark.parametrize("make_call,error,message", VALIDATION_ERRORS)
def test_validation_errors(make_call, error, message):
    with pytest.raises(error, match=message):
        linear_cross_entropy(**make_call())


# ---------------------------------------------------------------- the shift rule (mrloss.ops.normalization)


def test_shift_targets_prediction_alignment():
    targets = torch.tensor([[5, 6, 7, 8, 9], [1, 2, -100, 4, 3]])
    weights = torch.tensor([[0.0, 1, 2, 0, 3], [1, 2, 3, 4, 5]])
    shifted_targets, shifted_weights = shift_targets(targets, weights)
    assert shifted_targets.tolist() == [[6, 7, 8, 9, -100], [2, -100, 4, 3, -100]]
    assert shifted_weights.tolist() == [[1, 2, 0, 3, 0], [2, 3, 4, 5, 0]]
    assert shift_targets(targets)[1] is None
    assert targets[0, 0] == 5 and weights[0, 0] == 0  # inputs untouched
    # packed: no sample predicts the next sample's first token
    packed_targets, packed_weights = shift_targets(
        targets[0], weights[0], ignore_index=-1, cu_seqlens=torch.tensor([0, 3, 5])
    )
    assert packed_targets.tolist() == [6, 7, -1, 9, -1]
    assert packed_weights.tolist() == [1, 2, 0, 3, 0]
    with pytest.raises(ValueError, match="token_weights shape"):
        shift_targets(targets, weights[:, 1:])


def test_valid_weight_sum_counts_shifted_valid_weights():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 50, (3, 11), generator=gen)
    labels[torch.rand(3, 11, generator=gen) < 0.3] = -100
    weights = torch.rand(3, 11, generator=gen)
    total = valid_weight_sum(labels, weights)
    assert total.dtype == torch.float64 and total.dim() == 0
    expected = sum(float(weights[b, k]) for b in range(3) for k in range(1, 11) if labels[b, k] != -100)
    assert total.item() == pytest.approx(expected, rel=1e-12)
    assert valid_weight_sum(labels, None).item() == (labels[:, 1:] != -100).sum().item()
    # the normalizer that makes "mean" of the shifted loss equal to "sum" / normalizer
    inputs = make_inputs((3, 11), vocab=50)
    mean = linear_cross_entropy(inputs["hidden"], inputs["weight"], labels, weights, shift=True)
    summed = linear_cross_entropy(inputs["hidden"], inputs["weight"], labels, weights, shift=True, reduction="sum")
    torch.testing.assert_close(mean, summed / total.float())
    packed = valid_weight_sum(labels[0], weights[0], cu_seqlens=torch.tensor([0, 4, 11]))
    first_of_second = weights[0, 4].item() if labels[0, 4] != -100 else 0.0
    assert packed.item() == pytest.approx(valid_weight_sum(labels[0], weights[0]).item() - first_of_second)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_bf16_autocast_gives_the_hand_cast_loss_and_gradients(reduction):
    """Before: RuntimeError index_copy_(): Float and BFloat16. Now: the loss runs in bf16, as F.linear would
    under autocast, exactly as when hidden/weight/bias are cast by hand; gradients arrive in float32."""
    inputs = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_and_grads(linear_cross_entropy, inputs, dict(reduction=reduction))
    by_hand = loss_and_grads(cast_by_hand(torch.bfloat16), inputs, dict(reduction=reduction))
    for got, expected in zip(autocast, by_hand):
        assert torch.equal(got, expected)
    assert [grad.dtype for grad in autocast[1:]] == [torch.float32] * 3


@pytest.mark.parametrize("scale", [1e38, 1e-42], ids=["1e38", "1e-42"])
def test_any_positive_scale_of_all_weights_gives_the_same_loss(scale):
    """Before: weights 1e38 -> loss 0 and zero gradients (Σw overflows); 1e-42 -> inf (1/Σw overflows)."""
    inputs = dict(make_inputs(), token_weights=torch.ones(37))
    expected = loss_and_grads(linear_cross_entropy, inputs, {})
    scaled = dict(inputs, token_weights=inputs["token_weights"] * scale)
    for got, want in zip(loss_and_grads(linear_cross_entropy, scaled, {}), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_float64_weights_1e300_give_the_unit_weight_loss():
    """Before: nan (w * (1/Σw) under- and overflows in float64)."""
    inputs = dict(make_inputs(dtype=torch.float64), token_weights=torch.ones(37, dtype=torch.float64))
    expected = loss_and_grads(linear_cross_entropy, inputs, {})
    scaled = dict(inputs, token_weights=inputs["token_weights"] * 1e300)
    for got, want in zip(loss_and_grads(linear_cross_entropy, scaled, {}), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_weights_are_checked_in_the_dtype_the_loss_uses():
    """Before: float64 weights 1e300 with float32 hidden passed the finite check, then became inf -> nan."""
    inputs = make_inputs()
    huge = torch.full(inputs["targets"].shape, 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"token_weights\(0,\) = 1e\+300.*finite in torch.float32"):
        linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], huge)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32])
def test_unsigned_targets_are_a_type_error(dtype):
    """Before: uint8 targets wrapped -100 to 156, a valid class, silently learned as ignored."""
    inputs = make_inputs(vocab=200)
    targets = inputs["targets"].clamp_min(0).to(dtype)
    with pytest.raises(TypeError, match="signed dtype"):
        linear_cross_entropy(inputs["hidden"], inputs["weight"], targets, inputs["token_weights"])


# ---------------------------------------------------------------- GPU (skip cleanly without CUDA)


@pytest.mark.gpu
def test_gpu_cpu_scalar_normalizer_with_cuda_inputs():
    """A 0-dim CPU tensor normalizer is accepted with CUDA inputs, like torch's CPU scalars."""
    inputs = make_inputs((37,), device="cuda")
    expected = loss_and_grads(linear_cross_entropy, inputs, dict(normalizer=13.5))
    ours = loss_and_grads(linear_cross_entropy, inputs, dict(normalizer=torch.tensor(13.5)))
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(reduction="none", shift=True, softcap=30.0, label_smoothing=0.1)])
def test_gpu_triton_matches_reference_at_scale(dtype, options):
    inputs = make_inputs((4, 1000), dtype, hidden_size=512, vocab=32003, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend="triton"))
    torch_backend = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend="torch"))
    exact = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute=torch.float64)
    if dtype == torch.float32:
        assert_matches(ours, exact, rtol=1e-5)
        assert_matches(torch_backend, exact, rtol=1e-5)
    else:
        plain = loss_and_grads(reference_linear_cross_entropy, inputs, dict(options, compute_dtype=None))
        for a, p, e in zip(ours, plain, exact):
            assert relative_error(a, e) <= 1.25 * relative_error(p, e) + torch.finfo(dtype).eps / 16


@pytest.mark.gpu
def test_gpu_deterministic_and_bounded_memory():
    inputs = make_inputs((8, 1024), torch.bfloat16, hidden_size=1024, vocab=32000, device="cuda")
    first = loss_and_grads(linear_cross_entropy, inputs, dict(shift=True))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    second = loss_and_grads(linear_cross_entropy, inputs, dict(shift=True))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    full_logits_bytes = 8 * 1024 * 32000 * 2
    assert torch.cuda.max_memory_allocated() - before < full_logits_bytes / 2


@pytest.mark.gpu
def test_gpu_loss_only_triton_holds_no_logits_chunk():
    """Under no_grad the Triton backend runs the fused forward: its peak extra memory stays far below
    a quarter of the hidden states, which the torch backend's logits chunk exceeds."""
    inputs = make_inputs((8, 1024), torch.bfloat16, hidden_size=1024, vocab=32000, device="cuda")
    bound = inputs["hidden"].numel() * inputs["hidden"].element_size() / 4
    peaks, losses = {}, {}
    for backend in BACKENDS:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.no_grad():
            losses[backend] = linear_cross_entropy(**inputs, shift=True, softcap=30.0, backend=backend)
        peaks[backend] = torch.cuda.max_memory_allocated() - before
    assert peaks["triton"] < bound < peaks["torch"]
    exact = reference_linear_cross_entropy(**inputs, shift=True, softcap=30.0)
    torch.testing.assert_close(losses["triton"].double(), exact, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("reduction,path", [("mean", "buffered"), ("mean", "deferred"), ("none", "in-backward")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_training_path_matches_float64_reference(dtype, reduction, path, softcap, bias, monkeypatch):
    """N=4099, H=1031, V=50257 (10% ignored targets, 40% zero weights). fp32 (TF32 off): loss, gradients within
    1e-5 of the float64 values (max error relative to the largest reference entry). bf16: the relative error (L2)
    of each output against float64 is at most 1.25x that of plain PyTorch in bf16 (materialized logits,
    F.cross_entropy), plus a sixteenth of bf16's epsilon. "mean" with each weight-gradient path of the fast mode
    (``defers_weight_grad`` forced either way: these ~2200 learned rows would be buffered)."""
    from mrloss.ops import chunked

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if path != "in-backward":
        monkeypatch.setattr(chunked, "defers_weight_grad", lambda *args: path == "deferred")
    inputs = make_inputs((4099,), dtype, bias, hidden_size=1031, vocab=50257, device="cuda", ignored_fraction=0.1)
    options = {"reduction": reduction, "softcap": softcap}
    ours = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend="triton"))
    exact = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute=torch.float64)
    if dtype == torch.float32:
        for name, actual, expected in zip(GRADIENT_NAMES, ours, exact):
            if expected is not None:
                error = (actual.double() - expected).abs().max().item()
                assert error <= 1e-5 * expected.abs().max().item(), f"{name}: max error {error:.3g}"
        return
    plain = loss_and_grads(reference_linear_cross_entropy, inputs, dict(options, compute_dtype=None))
    for name, actual, plain_value, expected in zip(GRADIENT_NAMES, ours, plain, exact):
        if expected is not None:
            assert actual.dtype == (torch.float32 if name == "loss" else dtype), name
            bound = 1.25 * relative_error(plain_value, expected) + torch.finfo(dtype).eps / 16
            assert relative_error(actual, expected) <= bound, name


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast_gives_the_hand_cast_loss_and_gradients(dtype, reduction):
    """Issue #13: under ``torch.autocast("cuda", dtype)`` float32 hidden/weight/bias run the loss (backend auto:
    Triton) in ``dtype``, as F.linear would, with the loss and gradients of casting by hand (within one rounding
    of ``dtype``); the gradients come back in float32."""
    inputs = make_inputs((1031,), hidden_size=257, vocab=4099, device="cuda", ignored_fraction=0.1)
    with torch.autocast("cuda", dtype=dtype):
        autocast = loss_and_grads(linear_cross_entropy, inputs, {"reduction": reduction})
    by_hand = loss_and_grads(cast_by_hand(dtype), inputs, {"reduction": reduction})
    for got, expected in zip(autocast, by_hand):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.gpu
def test_peak_memory_holds_no_full_logits():
    """bf16 N=8192, H=1024, V=128256: the peak memory of forward + backward, beyond the inputs and the
    gradients, stays below half of the [N, V] bf16 logits (2 GiB): room for chunks and an fp32 weight-gradient
    accumulator [V, H] (0.5 GiB), none for the logits."""
    tokens, vocab = 8192, 128256
    inputs = make_inputs((tokens,), torch.bfloat16, bias=False, hidden_size=1024, vocab=vocab, device="cuda")
    hidden, weight = (inputs[name].requires_grad_() for name in ("hidden", "weight"))
    gradient_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(hidden, weight, inputs["targets"], inputs["token_weights"])
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - gradient_bytes
    assert extra < tokens * vocab * 2 / 2, f"peak extra {extra / 2**20:.0f} MiB"
    assert hidden.grad.isfinite().all() and weight.grad.isfinite().all()


def _product_operands(dtype, device="cpu", seed=0, rows=300, inner=37, cols=29):
    gen = torch.Generator().manual_seed(seed)
    return [
        t.to(device=device, dtype=dtype)
        for t in (torch.randn(rows, inner, generator=gen), torch.randn(inner, cols, generator=gen))
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_weight_grad_products_accumulate_in_float32(dtype, monkeypatch):
    """add_product (the weight-gradient accumulation) multiplies half-precision operands exactly into a float32
    buffer (the CPU form of CUDA's addmm(out_dtype=float32)): float32-rounding error against float64, where
    rounding each product to the inputs' dtype first errs ~100x more. first=True ignores the buffer's content
    (no zero fill: NaN does not leak); row blocks (here 7 rows) change nothing."""
    from mrloss.ops import chunked

    monkeypatch.setattr(chunked, "FALLBACK_BLOCK_ELEMENTS", 7 * 37)
    (left1, right1), (left2, right2) = _product_operands(dtype, seed=1), _product_operands(dtype, seed=2)
    buffer = torch.full((300, 29), float("nan"))
    chunked.add_product(buffer, left1, right1, first=True)
    chunked.add_product(buffer, left2, right2)
    exact = left1.double() @ right1.double() + left2.double() @ right2.double()
    rounded = (left1 @ right1).float() + (left2 @ right2).float()  # products rounded to the inputs' dtype
    assert relative_error(buffer, exact) < 1e-6
    assert relative_error(rounded, exact) > 100 * relative_error(buffer, exact)
    one_block = torch.full((300, 29), float("nan"))
    monkeypatch.setattr(chunked, "FALLBACK_BLOCK_ELEMENTS", 1 << 22)
    chunked.add_product(one_block, left1, right1, first=True)
    chunked.add_product(one_block, left2, right2)
    torch.testing.assert_close(one_block, buffer, rtol=2e-7, atol=1e-6)


def test_chunk_weight_grad_same_dtype_is_one_addmm():
    from mrloss.ops import chunked

    left, right = _product_operands(torch.float32)
    buffer = torch.randn(300, 29)
    expected = torch.addmm(buffer, left, right)
    chunked.add_product(buffer, left, right)
    assert torch.equal(buffer, expected)
    chunked.add_product(buffer, left, right, first=True)
    assert torch.equal(buffer, left @ right)


@pytest.mark.parametrize(
    "tokens,hidden_size,vocab,expected",
    [
        (16384, 4096, 128256, 2048),  # Llama-3-8B head: the weight-gradient floor (old rule: 528)
        (16384, 2304, 256000, 2048),  # Gemma-2-2B head (old rule: 256)
        (4096, 1024, 32000, 1024),  # the memory budget C <= H (a [C, V] chunk no larger than the weight)
        (2048, 256, 32000, 256),  # small heads keep MIN_CHUNK_SIZE
        (37, 48, 1001, 256),
        (1 << 20, 4096, 32000, 134224),  # long batches keep C ~ N H / V (rounded up to a multiple of 8)
    ],
)
def test_chunk_default_size_from_memory_budget(tokens, hidden_size, vocab, expected):
    from mrloss.ops.chunked import default_chunk_size

    assert default_chunk_size(tokens, hidden_size, vocab) == expected


@pytest.mark.parametrize("memory", MEMORY)
def test_chunk_first_chunk_overwrites_and_no_chunk_gives_zeros(memory, monkeypatch):
    """The float32 weight-gradient buffer is not zero-filled: the first chunk overwrites it. Several chunks (5
    rows each) equal one; with nothing to learn the weight gradient is exactly zero."""
    inputs = make_inputs((37,), torch.bfloat16, bias=False)
    options = dict(backend="torch", **memory_option(memory, monkeypatch))
    many = loss_and_grads(linear_cross_entropy, inputs, dict(options, chunk_size=5))
    one = loss_and_grads(linear_cross_entropy, inputs, dict(options, chunk_size=64))
    assert torch.isfinite(many[2]).all()
    exact = loss_and_grads(reference_linear_cross_entropy, inputs, {}, compute=torch.float64)
    assert relative_error(many[2], exact[2]) < 2 * relative_error(one[2], exact[2]) + torch.finfo(torch.bfloat16).eps
    nothing = dict(inputs, token_weights=torch.zeros_like(inputs["token_weights"]))
    assert torch.equal(
        loss_and_grads(linear_cross_entropy, nothing, options)[2],
        torch.zeros_like(inputs["weight"]),
    )


@pytest.mark.gpu
def test_gpu_weight_grad_accumulates_in_cublas_without_temporary():
    """On CUDA add_product is one cuBLAS addmm(out_dtype=float32) into the buffer: no warning (the out_dtype path
    was taken), no temporary (peak extra memory far below the buffer), deterministic, and equal to the CPU
    fallback's float32 arithmetic up to float32 rounding."""
    from mrloss.ops import chunked

    (left, right), (left2, right2) = (
        _product_operands(torch.bfloat16, "cuda", seed, rows=8192, inner=2048, cols=1024) for seed in (1, 2)
    )
    results = []
    for _ in range(2):
        buffer = torch.empty(8192, 1024, device="cuda")
        chunked.add_product(buffer, left, right, first=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        chunked.add_product(buffer, left2, right2)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < buffer.numel() * buffer.element_size() / 8
        results.append(buffer)
    assert not chunked._out_dtype_failure
    assert torch.equal(results[0], results[1])
    cpu = torch.empty(8192, 1024)
    chunked.add_product(cpu, left.cpu(), right.cpu(), first=True)
    chunked.add_product(cpu, left2.cpu(), right2.cpu())
    exact = left.cpu().double() @ right.cpu().double() + left2.cpu().double() @ right2.cpu().double()
    assert relative_error(results[0].cpu(), exact) < 1e-6
    assert relative_error(results[0].cpu(), cpu) < 1e-6
