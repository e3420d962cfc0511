"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with the HF patch on CPU with gloo, against one process.

One spawned group of 4 ranks: FSDP over 2 ranks (two independent pairs, a (2, 2) mesh's "shard" dimension)
and over all 4. Each rank holds its own rows of one global batch; the normalizer is the global Σw and each
rank's loss is multiplied by the FSDP world size before backward (what ``MultiRegionTrainer`` /
``transformers.Trainer`` do), so FSDP's gradient average is the one-process gradient of the whole batch.
The layout is the usual one: ``fully_shard`` on each decoder layer, then on the root (lm_head in the root unit).

Tolerances: fp32 parameters atol 2e-6 / rtol 2e-5 (reduction order only). Mixed precision (bf16 parameters and
compute, fp32 gradient reduction, ``MixedPrecisionPolicy``) against the fp32 single process: loss within 2e-2
relative, each gradient within 5e-2 of its norm (||g - g_ref|| <= 0.05 ||g_ref|| + 1e-4; bf16 keeps 8 bits).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

V, T, ROWS_PER_RANK = 37, 10, 2
F32 = dict(atol=2e-6, rtol=2e-5)


def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).float()


def global_batch(world: int, seed: int, zero_rank: int | None):
    """input_ids / labels / token_weights [world * ROWS_PER_RANK, T]; the rows of ``zero_rank`` learn nothing."""
    generator = torch.Generator().manual_seed(seed)
    rows = world * ROWS_PER_RANK
    input_ids = torch.randint(0, V, (rows, T), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(rows, T, generator=generator) < 0.1] = -100
    weights = torch.rand(rows, T, generator=generator) * 2 * (torch.rand(rows, T, generator=generator) > 0.2)
    if zero_rank is not None:
        weights[zero_rank * ROWS_PER_RANK : (zero_rank + 1) * ROWS_PER_RANK] = 0
    return input_ids, labels, weights


def shard_model(model, mesh, reshard_after_forward: bool, mixed_precision: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy or MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def check_fsdp(mesh, *, tie, reshard_after_forward, mixed_precision=False, zero_rank=None, seed=0):
    from torch.distributed.tensor import DTensor

    from mrloss.integrations.hf import apply_mrloss
    from mrloss.ops.normalization import valid_weight_sum

    world, rank = mesh.size(), mesh.get_local_rank()
    input_ids, labels, weights = global_batch(world, seed, zero_rank)
    normalizer = valid_weight_sum(labels, weights).float()
    reference = apply_mrloss(tiny_llama(tie), backend="torch")
    ref_loss = reference(input_ids=input_ids, labels=labels, token_weights=weights, num_items_in_batch=normalizer).loss
    ref_loss.backward()

    model = shard_model(
        apply_mrloss(tiny_llama(tie), backend="torch", chunk_size=8), mesh, reshard_after_forward, mixed_precision
    )
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    loss = model(
        input_ids=input_ids[rows], labels=labels[rows], token_weights=weights[rows], num_items_in_batch=normalizer
    ).loss
    (loss * world).backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.get_group())
    where = f"FSDP over {world} ranks, tie={tie}, reshard_after_forward={reshard_after_forward}, bf16={mixed_precision}"
    grads = {
        name: (param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad).float()
        for name, param in model.named_parameters()
    }
    ref_grads = dict(reference.named_parameters())
    assert grads.keys() == ref_grads.keys(), where
    if not mixed_precision:
        torch.testing.assert_close(total, ref_loss.detach(), **F32, msg=lambda m: f"{where} loss: {m}")
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name].grad, **F32, msg=lambda m, n=name: f"{where} {n}: {m}")
        return
    assert abs(float(total) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss)), (where, float(total), float(ref_loss))
    for name, grad in grads.items():
        error, scale = (grad - ref_grads[name].grad).norm(), ref_grads[name].grad.norm()
        assert error <= 0.05 * scale + 1e-4, f"{where} {name}: |g - g_ref| = {error:.3g}, |g_ref| = {scale:.3g}"


def check_lm_head_alone_is_an_error(mesh):
    from torch.distributed.fsdp import fully_shard

    from mrloss.integrations.hf import apply_mrloss

    input_ids, labels, weights = global_batch(mesh.size(), 1, None)
    model = apply_mrloss(tiny_llama(False), backend="torch")
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with pytest.raises(ValueError, match="still sharded by fully_shard"):
        model(input_ids=input_ids[:2], labels=labels[:2], token_weights=weights[:2])


def worker(rank, world_size, store_path):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        pairs = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "shard"))["shard"]
        check_fsdp(pairs, tie=False, reshard_after_forward=True, zero_rank=1)
        check_fsdp(pairs, tie=True, reshard_after_forward=False, seed=1)
        check_lm_head_alone_is_an_error(pairs)
        world = init_device_mesh("cpu", (world_size,))
        check_fsdp(world, tie=True, reshard_after_forward=True, seed=2, zero_rank=3)
        check_fsdp(world, tie=False, reshard_after_forward=False, seed=3)
        check_fsdp(world, tie=False, reshard_after_forward=True, mixed_precision=True, seed=4)
        check_fsdp(world, tie=True, reshard_after_forward=False, mixed_precision=True, seed=5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_hf_patch_matches_single_process(tmp_path):
    """fully_shard over 2 and 4 gloo ranks: loss and every parameter's gradient equal one process (tied and
    untied embeddings, reshard_after_forward both ways, a rank with only zero-weight tokens, bf16 mixed
    precision within the stated tolerance), and an lm_head alone in its unit is a clear error."""
    mp.spawn(worker, args=(4, str(tmp_path / "store")), nprocs=4, join=True)
