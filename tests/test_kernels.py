"""The Triton kernels, interpreted on the CPU: the row kernel against the PyTorch row op (same contract,
mrloss.ops.chunked), the fused loss-only forward against a float64 reference."""

import pytest
import torch

from mrloss.ops.backends import torch as torch_backend
from mrloss.ops.backends.torch import MAX_COLUMN_BLOCK, VocabShard
from mrloss.ops.backends.torch import cross_entropy_rows as torch_rows
from mrloss.ops.backends.triton.cross_entropy_rows import MAX_BLOCK_V
from mrloss.ops.backends.triton.cross_entropy_rows import cross_entropy_rows as triton_rows
from mrloss.ops.backends.triton.linear_cross_entropy_forward import linear_cross_entropy_forward as fused_forward


def row_inputs(rows, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    scales = torch.rand(rows, generator=gen) * 2 - 0.5
    return logits, targets, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "vocab,options",
    [
        (1001, dict(softcap=None, label_smoothing=0.0)),
        (1001, dict(softcap=3.0, label_smoothing=0.1)),
        (MAX_BLOCK_V + 37, dict(softcap=None, label_smoothing=0.2)),  # several vocabulary tiles
    ],
)
def test_triton_rows_match_torch_rows(dtype, vocab, options):
    logits, targets, scales = row_inputs(5, vocab, dtype)
    grads = {}
    for name, row_op in (("triton", triton_rows), ("torch", torch_rows)):
        scratch = logits.clone()
        losses = row_op(scratch, targets, scales, **options)
        loss_only = row_op(logits.clone(), targets, None, **options)
        assert losses.dtype == torch.float32
        assert torch.equal(losses, loss_only)
        grads[name] = (losses, scratch)
    (triton_loss, triton_grad), (torch_loss, torch_grad) = grads["triton"], grads["torch"]
    torch.testing.assert_close(triton_loss, torch_loss, rtol=1e-5, atol=1e-5)
    assert triton_grad.dtype == dtype
    # float32 math in both, rounded once into the logits' dtype: at most one rounding step apart
    ulp = torch.finfo(dtype).eps * triton_grad.float().abs().max().item() if dtype != torch.float32 else 1e-6
    torch.testing.assert_close(triton_grad.float(), torch_grad.float(), rtol=0, atol=ulp)


def test_triton_rows_gradient_is_softmax_minus_onehot():
    logits, targets, scales = row_inputs(3, 257, torch.float32)
    grad = logits.clone()
    losses = triton_rows(grad, targets, scales, softcap=None, label_smoothing=0.0)
    expected_grad = (torch.softmax(logits, 1) - torch.nn.functional.one_hot(targets, 257)) * scales[:, None]
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses, torch.nn.functional.cross_entropy(logits, targets, reduction="none"))


def test_triton_bfloat16_gradient_rounds_to_nearest():
    """The interpreter's own float32 -> bfloat16 cast truncates; the kernel rounds like the GPU does."""
    logits, targets, scales = row_inputs(4, 301, torch.bfloat16)
    grad = logits.clone()
    triton_rows(grad, targets, scales, softcap=None, label_smoothing=0.0)
    exact = (torch.softmax(logits.float(), 1) - torch.nn.functional.one_hot(targets, 301)) * scales[:, None]
    mismatches = (grad != exact.to(torch.bfloat16)).float().mean().item()
    assert mismatches < 0.01  # truncation would miss about half of them


# ------------------------------------------------ fused loss-only forward (no logits in memory)


def fused_inputs(dtype, bias, num_rows=19, hidden_size=40, vocab=301, extra_rows=6, seed=0, device="cpu"):
    """hidden [num_rows + extra_rows, H] whose rows not in ``rows`` are NaN (the kernel must not read
    them), weight [V, H] as a transposed view (strided loads), targets including 0 and V - 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows + extra_rows, hidden_size, generator=gen)
    weight = (torch.randn(hidden_size, vocab, generator=gen) / hidden_size**0.5 * 3).T
    bias_ = torch.randn(vocab, generator=gen) if bias else None
    rows = torch.randperm(num_rows + extra_rows, generator=gen)[:num_rows]
    unread = torch.ones(num_rows + extra_rows, dtype=torch.bool)
    unread[rows] = False
    hidden[unread] = float("nan")
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    targets[:2] = torch.tensor([0, vocab - 1])

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return cast(hidden), cast(weight), cast(bias_), rows.to(device), targets.to(device)


def float64_row_losses(hidden, weight, bias, rows, targets, softcap, label_smoothing):
    logits = hidden[rows].double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "bias,options",
    [
        (False, dict(softcap=None, label_smoothing=0.0)),
        (True, dict(softcap=3.0, label_smoothing=0.1)),
    ],
)
def test_fused_forward_matches_float64_reference(dtype, bias, options):
    """Odd N, H, V: 2 row blocks, 3 H steps and 5 V tiles, each with a partial last block. The float64
    reference uses the same (rounded) inputs, and the kernel accumulates logits in float32: fp32-exact
    for every input dtype."""
    hidden, weight, bias_, rows, targets = fused_inputs(dtype, bias)
    losses = fused_forward(
        hidden, weight, bias_, rows, targets, **options, blocks=dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16)
    )
    expected = float64_row_losses(hidden, weight, bias_, rows, targets, **options)
    assert losses.dtype == torch.float32 and losses.shape == (19,)
    assert losses.isfinite().all()  # the NaN rows of hidden were never read
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_forward_token_metrics_match_float64_reference(dtype, softcap):
    """Accuracy (first maximum = target) and entropy of the softcapped softmax, across 5 V tiles; the losses
    and lse are those of the pass without metrics. Some targets are set to their row's argmax (accuracy 1)
    and one row's maximum is tied in a later tile (the first maximum counts)."""
    hidden, weight, bias_, rows, targets = fused_inputs(dtype, True)
    logits = hidden[rows].double() @ weight.double().T + bias_.double()
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    targets[2:9] = z[2:9].argmax(1)
    weight = weight.clone()
    first = int(z[9].argmax())
    other = (first + 128) % weight.shape[0]  # two tiles away (BLOCK_V 64): the same logit
    weight[other], bias_ = weight[first], bias_.clone()
    bias_[other] = bias_[first]
    targets[9] = max(first, other)  # a tie is not a hit: the first maximum is the smaller column
    logits = hidden[rows].double() @ weight.double().T + bias_.double()
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    options = dict(softcap=softcap, label_smoothing=0.1, blocks=dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16))
    lse, correct, entropy = (torch.empty(len(rows)) for _ in range(3))
    losses = fused_forward(
        hidden, weight, bias_, rows, targets, lse_out=lse, correct_out=correct, entropy_out=entropy, **options
    )
    plain_lse = torch.empty(len(rows))
    assert torch.equal(losses, fused_forward(hidden, weight, bias_, rows, targets, lse_out=plain_lse, **options))
    assert torch.equal(lse, plain_lse)
    log_p = torch.log_softmax(z, 1)
    assert torch.equal(correct, (z.argmax(1) == targets).float()) and correct[2:9].all() and correct[9] == 0
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(1), rtol=1e-5, atol=1e-5)


def test_fused_forward_default_blocks_and_edge_cases():
    hidden, weight, bias_, rows, targets = fused_inputs(torch.float32, True, vocab=1)  # V = 1: loss 0
    assert fused_forward(hidden, weight, bias_, rows, targets, softcap=None, label_smoothing=0.0).abs().max() == 0
    empty = fused_forward(hidden, weight, bias_, rows[:0], targets[:0], softcap=None, label_smoothing=0.0)
    assert empty.shape == (0,)
    with pytest.raises(TypeError, match="float64"):
        fused_forward(hidden.double(), weight.double(), None, rows, targets, softcap=None, label_smoothing=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_forward_matches_float64_reference(dtype):
    """GPU block sizes at scale; fp32 must not silently use TF32 (input_precision="ieee")."""
    options = dict(softcap=30.0, label_smoothing=0.1)
    hidden, weight, bias_, rows, targets = fused_inputs(
        dtype, True, num_rows=3001, hidden_size=1000, vocab=32003, extra_rows=999, device="cuda"
    )
    losses = fused_forward(hidden, weight, bias_, rows, targets, **options)
    expected = float64_row_losses(hidden, weight, bias_, rows, targets, **options)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)
    correct, entropy = torch.empty_like(losses), torch.empty_like(losses)
    with_metrics = fused_forward(
        hidden, weight, bias_, rows, targets, correct_out=correct, entropy_out=entropy, **options
    )
    assert torch.equal(with_metrics, losses)
    z = hidden[rows].double() @ weight.double().T + bias_.double()
    log_p = torch.log_softmax(30.0 * torch.tanh(z / 30.0), 1)
    near_tie = log_p.topk(2, dim=1).values.diff(dim=1).abs().squeeze(1) < 1e-4  # fp32 may order those either way
    assert torch.equal(correct[~near_tie], (log_p.argmax(1) == targets)[~near_tie].float())
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(1), rtol=1e-4, atol=1e-4)


def test_fused_forward_reads_strided_views():
    """Every input a non-contiguous view (hidden transposed, weight / bias / rows / targets with step 2):
    bitwise the losses of contiguous copies, and the float64 reference."""
    hidden, weight, bias_, rows, targets = fused_inputs(torch.float32, True)

    def strided(t):
        """The same values in a view with doubled strides (2-D: on column-major storage), zeros between."""
        if t.dim() == 1:
            storage = torch.zeros(2 * t.shape[0], dtype=t.dtype)
            storage[::2] = t
            return storage[::2]
        storage = torch.zeros(2 * t.shape[1], t.shape[0], dtype=t.dtype).T  # [R, 2C]
        storage[:, ::2] = t
        return storage[:, ::2]

    views = [strided(t) for t in (hidden, weight, bias_, rows, targets)]
    assert not any(view.is_contiguous() for view in views) and views[2].stride() == (2,)
    options = dict(softcap=3.0, label_smoothing=0.1, blocks=dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16))
    losses = fused_forward(*views, **options)
    assert torch.equal(losses, fused_forward(hidden, weight, bias_, rows, targets, **options))
    expected = float64_row_losses(hidden, weight, bias_, rows, targets, softcap=3.0, label_smoothing=0.1)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)


def test_triton_rows_read_strided_views():
    """Logits rows with a stride > V, targets / grad_scales with step 2: same losses and gradients as
    contiguous inputs; the columns past V are left alone."""
    logits, targets, scales = row_inputs(6, 257, torch.float32)
    wide = torch.full((6, 300), 7.0)
    wide[:, :257] = logits
    strided_targets = torch.stack([targets, torch.zeros_like(targets)], 1)[:, 0]
    strided_scales = torch.stack([scales, torch.zeros_like(scales)], 1)[:, 0]
    losses = triton_rows(wide[:, :257], strided_targets, strided_scales, softcap=None, label_smoothing=0.0)
    contiguous = logits.clone()
    expected = triton_rows(contiguous, targets, scales, softcap=None, label_smoothing=0.0)
    assert torch.equal(losses, expected)
    assert torch.equal(wide[:, :257], contiguous) and (wide[:, 257:] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_torch_rows_token_metrics_match_float64_reference(dtype, softcap):
    """The PyTorch row op's metrics: accuracy of the first maximum (rows 0-1 tie an earlier column with the target's
    maximum: wrong; rows 2-4 have the target as their unique maximum: right) and the entropy from the softmax pass's
    sums (lse - sum p z), against float64; losses and logit gradients are bit-identical with and without them."""
    logits, targets, scales = row_inputs(7, 1001, dtype)
    logits[:5] = logits[:5].clamp(max=10)
    for row in range(5):
        logits[row, targets[row]] = 12.0
    targets[:2] = torch.tensor([900, 901])
    logits[0, 3] = logits[1, 5] = logits[0, 900] = logits[1, 901] = 12.0
    z = logits.double() if softcap is None else softcap * torch.tanh(logits.double() / softcap)
    log_p = z.log_softmax(1)
    results = {}
    for metrics in (False, True):
        scratch = logits.clone()
        correct, entropy = (
            torch.full((7,), float("nan"), dtype=torch.float64 if dtype == torch.float64 else None),
        ) * 2
        correct, entropy = correct.clone(), entropy.clone()
        losses = torch_rows(
            scratch,
            targets,
            scales,
            softcap=softcap,
            label_smoothing=0.0,
            correct_out=correct if metrics else None,
            entropy_out=entropy if metrics else None,
        )
        results[metrics] = (losses, scratch, correct, entropy)
    assert torch.equal(results[False][0], results[True][0]) and torch.equal(results[False][1], results[True][1])
    _, _, correct, entropy = results[True]
    assert correct.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] + (z[5:].argmax(1) == targets[5:]).double().tolist()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(1), rtol=tolerance, atol=tolerance)


# (maximum columns, target) of the tie rows below, over a vocabulary of 2 column blocks and a partial third one
# (W = MAX_COLUMN_BLOCK), and whether the target is the first maximum
W = MAX_COLUMN_BLOCK
TIE_ROWS = [
    ((5, 9), 9, False),  # an earlier tie in the target's block
    ((5, 9), 5, True),  # the tie comes after the target
    ((3, W + 4), W + 4, False),  # an earlier tie in an earlier block
    ((W - 1, W), W, False),  # ... right across a block boundary
    ((W - 1, W), W - 1, True),
    ((W + 4, 2 * W + 10), 2 * W + 10, False),  # target in the partial last block, the tie in a full one
    ((2 * W + 3, 2 * W + 10), 2 * W + 10, False),  # target and an earlier tie in the partial last block
    ((2 * W + 3, 2 * W + 10), 2 * W + 3, True),
    ((2 * W + 76,), 2 * W + 76, True),  # the last column
    ((), 0, True),  # every column equal: the first one is the maximum
    ((), 1, False),
    ((7,), 8, False),  # the target is not a maximum
]


def tie_inputs(dtype, seed=0):
    """(logits [C, 2 W + 77] in {0, 1, 2}, targets [C]): ties, as bf16 logits often have. The rows of TIE_ROWS
    (maxima 2 at their columns, 1 elsewhere), then random rows with up to three maxima (in every other row within 24
    columns) whose target is a random one of them (the first or a later one)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 2 * W + 77
    logits = torch.ones(len(TIE_ROWS) + 40, vocab, dtype=torch.float64)
    for row, (max_columns, _, _) in enumerate(TIE_ROWS):
        logits[row, list(max_columns)] = 2.0
    random_rows = logits[len(TIE_ROWS) :]
    random_rows.copy_(torch.randint(0, 2, random_rows.shape, generator=gen))
    first = torch.randint(0, vocab - 24, (random_rows.shape[0], 1), generator=gen)
    spread = torch.randint(0, 24, (random_rows.shape[0], 3), generator=gen)  # near each other: often one block
    spread[::2] = torch.randint(0, vocab, (random_rows.shape[0] // 2, 3), generator=gen) - first[::2]  # or not
    random_rows.scatter_(1, first + spread, 2.0)  # one to three maxima a row
    is_max = random_rows == random_rows.amax(1, keepdim=True)
    random_targets = torch.multinomial(is_max.double(), 1, generator=gen).squeeze(1)
    targets = torch.cat([torch.tensor([target for _, target, _ in TIE_ROWS]), random_targets])
    return logits.to(dtype), targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_torch_rows_accuracy_is_the_first_maximum_among_ties(dtype, softcap):
    """The PyTorch row op's accuracy under ties at the maximum: 1 exactly where the target is argmax's first
    maximum (TIE_ROWS by hand, the random rows against float64 argmax), whatever block the ties fall in; with a
    vocabulary shard (here the whole vocabulary) a row is correct wherever its target holds the maximum."""
    logits, targets = tie_inputs(dtype)
    z = logits.double() if softcap is None else softcap * torch.tanh(logits.double() / softcap)
    first_max = (z.argmax(1) == targets).double()
    assert first_max[: len(TIE_ROWS)].tolist() == [float(right) for _, _, right in TIE_ROWS]
    assert 0 < first_max[len(TIE_ROWS) :].sum() < len(targets) - len(TIE_ROWS)  # both kinds among the random rows
    whole = VocabShard(0, logits.shape[1], all_reduce_max=lambda t: t, all_reduce_sum=lambda t: t)
    for vocab_shard, expected in ((None, first_max), (whole, (z.gather(1, targets[:, None]).squeeze(1) == z.amax(1)))):
        correct = torch.full(targets.shape, float("nan"), dtype=torch.float64 if dtype == torch.float64 else None)
        torch_rows(
            logits.clone(), targets, None, softcap=softcap, label_smoothing=0.0, correct_out=correct,
            vocab_shard=vocab_shard,
        )  # fmt: skip
        assert torch.equal(correct.double(), expected.double())
    nan_rows = logits[:2].clone()
    nan_rows[:, 0] = float("nan")  # no maximum: wrong, also where the target is the NaN's column
    correct = torch.empty(2, dtype=torch.float64 if dtype == torch.float64 else None)
    torch_rows(nan_rows, torch.tensor([0, 9]), None, softcap=softcap, label_smoothing=0.0, correct_out=correct)
    assert correct.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [1, 3, 64])
def test_torch_rows_by_row_blocks_match_float64_reference(monkeypatch, dtype, block_rows):
    """The softmax pass by blocks of 1, 3 (a partial last block) and all of 10 rows: losses, lse, entropy and the
    logit gradients against float64; losses and gradients bit-identical with and without the token metrics."""
    logits, targets, scales = row_inputs(10, 1001, dtype, seed=3)
    acc_bytes = 8 if dtype == torch.float64 else 4
    per_thread = -(-block_rows * 1001 * acc_bytes // torch.get_num_threads())  # blocks of block_rows rows
    monkeypatch.setattr(torch_backend, "CPU_ROW_BLOCK_BYTES", per_thread)
    z = logits.double().clone().requires_grad_()
    expected_losses = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    (expected_losses * scales.double()).sum().backward()
    log_p = z.detach().log_softmax(1)
    results = {}
    for metrics in (False, True):
        scratch, lse = logits.clone(), torch.empty(10, dtype=torch.float64 if dtype == torch.float64 else None)
        entropy = torch.empty_like(lse) if metrics else None
        losses = torch_rows(
            scratch, targets, scales, softcap=None, label_smoothing=0.0, z_loss_scale=0.0, lse_out=lse,
            entropy_out=entropy,
        )  # fmt: skip
        results[metrics] = (losses, scratch, lse, entropy)
    assert all(torch.equal(results[False][index], results[True][index]) for index in range(3))
    losses, grad, lse, entropy = results[True]
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.double(), expected_losses.detach(), **tolerance)
    torch.testing.assert_close(lse.double(), z.detach().logsumexp(1), **tolerance)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(1), **tolerance)
    grad_tolerance = tolerance if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.double(), z.grad, **grad_tolerance)
