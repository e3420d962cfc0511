"""mrloss as the loss of verl's FSDP engine (``FSDPEngineWithLMHead``), computed from hidden states.

verl's own SFT step: the model returns logits, the engine turns them into per-token log-probs (gathering
them over the Ulysses group), and ``verl.workers.utils.losses.sft_loss`` returns
``-Σ logp·roll(loss_mask, -1) / batch_num_tokens * dp_size``. With the patches below, on every micro-batch:

1. ``prepare_model_inputs`` (verl's, then ours): shift ``input_ids`` / ``loss_mask`` over the whole packed
   micro-batch (`mrloss.parallel.shift_targets`, sample ends ignored), pad like verl (its SP + static
   pad) and keep this rank's shard (`mrloss.parallel.pad_and_slice`); they reach the model as one
   non-tensor ``mrloss_shard`` keyword (FSDP's input casting leaves it alone: weights stay fp32).
2. the model's forward (an instance patch): decoder body -> hidden [1, n_local, H] ->
   `mrloss.parallel.sequence_parallel_linear_cross_entropy` with ``lm_head.weight``, inside the FSDP
   forward where the weight is unsharded. No logits; zero-weight tokens are skipped by the fused loss.
3. ``prepare_model_outputs`` passes that loss on; ``mrloss_sft_loss`` (the ``set_loss_fn`` function)
   returns it.
With ``region_tools`` (`mrloss.integrations.verl.region_tools.EngineRegionTools`: the config's weighting and
monitor), ``forward_backward_batch`` of a training step first adjusts ``loss_mask`` (before verl sums it into
``batch_num_tokens``), the forward also returns the shard's token losses, ``prepare_model_outputs`` hands them
to the tools, and the step ends with the weighting's update.

Scale: normalizer = batch_num_tokens / dp_size (batch_num_tokens = Σ loss_mask of the step, all-reduced
over the data-parallel group by the engine) and grad_reduction="mean", so the value equals verl's
``sft_loss`` and the gradients after FSDP's average over dp*sp ranks are those of Σw·l / Σw.
Requires ``model.use_remove_padding=True`` and ``data.pad_mode=no_padding`` (verl's FSDP SFT path).
"""

from __future__ import annotations

import types

import torch

from mrloss.integrations.heads import check_loss_options, head_loss, model_head, unwrap_causal_lm
from mrloss.ops.normalization import IGNORE_INDEX
from mrloss.parallel import pad_and_slice, sequence_parallel_linear_cross_entropy, shift_targets

LOSS_KEY = "mrloss_loss"
SHARD_KWARG = "mrloss_shard"


class ShardBatch:
    """This rank's loss inputs for one micro-batch: targets [n_local] int64, token_weights [n_local] fp32,
    normalizer (float), group (the SP group or None). A plain object on purpose: FSDP casts floating
    tensors found in forward arguments (also inside dataclasses) to the parameter dtype.

    ``keep_token_losses``: the forward stores this shard's detached token losses [n_local] in ``token_losses``.
    """

    __slots__ = ("targets", "token_weights", "normalizer", "group", "keep_token_losses", "token_losses")

    def __init__(self, targets, token_weights, normalizer, group):
        self.targets, self.token_weights, self.normalizer, self.group = targets, token_weights, normalizer, group
        self.keep_token_losses, self.token_losses = False, None


def mrloss_sft_loss(config, model_output, data, dp_group=None):
    """Loss function for ``TrainingWorker.set_loss_fn`` (signature of verl's ``sft_loss``): returns the
    loss the patched forward computed for this micro-batch, and no extra metrics."""
    if LOSS_KEY not in model_output:
        raise RuntimeError("mrloss_sft_loss needs the engine patched by mrloss.integrations.verl.engine.patch_engine")
    return model_output.pop(LOSS_KEY), {}


def shard_micro_batch(micro_batch, pad_size: int, group, *, ignore_index: int = IGNORE_INDEX) -> ShardBatch:
    """ShardBatch of a no_padding micro-batch (nested ``input_ids`` / ``loss_mask`` [B, j]): shift over the
    packed sequence, append ``pad_size`` ignored positions (verl's SP + static pad), take this rank's slice."""
    from verl.utils import tensordict_utils as tu

    input_ids, loss_mask = micro_batch["input_ids"], micro_batch["loss_mask"]
    targets, weights = shift_targets(
        input_ids.values(), loss_mask.values().float(), ignore_index=ignore_index, cu_seqlens=input_ids.offsets()
    )
    if pad_size:
        targets = torch.cat([targets, targets.new_full((pad_size,), ignore_index)])
        weights = torch.cat([weights, weights.new_zeros(pad_size)])
    batch_num_tokens = tu.get_non_tensor_data(data=micro_batch, key="batch_num_tokens", default=None)
    dp_size = tu.get_non_tensor_data(data=micro_batch, key="dp_size", default=1)
    normalizer = None if batch_num_tokens is None else float(batch_num_tokens) / float(dp_size)
    return ShardBatch(
        pad_and_slice(targets, group, pad_value=ignore_index), pad_and_slice(weights, group), normalizer, group
    )


def patch_causal_lm_forward(model, loss_options: dict | None = None):
    """Give ``model`` (an HF causal LM instance, or a PEFT model around one) a forward that, when called with
    ``mrloss_shard=``, runs the decoder body and returns ``CausalLMOutputWithPast(loss=...)`` computed with
    mrloss from the hidden states (no logits; the architecture's hidden scale and softcap from
    `mrloss.integrations.heads`); without it, the original forward runs. Returns the model.

    loss_options: any of `mrloss.integrations.heads.LOSS_OPTIONS` (``ignore_index`` has no effect: the
    targets are built here from ``loss_mask``, with ``IGNORE_INDEX``).
    Raises TypeError for an architecture not in ``SUPPORTED_ARCHITECTURES``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    options = check_loss_options(loss_options, caller="mrloss verl engine")
    options.pop("ignore_index", None)
    causal_lm = unwrap_causal_lm(model)
    head = model_head(causal_lm, options.pop("softcap", None), caller="mrloss verl engine")
    original_forward = model.forward

    def forward(self, *args, mrloss_shard: ShardBatch | None = None, **kwargs):
        if mrloss_shard is None:
            return original_forward(*args, **kwargs)
        for unused in ("labels", "logits_to_keep", "return_dict", "temperature", "shift_labels"):
            kwargs.pop(unused, None)
        hidden = causal_lm.get_decoder()(*args, **kwargs)[0]  # [1, n_local, H]
        if hidden.shape[0] != 1 or hidden.shape[1] != mrloss_shard.targets.shape[0]:
            raise ValueError(
                f"hidden states {tuple(hidden.shape)} do not match the mrloss shard of "
                f"{mrloss_shard.targets.shape[0]} tokens (needs use_remove_padding=True)"
            )
        output = head_loss(
            causal_lm,
            head,
            hidden[0],
            sequence_parallel_linear_cross_entropy,
            mrloss_shard.targets.to(hidden.device),
            mrloss_shard.token_weights.to(hidden.device),
            caller="mrloss verl engine",
            group=mrloss_shard.group,
            normalizer=mrloss_shard.normalizer,
            grad_reduction="mean",
            return_token_losses=mrloss_shard.keep_token_losses,
            **options,
        )
        loss = output
        if mrloss_shard.keep_token_losses:  # a LossOutput
            loss, mrloss_shard.token_losses = output.loss, output.token_losses
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return model


def patch_engine(engine, loss_options: dict | None = None, region_tools=None):
    """Patch one ``FSDPEngineWithLMHead`` instance (before ``initialize``): its model gets the mrloss
    forward, its micro-batches the mrloss shard, its outputs the mrloss loss; with ``region_tools``
    (`EngineRegionTools`) its training steps also apply the weighting and feed the monitor. Returns the engine."""
    from verl.utils import tensordict_utils as tu

    if getattr(engine.model_config, "use_fused_kernels", False):
        raise ValueError("mrloss replaces verl's fused kernels: set model.use_fused_kernels=False")
    original_build_module = engine._build_module
    original_prepare_inputs = engine.prepare_model_inputs
    original_forward_backward = engine.forward_backward_batch

    def build_module():
        return patch_causal_lm_forward(original_build_module(), loss_options)

    def prepare_model_inputs(micro_batch):
        if not tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            raise ValueError("the mrloss verl loss needs model.use_remove_padding=True")
        model_inputs, output_args = original_prepare_inputs(micro_batch)
        shard = shard_micro_batch(micro_batch, int(output_args.get("pad_size", 0)), engine.ulysses_parallel_group)
        shard.keep_token_losses = region_tools is not None and region_tools.needs_token_losses
        model_inputs[SHARD_KWARG] = output_args[SHARD_KWARG] = shard
        return model_inputs, output_args

    def prepare_model_outputs(output, output_args, micro_batch, logits_processor_func):
        shard = output_args[SHARD_KWARG]
        if shard.token_losses is not None:
            region_tools.record_micro_batch(micro_batch, shard.token_losses, shard.group)
        return {LOSS_KEY: output.loss}

    def forward_backward_batch(data, loss_function, forward_only=False):
        if region_tools is None or forward_only:
            return original_forward_backward(data, loss_function, forward_only=forward_only)
        region_tools.begin_step(data)
        output = original_forward_backward(data, loss_function, forward_only=False)
        region_tools.end_step(engine.get_data_parallel_group())  # a collective: not run after a failed step
        return output

    engine._build_module = build_module
    engine.prepare_model_inputs = prepare_model_inputs
    engine.prepare_model_outputs = prepare_model_outputs
    engine.forward_backward_batch = forward_backward_batch
    return engine
