"""Sequence-parallel loss (mrloss.parallel) on CPU with gloo: SP=2/4 against SP=1, in fp32.

One spawned process group per world size (2 and 4 ranks) runs every case, because process start-up
dominates on a small machine. Each case builds one packed sequence identically on every rank, shards it
with verl's own ``ulysses_pad_and_slice_inputs`` (the ids that make the hidden shard) and with
``mrloss.parallel.shard_targets`` (targets / weights), and checks the loss, the hidden-shard gradient and
the parameter gradients (embedding = the "model body", LM head) against a single-process reference built
independently of the code under test: ``mrloss.ops.reference`` in float64 with ``shift=True``, one unpacked
sample at a time.
"""

import functools
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrloss import linear_cross_entropy
from mrloss.ops.reference import reference_linear_cross_entropy
from mrloss.parallel import pad_and_slice, sequence_parallel_linear_cross_entropy, shard_targets, shift_targets

V, H = 29, 12
ATOL, RTOL = 2e-6, 2e-5
# verl is installed in CI (the verl extra), so these run there; find_spec does not import it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="needs verl (the verl extra)")


@functools.cache
def verl_ulysses():
    """verl's own ``verl/utils/ulysses.py``, loaded from its file: it needs only torch, and each rank
    skips ``import verl`` (~5 s: ray, tensordict)."""
    location = importlib.util.find_spec("verl").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("verl_ulysses", os.path.join(location, "utils", "ulysses.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_case(seed, lengths, zero_prefix=0, all_zero=False, learn_first_tokens=False):
    """A packed sequence: input_ids [T], token weights [T] (0 on each sample's first token, 1.25 with
    ``learn_first_tokens``; 0 on the first ``zero_prefix`` tokens, on random tokens), cu_seqlens [S+1],
    embedding [V, H], LM head [V, H]."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    input_ids = torch.randint(1, V, (total,), generator=generator)
    weights = torch.rand(total, generator=generator) * 2
    weights[torch.rand(total, generator=generator) < 0.3] = 0
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    # the collator's rule (verl's rolled loss_mask relies on it): a sample's first token is not learned
    weights[cu_seqlens[:-1]] = 1.25 if learn_first_tokens else 0.0
    weights[:zero_prefix] = 0
    if all_zero:
        weights.zero_()
    embedding = torch.randn(V, H, generator=generator)
    head = torch.randn(V, H, generator=generator) * 0.5
    return input_ids, weights, cu_seqlens, embedding, head


def single_process(input_ids, weights, cu_seqlens, embedding, head):
    """SP=1 reference, float64, sample by sample: loss = Σ_samples Σ w·l / Σ_samples Σ w[1:] (every id is a
    valid target); d loss/d hidden [T, H], d loss/d embedding, d loss/d head (float32), and the unweighted
    token losses [T] prediction-aligned like the hidden states (row k predicts token k+1; the last row of
    every sample predicts nothing)."""
    embedding, head = embedding.clone().requires_grad_(), head.clone().requires_grad_()
    hidden = embedding[input_ids]
    hidden.retain_grad()
    total, weight_sum, token_losses = 0.0, 0.0, []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        sample = reference_linear_cross_entropy(
            hidden[start:end],
            head,
            input_ids[start:end],
            weights[start:end],
            reduction="sum",
            shift=True,
            return_token_losses=True,
        )
        total = total + sample.loss
        weight_sum += weights[start + 1 : end].double().sum().item()
        token_losses.append(sample.token_losses)  # target-aligned: index 0 of each sample is 0
    loss = total / weight_sum if weight_sum > 0 else total * 0.0
    loss.backward()
    token_losses = torch.roll(torch.cat(token_losses), -1)  # -> prediction-aligned
    return loss.detach().float(), hidden.grad, embedding.grad, head.grad, token_losses.float()


def sharded(input_ids, weights, cu_seqlens, embedding, head, group, grad_reduction, normalizer=None):
    """This rank's SP computation: hidden shard from verl-sliced ids, mrloss-sharded targets/weights."""
    ulysses = verl_ulysses()
    size = dist.get_world_size(group)
    ulysses.set_ulysses_sequence_parallel_group(group)
    ids_shard, _, pad = ulysses.ulysses_pad_and_slice_inputs(input_ids[None], sp_size=size)
    # verl's own weight alignment (roll the packed mask by -1, then pad and slice) must equal ours
    verl_weights, _, _ = ulysses.ulysses_pad_and_slice_inputs(torch.roll(weights, -1)[None], sp_size=size, pad_value=0)
    ulysses.set_ulysses_sequence_parallel_group(None)
    targets_shard, weights_shard = shard_targets(input_ids, weights, group, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(weights_shard, verl_weights[0], atol=0, rtol=0)
    assert torch.equal(pad_and_slice(input_ids, group), ids_shard[0])
    embedding, head = embedding.clone().requires_grad_(), head.clone().requires_grad_()
    hidden_shard = embedding[ids_shard[0]]
    hidden_shard.retain_grad()
    output = sequence_parallel_linear_cross_entropy(
        hidden_shard,
        head,
        targets_shard,
        weights_shard,
        group=group,
        normalizer=normalizer,
        grad_reduction=grad_reduction,
        return_token_losses=True,
    )
    output.loss.backward()
    return output.loss.detach(), hidden_shard.grad, embedding.grad, head.grad, output.token_losses, pad


def reduce_grad(grad, op, group):
    grad = grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad / dist.get_world_size(group) if op == "mean" else grad


def check_against_single_process(case, group):
    """Loss and gradients of SP over ``group`` equal SP=1, for both gradient reductions; token losses
    gathered with verl's gather_outputs_and_unpad equal the single-process ones."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    ref_loss, ref_hidden_grad, ref_embedding_grad, ref_head_grad, ref_token_losses = single_process(*case)
    ref_hidden_shard_grad = pad_and_slice(ref_hidden_grad, group, dim=0)
    for grad_reduction in ("mean", "sum"):
        loss, hidden_grad, embedding_grad, head_grad, token_losses, pad = sharded(*case, group, grad_reduction)
        scale = size if grad_reduction == "mean" else 1
        torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(hidden_grad, ref_hidden_shard_grad * scale, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(reduce_grad(head_grad, grad_reduction, group), ref_head_grad, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            reduce_grad(embedding_grad, grad_reduction, group), ref_embedding_grad, atol=ATOL, rtol=RTOL
        )
    gathered = verl_ulysses().gather_outputs_and_unpad(
        token_losses, gather_dim=0, unpad_dim=0, padding_size=pad, group=group
    )
    torch.testing.assert_close(gathered, ref_token_losses, atol=ATOL, rtol=RTOL)
    return rank


def check_data_and_sequence_parallel(world_group, sp_group, dp_index, dp_size):
    """dp x sp (verl's layout): each SP group holds its own sequence; normalizer = global Σw / dp_size and
    grad_reduction="mean", then averaging gradients over ALL ranks (FSDP) gives the one-big-batch gradient."""
    cases = [make_case(100 + index, [13, 8, 10]) for index in range(dp_size)]
    embedding, head = cases[0][3], cases[0][4]  # one model for every data-parallel rank
    global_weights = sum(float(case[1].sum()) for case in cases)
    loss, _, embedding_grad, head_grad, _, _ = sharded(
        *cases[dp_index][:3], embedding, head, sp_group, "mean", normalizer=global_weights / dp_size
    )
    # reference: every sequence in one packed batch on one process
    packed_cu_seqlens, offset = [0], 0
    for case in cases:
        packed_cu_seqlens += [offset + int(end) for end in case[2][1:]]
        offset += case[0].numel()
    packed = (
        torch.cat([case[0] for case in cases]),
        torch.cat([case[1] for case in cases]),
        torch.tensor(packed_cu_seqlens),
        embedding,
        head,
    )
    ref_loss, _, ref_embedding_grad, ref_head_grad, _ = single_process(*packed)
    reported = loss.clone()
    dist.all_reduce(reported, group=world_group)  # verl: sum over micro-batches, AVG over dp
    torch.testing.assert_close(reported / dist.get_world_size(world_group), ref_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(reduce_grad(head_grad, "mean", world_group), ref_head_grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        reduce_grad(embedding_grad, "mean", world_group), ref_embedding_grad, atol=ATOL, rtol=RTOL
    )


def worker(rank, world_size, store_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        sp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        cases = {
            "uneven packed (pad)": make_case(1, [11, 9, 7, 10]),  # T=37: needs padding
            "zero-weight shard": make_case(2, [6, 9, 8, 5, 9], zero_prefix=20),  # leading shards learn nothing
            "single short sequence": make_case(3, [5]),  # shards of 1-2 tokens
            "all weights zero": make_case(4, [9, 8], all_zero=True),  # loss 0, grads 0
        }
        # SP=4: every rank; SP=2: two groups of 2 ranks side by side
        for sp_size, group in ((4, dist.group.WORLD), (2, sp_groups[rank // 2])):
            for name, case in cases.items():
                try:
                    check_against_single_process(case, group)
                except AssertionError as error:
                    raise AssertionError(f"SP={sp_size}, case {name!r}: {error}") from None
        check_data_and_sequence_parallel(dist.group.WORLD, sp_groups[rank // 2], rank // 2, 2)
        dist.barrier()  # no rank tears gloo down while a peer still talks (an abort at exit)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sequence_parallel_matches_single_process(tmp_path):
    """SP=2, SP=4 and dp=2 x sp=2 on 4 gloo ranks equal one process."""
    mp.spawn(worker, args=(4, str(tmp_path / "store")), nprocs=4, join=True)


def test_pad_and_slice_without_process_group():
    """No process group: one shard, the whole tensor; shift_targets ignores sample ends."""
    tensor = torch.arange(7)
    assert torch.equal(pad_and_slice(tensor), tensor)
    targets, weights = shift_targets(
        torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0.0, 1, 2, 0, 3]), cu_seqlens=torch.tensor([0, 3, 5])
    )
    assert targets.tolist() == [6, 7, -100, 9, -100]
    assert weights.tolist() == [1.0, 2.0, 0.0, 3.0, 0.0]


def test_sequence_parallel_loss_single_process_equals_mean():
    case = make_case(7, [10, 7])
    input_ids, weights, cu_seqlens, embedding, head = case
    targets, shifted = shift_targets(input_ids, weights, cu_seqlens=cu_seqlens)
    hidden = embedding[input_ids]
    expected = linear_cross_entropy(hidden, head, targets, shifted, reduction="mean")
    got = sequence_parallel_linear_cross_entropy(hidden, head, targets, shifted)
    torch.testing.assert_close(got, expected.float(), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="grad_reduction"):
        sequence_parallel_linear_cross_entropy(hidden, head, targets, shifted, grad_reduction="avg")
    with pytest.raises(ValueError, match="line up"):
        sequence_parallel_linear_cross_entropy(hidden[:-1], head, targets, shifted)
    with pytest.raises(ValueError, match="normalizer must be a finite number >= 0"):
        sequence_parallel_linear_cross_entropy(hidden, head, targets, shifted, normalizer=-2.0)


def test_sequence_parallel_loss_output_without_a_group_equals_the_fused_loss():
    """Every LossOutput field of the SP loss (z-loss normalized like the loss, per-token fields of the shard)
    equals the fused loss's with reduction "mean"; reduction and shift are the SP rule's own, not options."""
    input_ids, weights, cu_seqlens, embedding, head = make_case(9, [10, 7])
    targets, shifted = shift_targets(input_ids, weights, cu_seqlens=cu_seqlens)
    hidden = embedding[input_ids]
    flags = dict(return_token_losses=True, return_z_loss=True, return_token_metrics=True)
    expected = linear_cross_entropy(hidden, head, targets, shifted, z_loss_scale=0.02, **flags)
    got = sequence_parallel_linear_cross_entropy(hidden, head, targets, shifted, z_loss_scale=0.02, **flags)
    for name in ("loss", "z_loss", "token_losses"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name).float(), atol=ATOL, rtol=RTOL)
    assert torch.equal(got.token_metrics.accuracy, expected.token_metrics.accuracy) and got.z_loss > 0
    plain = sequence_parallel_linear_cross_entropy(hidden, head, targets, shifted, return_z_loss=False)
    assert isinstance(plain, torch.Tensor)
    for options in (dict(reduction="sum"), dict(shift=True)):
        with pytest.raises(ValueError, match="shards shifted before sharding"):
            sequence_parallel_linear_cross_entropy(hidden, head, targets, shifted, **options)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['vocab_group'\]"):
        sequence_parallel_linear_cross_entropy(hidden, head, targets, shifted, vocab_group=None)


def test_single_process_reference_matches_the_fused_loss():
    """The independent reference of the SP tests equals the fused loss on mrloss's shift rule, also where
    samples' first tokens carry weight (no sample may predict the next one's first token)."""
    case = make_case(8, [6, 11, 9], learn_first_tokens=True)
    input_ids, weights, cu_seqlens, embedding, head = case
    ref_loss, ref_hidden_grad, _, ref_head_grad, ref_token_losses = single_process(*case)
    targets, shifted = shift_targets(input_ids, weights, cu_seqlens=cu_seqlens)
    hidden, head = embedding[input_ids].requires_grad_(), head.requires_grad_()
    output = linear_cross_entropy(hidden, head, targets, shifted, return_token_losses=True)
    loss, token_losses = output.loss, output.token_losses
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(token_losses, ref_token_losses, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(hidden.grad, ref_hidden_grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head.grad, ref_head_grad, atol=ATOL, rtol=RTOL)
