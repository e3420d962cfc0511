"""mrloss inside verl's engine-based SFT trainer (verl 0.9.1, ``verl.trainer.sft_trainer``).

- ``dataset.MultiRegionSFTDataset``: the ``data.custom_cls`` dataset (mrloss's formats -> float ``loss_mask``).
- ``engine``: the loss for ``set_loss_fn`` and the engine/model patches that compute it with mrloss from
  each rank's hidden-state shard (no logits; Ulysses sequence parallelism through `mrloss.parallel`).
- ``trainer``: the torchrun entry (``-m mrloss.integrations.verl.trainer``) that installs them, then runs
  verl's own ``main``.
- ``python -m mrloss.integrations.verl --nproc N --config CONFIG --save-path DIR [overrides...]``: builds
  and runs that torchrun command from an mrloss YAML config (see docs/verl.md).

Nothing here imports verl at module import time: ``import mrloss`` never needs it.
"""
