"""Vocabulary-parallel loss (mrloss.parallel_vocab) on CPU with gloo: TP=2/4, uneven splits, TP x SP and
TP x DP meshes, a ColwiseParallel (DTensor) lm_head and transformers' tp_plan in the HF patch, against one process.

One spawned group of 4 ranks runs every case (process start-up dominates on a small machine). The oracle is
``mrloss.ops.reference`` in float64 on the whole head. Tolerances: float64 cases atol 1e-10 / rtol 1e-9 (the
shard reduction reorders float64 sums only); float32 cases (mesh, HF model) atol 2e-6 / rtol 2e-5.
"""

import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_causal_lm

from mrloss import linear_cross_entropy
from mrloss.ops.reference import reference_linear_cross_entropy
from mrloss.parallel import pad_and_slice, sequence_parallel_linear_cross_entropy, shard_targets
from mrloss.parallel_vocab import VocabParallelOptions, local_head, vocab_parallel_linear_cross_entropy

V, H = 29, 12
F64 = dict(atol=1e-10, rtol=1e-9)
F32 = dict(atol=2e-6, rtol=2e-5)
SPLITS = {2: [17, 12], 4: [9, 4, 11, 5]}  # uneven vocabulary rows per rank
OPTION_CASES = {
    "plain mean": dict(),
    "softcap + smoothing + bias": dict(softcap=3.0, label_smoothing=0.1, bias=True),
    "sum, shift": dict(reduction="sum", shift=True),
    "normalizer": dict(normalizer=7.5, label_smoothing=0.2),
    "none": dict(reduction="none", softcap=2.0),
    "z-loss": dict(z_loss_scale=0.05, label_smoothing=0.1),
}


def make_inputs(seed, shape=(3, 11), dtype=torch.float64, zero_range=None, all_zero=False):
    """hidden [*shape, H], weight [V, H], bias [V], targets (some ignored), weights (some 0): the same on every
    rank. zero_range (lo, hi): every target in [lo, hi) gets weight 0 (a vocabulary shard learns nothing)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=generator, dtype=dtype)
    weight = torch.randn(V, H, generator=generator, dtype=dtype) * 0.7
    bias = torch.randn(V, generator=generator, dtype=dtype) * 0.3
    targets = torch.randint(0, V, shape, generator=generator)
    targets[torch.rand(shape, generator=generator) < 0.15] = -100
    weights = torch.rand(shape, generator=generator, dtype=torch.float32) * 2
    weights[torch.rand(shape, generator=generator) < 0.2] = 0
    if zero_range is not None:
        weights[(targets >= zero_range[0]) & (targets < zero_range[1])] = 0
    if all_zero:
        weights.zero_()
    return hidden, weight, bias, targets, weights


def upstream_for(loss, seed):
    """A non-uniform upstream gradient for reduction "none", 1 otherwise."""
    if loss.dim() == 0:
        return torch.ones_like(loss)
    return torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype) + 0.5


def check_vocab_parallel(inputs, group, sizes, options, gather_offsets):
    """Loss, hidden gradient and weight / bias shard gradients of the vocabulary-parallel loss equal the
    float64 reference on the whole head."""
    hidden, weight, bias, targets, weights = inputs
    options = dict(options)
    use_bias = options.pop("bias", False)
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]

    ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_bias = bias.clone().requires_grad_() if use_bias else None
    reference = reference_linear_cross_entropy(
        ref_hidden, ref_weight, targets, weights, bias=ref_bias, return_token_losses=True, **options
    )
    ref_loss, ref_token_losses = reference.loss, reference.token_losses
    (ref_loss * upstream_for(ref_loss, 5)).sum().backward()

    shard_hidden = hidden.clone().requires_grad_()
    shard_weight = weight[start:stop].clone().requires_grad_()
    shard_bias = bias[start:stop].clone().requires_grad_() if use_bias else None
    shard = VocabParallelOptions(group) if gather_offsets else VocabParallelOptions(group, start, V)
    output = vocab_parallel_linear_cross_entropy(
        shard_hidden,
        shard_weight,
        targets,
        weights,
        vocab_parallel=shard,
        bias=shard_bias,
        chunk_size=5,
        return_token_losses=True,
        **options,
    )
    loss, token_losses = output.loss, output.token_losses
    (loss * upstream_for(loss, 5)).sum().backward()
    torch.testing.assert_close(loss, ref_loss, **F64)
    torch.testing.assert_close(token_losses.double(), ref_token_losses, atol=1e-6, rtol=1e-6)  # fp32 output
    torch.testing.assert_close(shard_hidden.grad, ref_hidden.grad, **F64)
    torch.testing.assert_close(shard_weight.grad, ref_weight.grad[start:stop], **F64)
    if use_bias:
        torch.testing.assert_close(shard_bias.grad, ref_bias.grad[start:stop], **F64)
    with torch.no_grad():  # token metrics (accuracy, entropy) from the shards' reduced row statistics
        full_bias = bias if use_bias else None
        expected = linear_cross_entropy(hidden, weight, targets, weights, bias=full_bias, **options,
                                        backend="torch", return_token_metrics=True).token_metrics  # fmt: skip
        metrics = vocab_parallel_linear_cross_entropy(
            hidden, weight[start:stop], targets, weights, vocab_parallel=shard, bias=shard_bias, chunk_size=5,
            return_token_metrics=True, **options,
        ).token_metrics  # fmt: skip
    assert torch.equal(metrics.accuracy, expected.accuracy)
    torch.testing.assert_close(metrics.entropy, expected.entropy, atol=1e-6, rtol=1e-6)


def check_tensor_parallel(group, tp):
    sizes = SPLITS[tp]
    rank = dist.get_rank(group)
    second = (sum(sizes[:1]), sum(sizes[:2]))  # rank 1's vocabulary rows
    cases = {name: (make_inputs(10 + index), options) for index, (name, options) in enumerate(OPTION_CASES.items())}
    cases["rank 1's shard: only zero-weight targets"] = (make_inputs(20, zero_range=second), {"softcap": 4.0})
    cases["all weights zero"] = (make_inputs(21, all_zero=True), {})
    for index, (name, (inputs, options)) in enumerate(cases.items()):
        try:
            check_vocab_parallel(inputs, group, sizes, options, gather_offsets=index % 2 == 1)
        except AssertionError as error:
            raise AssertionError(f"TP={tp} rank {rank}, case {name!r}: {error}") from None


def check_mesh(mesh, seed):
    """dp x sp x tp (any of them 1): each dp rank holds its own packed rows, sharded over sp, the head split by
    vocabulary over tp; normalizer = global Σw / dp and grad_reduction "mean", so the mean of the gradients over
    the dp*sp ranks of one tp index (what FSDP / DDP does there) equals one process on all the data."""
    dp, sp, tp = mesh.shape
    coordinate = mesh.get_coordinate()
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(V, H, generator=generator)
    head = torch.randn(V, H, generator=generator) * 0.5
    sequences = [torch.randint(0, V, (23,), generator=generator) for _ in range(dp)]
    weights = [torch.rand(23, generator=generator) * 2 * (torch.rand(23, generator=generator) > 0.3) for _ in range(dp)]
    weights[0][:14] = 0  # the first sequence shard(s) learn nothing
    global_weight_sum = sum(float(w[1:].sum()) for w in weights)

    # reference: every sequence, whole head, one process (fp64)
    ref_embedding, ref_head = embedding.double().requires_grad_(), head.double().requires_grad_()
    ref_total = sum(
        reference_linear_cross_entropy(ref_embedding[ids], ref_head, ids, w, reduction="sum", shift=True)
        for ids, w in zip(sequences, weights)
    )
    ref_loss = ref_total / global_weight_sum
    ref_loss.backward()

    ids, w = sequences[coordinate[0]], weights[coordinate[0]]
    sp_group, tp_group = mesh.get_group("sp"), mesh.get_group("tp")
    start, stop = (V * coordinate[2]) // tp, (V * (coordinate[2] + 1)) // tp
    local_embedding = embedding.clone().requires_grad_()
    local_head = head[start:stop].clone().requires_grad_()
    targets_shard, weights_shard = shard_targets(ids, w, sp_group)
    loss = sequence_parallel_linear_cross_entropy(
        local_embedding[pad_and_slice(ids, sp_group)],
        local_head,
        targets_shard,
        weights_shard,
        group=sp_group,
        normalizer=global_weight_sum / dp,
        vocab_parallel=VocabParallelOptions(tp_group, start, V),
        chunk_size=4,
    )
    loss.backward()
    return loss, local_embedding.grad, local_head.grad, ref_loss, ref_embedding.grad, ref_head.grad[start:stop]


def mean_over(tensor, group):
    tensor = tensor.clone()
    dist.all_reduce(tensor, group=group)
    return tensor / dist.get_world_size(group)


def check_meshes():
    from torch.distributed.device_mesh import init_device_mesh

    for shape in ((1, 2, 2), (2, 1, 2), (2, 2, 1)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "sp", "tp"))
        coordinate = mesh.get_coordinate()
        # the dp x sp ranks of each tp index (new_group is collective: every rank creates all of them)
        groups = [dist.new_group([int(r) for r in mesh.mesh[:, :, t].flatten()]) for t in range(shape[2])]
        data_group = groups[coordinate[2]]
        loss, embedding_grad, head_grad, ref_loss, ref_embedding_grad, ref_head_grad = check_mesh(mesh, seed=31)
        try:
            torch.testing.assert_close(mean_over(loss.detach(), data_group).double(), ref_loss.detach(), **F32)
            torch.testing.assert_close(mean_over(embedding_grad, data_group).double(), ref_embedding_grad, **F32)
            torch.testing.assert_close(mean_over(head_grad, data_group).double(), ref_head_grad, **F32)
        except AssertionError as error:
            raise AssertionError(f"mesh dp x sp x tp = {shape}, coordinate {coordinate}: {error}") from None


def tiny_llama(tie=False):
    return tiny_causal_lm(
        V,
        hidden_size=16,
        intermediate_size=24,
        num_key_value_heads=4,  # transformers' tp_plan "auto" over 4 ranks splits the kv heads too
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )


def check_hf_colwise_lm_head(tp_group_mesh):
    """apply_mrloss on a Llama whose lm_head is ColwiseParallel (a DTensor Shard(0), uneven: V=29 over 4
    ranks is 8/8/8/5): loss and every parameter's gradient equal the unsharded model's."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from mrloss.integrations.hf import apply_mrloss

    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, V, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100
    token_weights = torch.rand(2, 9, generator=generator) * 2
    reference = apply_mrloss(tiny_llama(), backend="torch")
    ref_loss = reference(input_ids=input_ids, labels=labels, token_weights=token_weights).loss
    ref_loss.backward()

    model = tiny_llama()
    parallelize_module(model, tp_group_mesh, {"lm_head": ColwiseParallel()})
    assert isinstance(model.lm_head.weight, DTensor)
    apply_mrloss(model, backend="torch", chunk_size=4)
    loss = model(input_ids=input_ids, labels=labels, token_weights=token_weights).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **F32)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        torch.testing.assert_close(grad, ref_param.grad, **F32, msg=lambda m, name=name: f"grad {name}: {m}")


def load_tensor_parallel(model_class, model_dir, mesh):
    """``model_class`` from ``model_dir`` split over ``mesh`` (the whole world) by transformers' own tensor
    parallelism, the way the installed release loads it: ``distributed_config=DistributedConfig(tp_size=...)``
    where that config has ``tp_size`` (the model's plan, lm_head "colwise_gather_output" included; parameters are
    DTensors), else ``tp_plan=...`` with ``device_mesh`` (5.10: plain local tensors; its "auto" leaves lm_head
    whole, so the plan is passed with lm_head's rule)."""
    from transformers.distributed import DistributedConfig

    if "tp_size" in inspect.signature(DistributedConfig).parameters:
        return model_class.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_size=mesh.size()))
    base_plan = model_class.config_class.base_model_tp_plan
    plan = {**{f"model.{key}": style for key, style in base_plan.items()}, "lm_head": "colwise_gather_output"}
    return model_class.from_pretrained(model_dir, tp_plan=plan, device_mesh=mesh)


def check_hf_tp_plan(model_dir, mesh):
    """transformers' own tensor parallelism (`load_tensor_parallel`) with the model's plan (attention and MLP
    col/rowwise) and its ForCausalLM plan for lm_head ("colwise_gather_output"), cut at ceil(size / tp) (lm_head:
    8/8/8/5 rows). apply_mrloss routes the head to the vocabulary-parallel loss; the loss and every parameter's
    local gradient equal the unsharded model's (sliced the same way)."""
    from torch.distributed.tensor import DTensor
    from transformers import LlamaForCausalLM

    from mrloss.integrations.hf import apply_mrloss

    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, V, (2, 9), generator=generator)
    token_weights = torch.rand(2, 9, generator=generator) * 2
    reference = apply_mrloss(LlamaForCausalLM.from_pretrained(model_dir), backend="torch")
    ref_loss = reference(input_ids=input_ids, labels=input_ids, token_weights=token_weights).loss
    ref_loss.backward()
    model = load_tensor_parallel(LlamaForCausalLM, model_dir, mesh)
    tp, rank = mesh.size(), mesh.get_local_rank()
    rows = -(-V // tp)
    weight, _, vocab_parallel = local_head(model.lm_head, V)
    assert vocab_parallel.vocab_start == rank * rows and vocab_parallel.vocab_size == V
    assert weight.shape[0] == (rows if rank < tp - 1 else V - (tp - 1) * rows)
    apply_mrloss(model, chunk_size=4)
    loss = model(input_ids=input_ids, labels=input_ids, token_weights=token_weights).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, **F32)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        expected = ref_param.grad
        for dim in range(grad.dim()):  # the rank's slice of a sharded dimension
            if grad.shape[dim] != expected.shape[dim]:
                expected = expected.narrow(dim, rank * -(-expected.shape[dim] // tp), grad.shape[dim])
        torch.testing.assert_close(grad, expected, **F32, msg=lambda m, name=name: f"grad {name}: {m}")


def worker(rank, world_size, store_path, model_dir):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # transformers' tp_plan loading reads it
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        check_tensor_parallel(dist.group.WORLD, 4)
        check_tensor_parallel(pairs[rank // 2], 2)
        check_meshes()
        mesh = init_device_mesh("cpu", (world_size,))
        check_hf_colwise_lm_head(mesh)
        check_hf_tp_plan(model_dir, mesh)
        dist.barrier()  # no rank tears gloo down while a peer still talks (an abort at exit)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_matches_single_process(tmp_path):
    """TP=4 and TP=2 (uneven splits, every option), dp x sp x tp meshes, and an HF lm_head split by
    ColwiseParallel (DTensor) and in a transformers tp_plan model, on 4 gloo ranks, equal one process."""
    tiny_llama().save_pretrained(tmp_path / "model")
    mp.spawn(worker, args=(4, str(tmp_path / "store"), str(tmp_path / "model")), nprocs=4, join=True)


def test_without_a_group_equals_the_fused_loss():
    hidden, weight, bias, targets, weights = make_inputs(1, dtype=torch.float32)
    options = dict(softcap=2.5, label_smoothing=0.1, shift=True)
    expected = linear_cross_entropy(hidden, weight, targets, weights, bias=bias, backend="torch", **options)
    got = vocab_parallel_linear_cross_entropy(hidden, weight, targets, weights, bias=bias, **options)
    torch.testing.assert_close(got, expected)


def test_bad_arguments_are_clear_errors():
    hidden, weight, _, targets, weights = make_inputs(2)
    with pytest.raises(ValueError, match="give both or neither"):
        VocabParallelOptions(vocab_start=0)
    with pytest.raises(ValueError, match=r"not inside the vocabulary \[0, 20\)"):
        shard = VocabParallelOptions(vocab_start=0, vocab_size=20)
        vocab_parallel_linear_cross_entropy(hidden, weight, targets, weights, vocab_parallel=shard)
    with pytest.raises(ValueError, match="must be the whole head"):
        shard = VocabParallelOptions(vocab_start=0, vocab_size=V)
        vocab_parallel_linear_cross_entropy(hidden, weight[:20], targets, weights, vocab_parallel=shard)
    bad = targets.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"outside \[0, V=29\)"):
        vocab_parallel_linear_cross_entropy(hidden, weight, bad, weights)
    with pytest.raises(ValueError, match="row statistics in PyTorch"):
        vocab_parallel_linear_cross_entropy(hidden, weight, targets, weights, backend="triton")
