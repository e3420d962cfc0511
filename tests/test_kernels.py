"""The Triton row kernel against the PyTorch row op (same contract, mrloss.chunked), interpreted on the CPU."""
import pytest
import torch

from mrloss.kernels.cross_entropy_rows import MAX_BLOCK_V, cross_entropy_rows as triton_rows
from mrloss.torch_backend import cross_entropy_rows as torch_rows


def row_inputs(rows, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    scales = torch.rand(rows, generator=gen) * 2 - 0.5
    return logits, targets, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,options", [
    (1001, dict(softcap=None, label_smoothing=0.0)),
    (1001, dict(softcap=3.0, label_smoothing=0.1)),
    (MAX_BLOCK_V + 37, dict(softcap=None, label_smoothing=0.2)),  # several vocabulary tiles
])
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
