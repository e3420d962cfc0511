"""The tests' shared helpers: random loss inputs, loss + gradients of any loss function, comparisons against the
float64 reference, and the ``mrloss`` command run in-process.

Importable from test modules and from the processes they spawn (pytest puts ``tests/`` on ``sys.path``)."""

from pathlib import Path

import torch

BACKENDS = ["torch", "triton"]
HIDDEN, VOCAB = 48, 1001
# memory modes of the loss tests: "fast-buffered" is memory="fast" with the float32 weight-gradient buffer forced,
# the path of more learned rows than ``mrloss.ops.chunked.defers_weight_grad`` allows (the small test sizes would
# otherwise always defer), so both weight-gradient paths of the fast mode meet the float64 tests
MEMORY_MODES = ["fast", "fast-buffered", "low"]
GRADIENT_NAMES = ("loss", "grad_hidden", "grad_weight", "grad_bias")


def make_inputs(
    shape=(37,),
    dtype=torch.float32,
    bias=True,
    seed=0,
    hidden_size=HIDDEN,
    vocab=VOCAB,
    device="cpu",
    ignored_fraction=0.15,
):
    """Loss inputs, drawn on ``device``: hidden [*shape, H] and weight [V, H] (logits of std about 3), bias [V] | None,
    all in ``dtype``; targets [*shape] int64 (``ignored_fraction`` of them -100); token_weights [*shape] fp32 in
    [0, 2) with ~40% zeros."""
    gen = torch.Generator(device).manual_seed(seed)

    def draw(sampler, *size):
        return sampler(*size, generator=gen, device=device)

    hidden = draw(torch.randn, *shape, hidden_size)
    weight = draw(torch.randn, vocab, hidden_size) / hidden_size**0.5 * 3
    bias_ = draw(torch.randn, vocab) if bias else None
    targets = torch.randint(0, vocab, shape, generator=gen, device=device)
    targets[draw(torch.rand, *shape) < ignored_fraction] = -100
    token_weights = draw(torch.rand, *shape) * 2
    token_weights[draw(torch.rand, *shape) < 0.4] = 0.0

    def cast(t):
        return None if t is None else t.to(dtype)

    return dict(
        hidden=cast(hidden), weight=cast(weight), bias=cast(bias_), targets=targets, token_weights=token_weights
    )


def memory_option(memory: str, monkeypatch) -> dict:
    """The loss keyword of a test's ``memory`` mode (`MEMORY_MODES`): {"memory": ...}, forcing the weight-gradient
    buffer for "fast-buffered" (through ``monkeypatch``)."""
    if memory != "fast-buffered":
        return {"memory": memory}
    import mrloss.ops.chunked

    monkeypatch.setattr(mrloss.ops.chunked, "defers_weight_grad", lambda *args: False)
    return {"memory": "fast"}


def loss_and_grads(fn, inputs, options, compute=None, upstream_seed=1):
    """[loss, grad hidden, grad weight, grad bias] of ``fn(hidden, weight, targets, token_weights, bias=, **options)``
    (None where an input is absent); ``compute``: the inputs cast to that dtype first (as leaves). reduction "none" is
    back-propagated with a non-uniform upstream gradient in [-0.5, 1.5)."""
    leaves = {}
    for name in ("hidden", "weight", "bias"):
        value = inputs[name]
        if value is not None:
            leaves[name] = (value.detach().to(compute) if compute else value.detach().clone()).requires_grad_()
    loss = fn(
        leaves["hidden"],
        leaves["weight"],
        inputs["targets"],
        inputs["token_weights"],
        bias=leaves.get("bias"),
        **options,
    )
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = (torch.rand(loss.shape, generator=gen) * 2 - 0.5).to(loss.device, loss.dtype)
    grads = torch.autograd.grad(loss, list(leaves.values()), upstream)
    named = dict(zip(leaves, grads))
    return [loss.detach()] + [named.get(name) for name in ("hidden", "weight", "bias")]


def cast_by_hand(dtype):
    """``linear_cross_entropy`` with hidden, weight and bias cast to ``dtype`` inside the graph (what autocast does
    to F.linear): gradients come back in the leaves' dtype."""
    from mrloss import linear_cross_entropy

    def loss(hidden, weight, targets, token_weights, bias=None, **options):
        bias = None if bias is None else bias.to(dtype)
        return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, token_weights, bias=bias, **options)

    return loss


def relative_error(actual, expected):
    """L2 error of ``actual`` relative to ``expected``, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def assert_matches(actual, expected, rtol):
    """Each of [loss, grad hidden, grad weight, grad bias] within ``rtol`` x the largest expected entry (max error)."""
    for name, a, e in zip(GRADIENT_NAMES, actual, expected):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape, name
        error = (a.double() - e).abs().max().item()
        assert error <= rtol * e.abs().max().item() + 1e-12, f"{name}: max error {error:.3g}"


def run_cli(argv, capsys):
    """(exit code, stderr) of ``mrloss <argv>`` in this process (its stdout: ``run_cli.out`` afterwards)."""
    from mrloss.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    run_cli.out = captured.out
    return code, captured.err


def write_config(path: Path, **sections) -> Path:
    """A YAML config at ``path`` with the given top-level sections."""
    import yaml

    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path


def cpu_training_arguments(output_dir, **overrides):
    """``transformers.TrainingArguments`` of the tests' Trainer runs: on the CPU, no reporting, no progress bar;
    ``overrides`` set the rest (or replace these)."""
    import transformers

    defaults = {"use_cpu": True, "report_to": "none", "disable_tqdm": True}
    return transformers.TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})
