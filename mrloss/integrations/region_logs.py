"""Per-region-type log statistics of the HF Trainer (`mrloss.integrations.hf.MultiRegionTrainer`, and so TRL's):
what one log (training logs, or an evaluation's metrics) reports per region type."""

from __future__ import annotations

import torch

from mrloss.metrics import batch_region_statistics, mean_region_losses, region_loss_sums
from mrloss.ops.normalization import IGNORE_INDEX, valid_weight_sum
from mrloss.weighting.tracker import all_reduce_sum

TOKEN_METRICS = {"mean_token_accuracy": "token_accuracy", "entropy": "token_entropy"}  # log name: output field


class RegionLogStats:
    """What a log reports per region type, summed since it was last popped: row 0 the Σ and row 1 the count over
    learned tokens of the token loss (``losses [2, types]``) and of each token metric (``metrics[name] [2, types
    + 1]``, TRL's names `TOKEN_METRICS`; last column: every learned token). float64, CPU.

    ``overall_loss`` (evaluation): also the weighted mean loss Σw·l/Σw of everything added (``weighted [2, 1]``:
    Σ of each batch's loss times its Σw -- the normalizer `valid_weight_sum` the model divided by -- and Σ of those
    Σw), the same for any batch size; 0 when nothing is learned (the loss's own rule)."""

    def __init__(self, region_types, ignore_index: int = IGNORE_INDEX, *, overall_loss: bool = False):
        self.region_types, self.ignore_index, self.overall_loss = list(region_types), ignore_index, overall_loss
        self.losses = torch.zeros(2, len(self.region_types), dtype=torch.float64)
        self.metrics = {name: torch.zeros(2, len(self.region_types) + 1, dtype=torch.float64) for name in TOKEN_METRICS}
        self.weighted = torch.zeros(2, 1, dtype=torch.float64)

    def add(self, batch, outputs, loss_sums: torch.Tensor | None = None) -> None:
        """Add one micro-batch: its per-type loss sums (`mrloss.metrics.region_loss_sums`; None: from
        ``outputs.token_losses`` here) and the token metrics of ``outputs`` (`mrloss.metrics.region_statistics`, the
        metric in place of the loss)."""
        if loss_sums is None:
            loss_sums = region_loss_sums(self._statistics(batch, outputs.token_losses), self.region_types)
        self.losses += loss_sums
        if self.overall_loss:
            weight_sum = valid_weight_sum(batch["labels"], batch["token_weights"], self.ignore_index).cpu()
            self.weighted += torch.stack([outputs.loss.detach().double().cpu() * weight_sum, weight_sum])[:, None]
        for name, attribute in TOKEN_METRICS.items():
            if getattr(outputs, attribute) is None:  # a step that does not log: not computed
                continue
            record = self._statistics(batch, getattr(outputs, attribute))
            total = record["total"]
            overall = torch.tensor([[(total["mean_loss"] or 0.0) * total["learned_tokens"]], [total["learned_tokens"]]])
            self.metrics[name] += torch.cat([region_loss_sums(record, self.region_types), overall], dim=1)

    def _statistics(self, batch, token_values) -> dict:
        return batch_region_statistics(batch, self.region_types, token_values, self.ignore_index)

    def pop_logs(self, prefix: str, device) -> dict[str, float]:
        """``{prefix}loss`` (with ``overall_loss``), ``{prefix}loss/<type>``, ``{prefix}<metric>`` and
        ``{prefix}<metric>/<type>`` over all ranks (one collective: every rank calls it); then zero. Types without
        learned tokens are left out."""
        parts = [self.losses, self.weighted, *self.metrics.values()]
        summed = all_reduce_sum(torch.cat(parts, dim=1), device=device).split([p.shape[1] for p in parts], dim=1)
        losses, weighted, metrics = summed[0], summed[1], dict(zip(self.metrics, summed[2:]))
        logs = {}
        if self.overall_loss:
            logs[f"{prefix}loss"] = float(weighted[0, 0] / weighted[1, 0]) if weighted[1, 0] > 0 else 0.0
        logs |= {f"{prefix}loss/{t}": round(m, 4) for t, m in mean_region_losses(losses, self.region_types).items()}
        for name, sums in metrics.items():
            if sums[1, -1] > 0:
                logs[f"{prefix}{name}"] = round(float(sums[0, -1] / sums[1, -1]), 4)
            for region_type, mean in mean_region_losses(sums[:, :-1], self.region_types).items():
                logs[f"{prefix}{name}/{region_type}"] = round(mean, 4)
        self.zero()
        return logs

    def zero(self) -> None:
        self.losses.zero_()
        self.weighted.zero_()
        for sums in self.metrics.values():
            sums.zero_()
