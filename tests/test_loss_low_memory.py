"""memory="low", z-loss and the per-token metrics of mrloss.linear_cross_entropy, on both backends.

The float64 reference covers loss and every gradient with the vocabulary walked in many slices (the minimum
slice is lowered so that small shapes have several, one of them partial); the memory test tracks every tensor
allocation on the CPU (a TorchDispatchMode) and shows that the low mode allocates nothing of [V, H] float32 size.
"""

import gc
import weakref

import pytest
import torch
from helpers import BACKENDS, assert_matches, loss_and_grads, make_inputs, memory_option
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mrloss.ops.backends.torch
import mrloss.ops.chunked
from mrloss import TokenMetrics, linear_cross_entropy
from mrloss.ops.normalization import learned_mask, shift_targets
from mrloss.ops.reference import reference_linear_cross_entropy

OPTIONS = {
    "mean-bias-zloss": (True, dict(z_loss_scale=0.02)),
    "sum-softcap-smoothing-zloss": (False, dict(reduction="sum", softcap=4.0, label_smoothing=0.1, z_loss_scale=0.1)),
    "none-shift-zloss-softcap": (True, dict(reduction="none", shift=True, softcap=3.0, z_loss_scale=0.05)),
    "normalizer-smoothing": (True, dict(normalizer=11.5, label_smoothing=0.2)),
}


@pytest.fixture
def small_vocab_slices(monkeypatch):
    """Vocabulary slices of ~166 rows at V=1001 (chunk_size 8, H=48): 7 slices, the last one partial."""
    monkeypatch.setattr(mrloss.ops.chunked, "MIN_VOCAB_SLICE", 64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_low_memory_vocab_slices_match_float64_reference(backend, case, small_vocab_slices):
    bias, options = OPTIONS[case]
    shape = (3, 13) if options.get("shift") else (37,)
    inputs = make_inputs(shape, torch.float64, bias=bias)  # non-uniform weights, ~40% zero, ~15% ignored
    ours = loss_and_grads(linear_cross_entropy, inputs, dict(options, backend=backend, memory="low", chunk_size=8))
    expected = loss_and_grads(reference_linear_cross_entropy, inputs, options, compute=torch.float64)
    assert_matches(ours, expected, rtol=1e-10)  # "none": non-uniform upstream gradient (loss_and_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory,reduction", [("fast", "mean"), ("low", "mean"), ("low", "none")])
def test_bitwise_deterministic(backend, memory, reduction, small_vocab_slices):
    inputs = make_inputs((37,), torch.bfloat16)
    options = dict(backend=backend, memory=memory, reduction=reduction, chunk_size=8, z_loss_scale=0.01, softcap=5.0)
    first, second = (loss_and_grads(linear_cross_entropy, inputs, options) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_memory_equals_fast_to_rounding_in_float32(backend, small_vocab_slices):
    inputs = make_inputs((37,), torch.float32)
    options = dict(backend=backend, chunk_size=8, label_smoothing=0.1, z_loss_scale=0.01)
    fast = loss_and_grads(linear_cross_entropy, inputs, options)
    low = loss_and_grads(linear_cross_entropy, inputs, dict(options, memory="low"))
    assert_matches(low, [t.double() for t in fast], rtol=2e-6)


def test_low_memory_skips_zero_weight_tokens(monkeypatch, small_vocab_slices):
    inputs = make_inputs((37,))
    rows_per_slice = {}
    slice_grad = mrloss.ops.backends.torch.cross_entropy_slice_grad

    def recording(logits, *args, col_offset, **kwargs):
        rows_per_slice[col_offset] = rows_per_slice.get(col_offset, 0) + logits.shape[0]
        return slice_grad(logits, *args, col_offset=col_offset, **kwargs)

    monkeypatch.setattr(mrloss.ops.backends.torch, "cross_entropy_slice_grad", recording)
    loss_and_grads(linear_cross_entropy, inputs, dict(backend="torch", memory="low", chunk_size=5))
    learned = ((inputs["targets"] != -100) & (inputs["token_weights"] > 0)).sum().item()
    assert len(rows_per_slice) > 1
    assert set(rows_per_slice.values()) == {learned}


def test_low_memory_allows_a_second_backward():
    inputs = make_inputs((37,))
    hidden = inputs["hidden"].requires_grad_()
    loss = linear_cross_entropy(hidden, inputs["weight"], inputs["targets"], inputs["token_weights"], memory="low")
    (first,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (second,) = torch.autograd.grad(2 * loss, hidden)
    assert torch.equal(2 * first, second)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_is_returned_and_included(backend, reduction):
    inputs = make_inputs((3, 13), torch.float64)
    options = dict(reduction=reduction, shift=True, softcap=4.0)
    output = linear_cross_entropy(**inputs, **options, backend=backend, z_loss_scale=0.1, return_z_loss=True)
    loss, z_loss = output.loss, output.z_loss
    with_z = reference_linear_cross_entropy(**inputs, **options, z_loss_scale=0.1)
    without_z = reference_linear_cross_entropy(**inputs, **options)
    torch.testing.assert_close(loss, with_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_loss, with_z - without_z, rtol=1e-10, atol=1e-12)
    assert (z_loss > 0).any() and not z_loss.requires_grad
    zero = linear_cross_entropy(**inputs, **options, backend=backend, return_z_loss=True).z_loss
    assert (zero == 0).all()


def plain_metrics(inputs, softcap, shift):
    """Accuracy (argmax == target) and softmax entropy from materialized float64 logits, target-aligned, as the
    learned mask (0 elsewhere)."""
    logits = inputs["hidden"].double() @ inputs["weight"].double().T
    if inputs["bias"] is not None:
        logits = logits + inputs["bias"].double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets, weights = inputs["targets"], inputs["token_weights"]
    if shift:
        targets, weights = shift_targets(targets, weights)
    learned = learned_mask(targets, weights)
    log_probs = logits.log_softmax(-1)
    accuracy = ((logits.argmax(-1) == targets) & learned).float()
    entropy = torch.where(learned, -(log_probs.exp() * log_probs).sum(-1), 0.0)
    if shift:  # prediction-aligned -> target-aligned
        accuracy, entropy = (
            torch.cat([t.new_zeros(t.shape[:-1] + (1,)), t[..., :-1]], -1) for t in (accuracy, entropy)
        )
    return accuracy, entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["fast", "low"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(reduction="none", softcap=10.0, shift=True), dict(reduction="sum", label_smoothing=0.1, shift=True)],
)
def test_token_metrics_match_plain_pytorch(backend, memory, options):
    inputs = make_inputs((3, 13))
    shift = options.get("shift", False)
    targets = inputs["targets"].view(-1)
    targets[5] = 512
    inputs["token_weights"].view(-1)[5] = 1.0
    inputs["weight"][256] = inputs["weight"][512]  # a tie: the first maximum (256) is the argmax, not the target
    inputs["bias"][256] = inputs["bias"][512]
    hidden = inputs["hidden"].view(-1, inputs["hidden"].shape[-1])
    for position in [5, *range(2, targets.numel(), 2)]:  # about half the rows predict their target
        if targets[position] != -100 and not (shift and position % 13 == 0):
            hidden[position - shift] += 2 * inputs["weight"][targets[position]]
    output = linear_cross_entropy(
        **inputs, **options, backend=backend, memory=memory, return_token_losses=True, return_token_metrics=True
    )
    loss, token_losses, metrics = output.loss, output.token_losses, output.token_metrics
    assert isinstance(metrics, TokenMetrics) and not metrics.accuracy.requires_grad
    accuracy, entropy = plain_metrics(inputs, options.get("softcap"), shift)
    assert metrics.accuracy.dtype == metrics.entropy.dtype == torch.float32
    assert torch.equal(metrics.accuracy, accuracy.float())
    torch.testing.assert_close(metrics.entropy, entropy.float(), rtol=1e-5, atol=1e-5)
    assert 0 < accuracy.sum() < (token_losses > 0).sum()
    tie_logits = hidden[5 - shift].double() @ inputs["weight"].double().T + inputs["bias"].double()
    assert tie_logits[256] == tie_logits[512] == tie_logits.max()
    assert metrics.accuracy.view(-1)[5] == 0  # the tie: the target is a maximum, but not the first one
    expected = linear_cross_entropy(**inputs, **options, backend=backend, memory=memory)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # expected: the fused loss-only kernel (Triton)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_metrics_of_a_loss_only_pass_come_from_the_fused_kernel(monkeypatch, reduction):
    """No gradient wanted (evaluation): the Triton backend's fused forward fills the metrics too (no logits
    chunk, no row op), equal to the PyTorch chunks'."""
    import mrloss.ops.backends.triton.cross_entropy_rows as rows_module
    import mrloss.ops.backends.triton.linear_cross_entropy_forward as forward_module

    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in make_inputs((3, 13)).items()}
    expected = linear_cross_entropy(**inputs, reduction=reduction, backend="torch", return_token_metrics=True)
    fused_calls = []
    fused = forward_module.linear_cross_entropy_forward

    def spy(*args, **kwargs):
        fused_calls.append(kwargs["correct_out"] is not None and kwargs["entropy_out"] is not None)
        return fused(*args, **kwargs)

    def no_row_op(*args, **kwargs):
        raise AssertionError("the row op ran")

    monkeypatch.setattr(forward_module, "linear_cross_entropy_forward", spy)
    monkeypatch.setattr(rows_module, "cross_entropy_rows", no_row_op)
    output = linear_cross_entropy(**inputs, reduction=reduction, backend="triton", return_token_metrics=True)
    loss, metrics = output.loss, output.token_metrics
    assert fused_calls == [True]
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(metrics.accuracy, expected.token_metrics.accuracy)
    torch.testing.assert_close(metrics.entropy, expected.token_metrics.entropy, rtol=1e-5, atol=1e-5)


class AllocationTracker(TorchDispatchMode):
    """Bytes of every new tensor storage an op creates (not the inputs' storages): the largest one, and the
    peak of the live ones (a storage stops counting when it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.tracked:
                continue
            self.tracked.add(key)
            self.live += size
            self.largest, self.peak = max(self.largest, size), max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key, size):
        self.live -= size
        self.tracked.discard(key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_memory_allocates_nothing_of_vocab_by_hidden_float32_size(backend, small_vocab_slices, monkeypatch):
    """memory="low" never holds a float32 [V, H]; memory="fast" holds one when its weight gradient is buffered
    (forced here: "fast-buffered") and, with these 128 learned rows (<= 2 H), the deferred [M, V] bf16 logit
    gradients instead, no larger."""
    tokens, hidden_size, vocab, chunk = 256, 128, 2048, 32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / 16).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    token_weights = torch.rand(tokens, generator=gen).masked_fill(torch.arange(tokens) % 2 == 0, 0.0)
    vocab_by_hidden_fp32 = vocab * hidden_size * 4
    trackers = {}
    for memory in ("fast-buffered", "fast", "low"):
        hidden.grad = weight.grad = None
        with monkeypatch.context() as patch, AllocationTracker() as trackers[memory]:
            linear_cross_entropy(
                hidden,
                weight,
                targets,
                token_weights,
                backend=backend,
                chunk_size=chunk,
                **memory_option(memory, patch),
            ).backward()
            gc.collect()  # the Triton interpreter leaves reference cycles behind
    buffered, deferred, low = trackers["fast-buffered"], trackers["fast"], trackers["low"]
    assert buffered.largest == vocab_by_hidden_fp32  # the tracker sees the fast mode's float32 buffer
    assert deferred.largest == (tokens // 2) * vocab * 2 <= vocab_by_hidden_fp32  # the [M, V] bf16 logit gradients
    assert low.largest == vocab * hidden_size * 2  # the bf16 weight gradient itself
    gradients = hidden.numel() * 2 + weight.numel() * 2
    assert low.live == gradients  # nothing else outlives the step
    chunk_block = chunk * vocab * 4  # one float32 [C, V] logits chunk (= a [V_s, H] fp32 block here)
    assert mrloss.ops.chunked.vocab_slice_size(chunk, hidden_size, vocab) * hidden_size * 4 == chunk_block
    learned_fp32 = (tokens // 2) * hidden_size * 4
    assert low.peak - gradients <= learned_fp32 + 3 * chunk_block < vocab_by_hidden_fp32
    assert low.peak < buffered.peak and deferred.peak <= buffered.peak


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(memory="tiny"), r"unknown memory 'tiny'; expected one of \('fast', 'low'\)"),
        (dict(z_loss_scale=-1e-4), r"z_loss_scale must be a finite float >= 0, got -0.0001"),
        (dict(z_loss_scale=float("nan")), r"z_loss_scale must be a finite float >= 0"),
    ],
)
def test_option_errors(options, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**make_inputs((5,)), **options)
