"""The config's ``weighting:`` and ``monitor:`` sections inside verl's engine (``mrloss.loss=mrloss`` only).

`EngineRegionTools` is driven by the patched engine (`mrloss.integrations.verl.engine.patch_engine`); per
training step (one ``forward_backward_batch``, the step's whole batch of this data-parallel rank):

1. ``begin_step(data)``, before verl computes its normalizer: ``loss_mask`` (nested [B, j] fp32, target-aligned)
   becomes ``weighting.adjust(loss_mask, region_type_ids, region_types, epoch)``. verl then takes
   ``batch_num_tokens`` = Σ of the *adjusted* weights (all-reduced over data parallelism), and the loss of
   every micro-batch uses the same adjusted weights: value and normalizer stay consistent.
2. ``record_micro_batch(micro_batch, shard_losses, group)``, after each micro-batch's forward: the SP shards'
   unweighted token losses are all-gathered (N floats; no logits) and target-aligned, then
   `mrloss.metrics.region_statistics` (through ``monitor.log_batch_stats`` on rank 0) gives the
   per-type statistics; rank 0 writes them, like the HF path, to ``<monitor_dir>/region_stats.jsonl``.
3. ``end_step(dp_group)``: the step's per-type loss sums and learned-token counts are summed over the
   data-parallel group and their means fed to ``weighting.update`` (the next step's multipliers use them).

Accumulation, reduction, weighting update and checkpoint state are the shared region step tracker's
(`mrloss.weighting.tracker.RegionStepTracker`, as in the HF Trainer). Steps are verl's
``global_step`` (1-based); the epoch given to ``adjust`` is ``(step - 1) // steps_per_epoch + 1``.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from mrloss.parallel import group_size_and_rank
from mrloss.weighting.tracker import STATE_FILE as WEIGHTING_STATE_FILE  # noqa: F401  (public name here)
from mrloss.weighting.tracker import RegionStepTracker, all_reduce_sum


class EngineRegionTools:
    """Region weighting and monitor of one verl engine.

    region_types: names of the dataset's ``region_type_ids`` (``MultiRegionSFTDataset.region_types``);
    weighting: a `mrloss.weighting.RegionWeighting` (or None); monitor: a `MultiRegionTrainingMonitor` on
    global rank 0, None elsewhere. ``step`` (completed steps) and ``steps_per_epoch`` are set by the trainer
    before training (resume included).
    """

    def __init__(self, region_types, *, weighting=None, monitor=None) -> None:
        self.region_types = list(region_types)
        self.weighting = weighting if weighting is not None and weighting.enabled else None
        self.monitor = monitor
        self.step = 0
        self.steps_per_epoch: int | None = None
        self.training = False
        self.tracker = RegionStepTracker(self.region_types, weighting=self.weighting, monitor=monitor)

    @property
    def needs_token_losses(self) -> bool:
        """Whether the current forward must return token losses (training, with a monitor or a weighting)."""
        return self.training and (self.weighting is not None or self.monitor is not None)

    @property
    def epoch(self) -> int:
        return (self.step - 1) // self.steps_per_epoch + 1 if self.steps_per_epoch else 1

    def begin_step(self, data) -> None:
        """Start a training step: count it and put the weighting's adjusted weights into ``data["loss_mask"]``."""
        self.step += 1
        self.training = True
        self.tracker.step_sums.zero_()
        if "region_type_ids" not in data.keys():
            raise KeyError(
                "the verl batch has no 'region_type_ids': the mrloss weighting / monitor need "
                "data.custom_cls = mrloss.integrations.verl.dataset.MultiRegionSFTDataset"
            )
        if self.weighting is None:
            return
        loss_mask, region_type_ids = data["loss_mask"], data["region_type_ids"]
        adjusted = self.weighting.adjust(loss_mask.values(), region_type_ids.values(), self.region_types, self.epoch)
        data["loss_mask"] = torch.nested.nested_tensor_from_jagged(adjusted, loss_mask.offsets())

    def record_micro_batch(self, micro_batch, shard_losses: torch.Tensor, group=None) -> None:
        """Per-type statistics of one micro-batch from this rank's shifted token-loss shard [n_local] (SP
        shard of verl's padded packed sequence); every rank of the SP group must call it."""
        input_ids = micro_batch["input_ids"]
        token_losses = target_aligned_losses(shard_losses, input_ids.offsets(), group)
        token_weights = micro_batch["loss_mask"].values().float().to(token_losses.device)
        region_type_ids = micro_batch["region_type_ids"].values().to(token_losses.device)
        batch = {"token_weights": token_weights[None], "region_type_ids": region_type_ids[None]}
        self.tracker.record(self.tracker.statistics(batch, token_losses[None], self.step))

    def end_step(self, dp_group=None) -> None:
        """Feed the step's per-type mean token losses (summed over ``dp_group``) to the weighting."""
        self.training = False
        if self.weighting is None:
            return
        reduce = None if dp_group is None else functools.partial(all_reduce_sum, group=dp_group)
        self.tracker.update_weighting(reduce)


def target_aligned_losses(shard_losses: torch.Tensor, offsets: torch.Tensor, group=None) -> torch.Tensor:
    """Token losses of the packed sequence, target-aligned (index k = loss of predicting token k; 0 at each
    sample's first token) from this rank's shard of the shifted losses (`mrloss.parallel.shard_targets`
    layout: index k = loss of predicting token k+1, padded to a multiple of the group size and sliced).

    shard_losses [n_local] fp32 (detached); offsets [S+1] of the packed sequence; returns [offsets[-1]] fp32.
    """
    size, _ = group_size_and_rank(group)
    shifted = shard_losses.detach().float()
    if size > 1:
        shards = [torch.empty_like(shifted) for _ in range(size)]
        dist.all_gather(shards, shifted.contiguous(), group=group)
        shifted = torch.cat(shards)
    total = int(offsets[-1])
    token_losses = torch.zeros(total, dtype=torch.float32, device=shifted.device)
    token_losses[1:] = shifted[: total - 1]
    token_losses[offsets[:-1].to(shifted.device).long()] = 0.0  # nothing predicts a sample's first token
    return token_losses
