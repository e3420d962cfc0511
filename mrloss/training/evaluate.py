"""Per-region evaluation of a trainer's model: mean token loss of every region type (`mrloss demo`, tests)."""

from __future__ import annotations


def evaluate_region_losses(trainer, dataset, batch_size: int = 8) -> dict[str, float]:
    """Mean unweighted token loss of each region type over ``dataset`` (learned tokens only), and
    ``"weighted"``: the weighted mean Σ w·l / Σ w -- one no-grad pass of the trainer's model, this process.
    Counted by `mrloss.metrics.region_statistics` (through `RegionStepTracker`) with the trainer's ``ignore_index``."""
    import torch

    from mrloss.integrations.hf import model_inputs
    from mrloss.metrics import mean_region_losses
    from mrloss.weighting.tracker import RegionStepTracker

    model, collator = trainer.model, trainer.data_collator
    was_training = model.training
    model.eval()
    names = list(dataset.region_types)
    tracker = RegionStepTracker(names, ignore_index=trainer.ignore_index)  # loss sum, learned tokens per type
    weighted_sum = weight_sum = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            token_losses = model(**model_inputs(batch)).token_losses
            record = tracker.statistics(batch, token_losses, step=0)
            tracker.record(record)
            if record["total"]["weight_sum"] > 0:
                weighted_sum += record["total"]["weighted_loss"] * record["total"]["weight_sum"]
                weight_sum += record["total"]["weight_sum"]
    model.train(was_training)
    return {
        **mean_region_losses(tracker.step_sums, names),
        "weighted": weighted_sum / weight_sum if weight_sum > 0 else float("nan"),
    }
