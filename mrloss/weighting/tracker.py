"""RegionStepTracker: the one per-region step loop shared by the HF Trainer and verl's engine.

Per optimizer step: ``statistics`` of every micro-batch (`mrloss.metrics.region_statistics`, or the monitor's
``log_batch_stats`` where a monitor records them) are *accumulated* (`record`: loss sum and learned-token count
per region type), *reduced* over ranks (`all_reduce_sum`), and their means *update* the weighting
(`update_weighting`); the weighting's *state* and the step sums still waiting for the next update go next to
every checkpoint (`save_state` / `load_state`, file ``STATE_FILE``), so a resumed run continues bit-identically.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from mrloss.metrics import batch_region_statistics, mean_region_losses, region_loss_sums
from mrloss.ops.normalization import IGNORE_INDEX

STATE_FILE = "mrloss_weighting.pt"


def all_reduce_sum(tensor: torch.Tensor, group=None, device=None) -> torch.Tensor:
    """Sum of a small CPU tensor over the ranks of ``group`` (None: all ranks; itself when not distributed);
    returns a CPU tensor. ``device``: where the collective runs (None: the CPU for gloo, else the accelerator)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    if device is None:
        device = "cpu" if dist.get_backend(group) == "gloo" else torch.accelerator.current_accelerator()
    on_device = tensor.to(device, copy=True)  # never reduce ``tensor`` itself in place (CPU / gloo)
    dist.all_reduce(on_device, group=group)
    return on_device.cpu()


class RegionStepTracker:
    """Accumulate -> reduce -> update weighting -> state for checkpoints, for one training run.

    region_types: names of the batches' ``region_type_ids``; weighting: an object with ``update(type_losses)``,
    ``multipliers()``, ``state_dict()`` / ``load_state_dict()`` (e.g. `mrloss.weighting.RegionWeighting`) or
    None; monitor: a `mrloss.debug.MultiRegionTrainingMonitor` (or an object with its ``log_batch_stats``) on the
    rank that records, else None.
    """

    def __init__(
        self, region_types: Sequence[str], *, weighting=None, monitor=None, ignore_index: int = IGNORE_INDEX
    ) -> None:
        self.region_types = list(region_types)
        self.weighting = weighting
        self.monitor = monitor
        self.ignore_index = ignore_index
        self.step_sums = torch.zeros(2, len(self.region_types), dtype=torch.float64)  # loss sum, learned tokens

    # -- accumulate ---------------------------------------------------------------------------------
    def statistics(self, batch: Mapping[str, torch.Tensor], token_losses: torch.Tensor, step: int) -> dict:
        """The `region_statistics` record of one micro-batch (``token_weights``, ``region_type_ids``, optionally
        ``attention_mask`` and ``labels``); with a monitor, recorded by it (``log_batch_stats``, with the
        weighting's multipliers) and returned."""
        if self.monitor is not None:
            multipliers = self.weighting.multipliers() if self.weighting is not None else None
            return self.monitor.log_batch_stats(
                batch, step, token_losses, multipliers=multipliers, ignore_index=self.ignore_index
            )
        return batch_region_statistics(batch, self.region_types, token_losses, self.ignore_index)

    def record(self, record: Mapping) -> torch.Tensor:
        """Add a record's per-type loss sums to the step's; returns them (``[2, types]`` float64, CPU)."""
        sums = region_loss_sums(record, self.region_types)
        self.step_sums += sums
        return sums

    # -- reduce + update ----------------------------------------------------------------------------
    def update_weighting(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """End of a step: sum the step's statistics over ranks (``reduce``; None: this rank only), feed their
        per-type means to the weighting and start the next step's sums."""
        if self.weighting is None or not self.region_types:
            self.step_sums.zero_()
            return
        stats = self.step_sums.clone() if reduce is None else reduce(self.step_sums)
        self.step_sums.zero_()
        type_losses = mean_region_losses(stats, self.region_types)
        if type_losses:
            self.weighting.update(type_losses)

    # -- checkpoint state ---------------------------------------------------------------------------
    def save_state(self, directory) -> None:
        """Write ``{"weighting": its state_dict, "step_sums": the sums of the step not yet fed to it}`` to
        ``directory/STATE_FILE`` (nothing without a weighting). A checkpoint is written after its step's micro-batches
        were recorded and before the next step's ``update_weighting``: those sums are part of the state."""
        if self.weighting is not None:
            state = {"weighting": self.weighting.state_dict(), "step_sums": self.step_sums.clone()}
            torch.save(state, os.path.join(directory, STATE_FILE))

    def load_state(self, directory) -> bool:
        """Restore the weighting's state and the pending step sums from ``directory/STATE_FILE`` when there is
        one; whether it was."""
        if self.weighting is None:
            return False
        state_file = os.path.join(directory, STATE_FILE)
        if not os.path.exists(state_file):
            return False
        state = torch.load(state_file, weights_only=True)
        if "step_sums" not in state:  # written before the pending sums were saved: the weighting's state alone
            state = {"weighting": state, "step_sums": torch.zeros_like(self.step_sums)}
        self.weighting.load_state_dict(state["weighting"])
        if state["step_sums"].shape != self.step_sums.shape:
            raise ValueError(
                f"{state_file}: step sums of {state['step_sums'].shape[1]} region types, but this run has "
                f"{len(self.region_types)} ({self.region_types})"
            )
        self.step_sums.copy_(state["step_sums"])
        return True
