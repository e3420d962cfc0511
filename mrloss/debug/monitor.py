"""MultiRegionTrainingMonitor: per-region-type statistics of each training batch, to JSONL / TensorBoard / wandb.

Statistics of one batch are those of `mrloss.metrics.region_statistics` (defined there: tokens,
learned_tokens, weight_sum, mean_loss and grad_share per region type, plus ``total``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch

from mrloss.metrics import (  # noqa: F401  (region_statistics & co.: also importable from here)
    OUTSIDE,
    batch_region_statistics,
    mean_region_losses,
    region_loss_sums,
    region_statistics,
)
from mrloss.ops.normalization import IGNORE_INDEX

STATS_FILE = "region_stats.jsonl"
BACKENDS = ("tensorboard", "wandb")


class MultiRegionTrainingMonitor:
    """Record per-region-type statistics of training batches.

    ``output_dir``: where ``region_stats.jsonl`` (one JSON object per ``log_batch_stats`` call) and, when
    enabled, the TensorBoard event files (``output_dir/tensorboard``) go; None keeps nothing on disk.
    ``region_types``: names of the batch's ``region_type_ids`` (the dataset's ``region_types``).
    ``report_to``: any of "tensorboard", "wandb"; each is used when its package is installed (wandb: when a
    run is active, ``wandb.run``), else a warning says it is skipped. Imports happen on first use.
    Under data parallelism give ``output_dir`` (and ``report_to``) on rank 0 only.
    """

    def __init__(
        self, output_dir=None, region_types: Sequence[str] | None = None, *, report_to: Sequence[str] = ()
    ) -> None:
        unknown = sorted(set(report_to) - set(BACKENDS))
        if unknown:
            raise ValueError(f"report_to: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.region_types = list(region_types) if region_types is not None else None
        self.report_to = tuple(report_to)
        self._backends: dict[str, object] = {}

    @property
    def stats_path(self) -> Path | None:
        return self.output_dir / STATS_FILE if self.output_dir is not None else None

    def log_batch_stats(
        self,
        batch: Mapping[str, torch.Tensor],
        step: int,
        token_losses: torch.Tensor | None = None,
        *,
        multipliers: Mapping[str, float] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> dict:
        """Statistics of one batch (collator output: ``token_weights``, ``region_type_ids``, optionally
        ``attention_mask`` and ``labels`` with ``ignore_index``), recorded and returned as
        ``{"step", "regions", "total"}`` plus ``"multipliers"`` (what the weighting tools did, region type ->
        factor) when given.

        token_losses: ``[B, T]``, target-aligned like token_weights (index k = loss of predicting input_ids[k]).
        """
        for key in ("token_weights", "region_type_ids"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)}); pass the MultiRegionCollator's output")
        region_types = self.region_types
        if region_types is None:
            largest = int(batch["region_type_ids"].max()) if batch["region_type_ids"].numel() else -1
            region_types = [f"type{i}" for i in range(largest + 1)]
        record = {
            "step": int(step),
            **batch_region_statistics(batch, region_types, token_losses, ignore_index),
        }
        if multipliers is not None:
            record["multipliers"] = {str(k): float(v) for k, v in multipliers.items()}
        self._write(record)
        return record

    @staticmethod
    def type_losses(record: Mapping) -> dict[str, float]:
        """``{region type: mean_loss}`` of a ``log_batch_stats`` record, for ``RegionWeighting.update``."""
        return {
            name: stats["mean_loss"]
            for name, stats in record["regions"].items()
            if name != OUTSIDE and stats.get("mean_loss") is not None
        }

    def _write(self, record: dict) -> None:
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.stats_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        if not self.report_to:
            return
        scalars = flat_scalars(record)
        tensorboard, wandb = self._backend("tensorboard"), self._backend("wandb")
        if tensorboard is not None:
            for tag, value in scalars.items():
                tensorboard.add_scalar(tag, value, record["step"])
        if wandb is not None and wandb.run is not None:
            wandb.log(scalars, step=record["step"])

    def _backend(self, name: str):
        """The TensorBoard SummaryWriter / the wandb module, created or imported on first use; None when not
        in ``report_to`` or not installed (warned once)."""
        if name not in self.report_to:
            return None
        if name not in self._backends:
            try:
                if name == "wandb":
                    import wandb as backend
                else:
                    import tensorboard  # noqa: F401  (SummaryWriter needs it)
                    from torch.utils.tensorboard import SummaryWriter

                    log_dir = self.output_dir / "tensorboard" if self.output_dir is not None else None
                    backend = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
            except ImportError:
                warnings.warn(
                    f"MultiRegionTrainingMonitor: report_to includes {name!r} but it is not installed; skipped",
                    stacklevel=4,
                )
                backend = None
            self._backends[name] = backend
        return self._backends[name]

    def log_trainer_logs(self, step: int, logs: Mapping) -> None:
        """Append the trainer's own log line (loss, learning rate, ...) as ``{"step", "trainer": logs}``."""
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            with open(self.stats_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": int(step), "trainer": numbers}) + "\n")

    def rewind(self, step: int) -> None:
        """Keep only what the first ``step`` optimizer steps recorded (a run resumed from checkpoint-``step``
        records the later steps again): batch records with ``step`` < ``step`` and trainer log lines with
        ``step`` <= ``step`` (the Trainer logs a step after it, batches carry the steps done before them)."""
        if self.stats_path is None or not self.stats_path.exists():
            return
        kept = []
        for line in self.stats_path.read_text(encoding="utf-8").splitlines(keepends=True):
            record = json.loads(line)
            if record["step"] < step or ("trainer" in record and record["step"] == step):
                kept.append(line)
        temporary = self.stats_path.with_name(f".{STATS_FILE}.tmp")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, self.stats_path)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (JSONL lines are written as they come)."""
        writer = self._backends.pop("tensorboard", None)
        if writer is not None:
            writer.close()

    def hf_callback(self):
        """A ``transformers.TrainerCallback`` that appends the Trainer's log lines (loss, learning rate) to the
        JSONL file and closes the monitor when training ends. The batch statistics themselves come from the
        training loop calling ``log_batch_stats`` (the callback never sees batches or token losses)."""
        from transformers import TrainerCallback

        monitor = self

        class MultiRegionMonitorCallback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and state.is_world_process_zero:
                    monitor.log_trainer_logs(state.global_step, logs)

            def on_train_end(self, args, state, control, **kwargs):
                monitor.close()

        return MultiRegionMonitorCallback()


def flat_scalars(record: Mapping) -> dict[str, float]:
    """``{"region/<type>/<stat>": value, "total/<stat>": value, "multiplier/<type>": value}`` of a record,
    None values left out: the names used for TensorBoard and wandb."""
    scalars = {
        f"region/{name}/{key}": value
        for name, stats in record["regions"].items()
        for key, value in stats.items()
        if value is not None
    }
    scalars.update({f"total/{key}": value for key, value in record["total"].items() if value is not None})
    scalars.update({f"multiplier/{name}": value for name, value in record.get("multipliers", {}).items()})
    return scalars
