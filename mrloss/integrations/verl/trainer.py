"""torchrun entry: verl's own SFT trainer (``verl.trainer.sft_trainer.main``) with the mrloss loss.

    torchrun --standalone --nproc_per_node=N -m mrloss.integrations.verl.trainer <verl hydra overrides>
        +mrloss.loss=mrloss [+mrloss.OPTION=VALUE ...: any of mrloss.integrations.heads.LOSS_OPTIONS, e.g.
                             +mrloss.backend=auto +mrloss.chunk_size=N +mrloss.memory=low]
        [+mrloss.monitor_dir=DIR +mrloss.weighting='{"dynamic_weights": {...}, "region_dependencies": {...}}']

The switch is the ``mrloss`` block of verl's config: ``mrloss.loss=mrloss`` swaps verl's ``sft_loss`` for
`mrloss.integrations.verl.engine` (fused loss from hidden states, Ulysses shards, no logits);
``mrloss.loss=verl`` (or no block) leaves verl's loss untouched (our dataset still works with it).
With ``mrloss.loss=mrloss``, ``mrloss.monitor_dir`` (the monitor's directory; rank 0 writes
``region_stats.jsonl`` there) and ``mrloss.weighting`` (the config's ``weighting:`` section, as a mapping or a
JSON string) switch on `mrloss.integrations.verl.region_tools.EngineRegionTools`; the weighting's state is
saved in every checkpoint directory (``mrloss_weighting.pt``) and restored on resume.
The dataset is chosen by verl itself: ``data.custom_cls.path=pkg://mrloss.integrations.verl.dataset
data.custom_cls.name=MultiRegionSFTDataset``.
"""

from __future__ import annotations

import json
import os
from functools import partial

LOSS_CHOICES = ("mrloss", "verl")
TOOL_KEYS = ("monitor_dir", "weighting")


def install() -> None:
    """Wrap ``SFTTrainer._build_engine`` so that, when the config asks for it, the engine it builds uses
    mrloss (and the region tools), and ``SFTTrainer.fit`` so that the tools know the resumed step, the
    epoch length and save their state with verl's checkpoints. Idempotent."""
    from verl.trainer import sft_trainer

    original_build_engine, original_fit = sft_trainer.SFTTrainer._build_engine, sft_trainer.SFTTrainer.fit
    if getattr(original_build_engine, "mrloss_installed", False):
        return

    def _build_engine(self):
        original_build_engine(self)
        options = mrloss_options(self.config)
        tool_options = {key: options.pop(key) for key in TOOL_KEYS if key in options}
        if options.pop("loss") != "mrloss":
            if any(value is not None for value in tool_options.values()):
                raise ValueError(
                    f"mrloss.{'/'.join(TOOL_KEYS)} need mrloss.loss=mrloss (the token losses come "
                    "from the mrloss forward)"
                )
            return
        from mrloss.integrations.verl.engine import mrloss_sft_loss, patch_engine

        self.mrloss_region_tools = region_tools(self, **tool_options)
        patch_engine(self.engine, options, self.mrloss_region_tools)
        self.loss_fn = partial(mrloss_sft_loss, config=None)
        self.training_client.set_loss_fn(loss_fn=self.loss_fn)

    def fit(self):
        tools = getattr(self, "mrloss_region_tools", None)
        if tools is not None:
            start_region_tools(self, tools)
        return original_fit(self)

    _build_engine.mrloss_installed = True
    sft_trainer.SFTTrainer._build_engine = _build_engine
    sft_trainer.SFTTrainer.fit = fit


def mrloss_options(config) -> dict:
    """The ``mrloss`` block of a verl config as a plain dict, ``loss`` defaulting to "verl" (absent block);
    a ``weighting`` given as a JSON string is parsed."""
    from omegaconf import OmegaConf

    block = config.get("mrloss", None)
    options = {} if block is None else dict(OmegaConf.to_container(block, resolve=True))
    options.setdefault("loss", "verl")
    if options["loss"] not in LOSS_CHOICES:
        raise ValueError(f"mrloss.loss must be one of {LOSS_CHOICES}, got {options['loss']!r}")
    if isinstance(options.get("weighting"), str):
        try:
            options["weighting"] = json.loads(options["weighting"])
        except json.JSONDecodeError as error:
            raise ValueError(f"mrloss.weighting: not a JSON object: {error}") from None
    return options


def region_tools(trainer, monitor_dir=None, weighting=None):
    """`EngineRegionTools` of an ``SFTTrainer`` whose engine is built, or None when neither tool is asked for.
    The monitor writes on global rank 0 only; region types come from the training dataset."""
    from mrloss.integrations.verl.region_tools import EngineRegionTools
    from mrloss.weighting import RegionWeighting

    region_weighting = RegionWeighting.from_config(weighting) if weighting is not None else None
    if monitor_dir is None and not (region_weighting is not None and region_weighting.enabled):
        return None
    types = getattr(trainer.train_dataset, "region_types", None)
    if types is None:
        raise ValueError(
            "mrloss.weighting / mrloss.monitor_dir need data.custom_cls = "
            "mrloss.integrations.verl.dataset.MultiRegionSFTDataset (it provides region_type_ids)"
        )
    monitor = None
    if monitor_dir is not None and trainer.rank == 0:
        from mrloss.debug import MultiRegionTrainingMonitor

        monitor = MultiRegionTrainingMonitor(monitor_dir, types)
    return EngineRegionTools(types, weighting=region_weighting, monitor=monitor)


def start_region_tools(trainer, tools) -> None:
    """Before ``fit``: resumed step and epoch length; the weighting's state from the resumed checkpoint (a
    fresh run instead starts a fresh ``region_stats.jsonl``); the weighting saved with every checkpoint."""
    tools.step, tools.steps_per_epoch = int(trainer.resume_global_step), int(trainer.steps_per_epoch)
    trainer_config = trainer.config.trainer
    if tools.step > 0 and tools.weighting is not None:
        directory = trainer_config.get("resume_from_path", None) or os.path.join(
            trainer_config.default_local_dir, f"global_step_{tools.step}"
        )
        tools.tracker.load_state(directory)
    if tools.step == 0 and tools.monitor is not None and tools.monitor.stats_path.exists():
        tools.monitor.stats_path.unlink()
    if tools.weighting is not None:
        handler = trainer.ckpt_handler
        original_save = handler.save_checkpoint

        def save_checkpoint(step):
            original_save(step)
            if trainer.rank == 0:
                tools.tracker.save_state(os.path.join(trainer_config.default_local_dir, f"global_step_{step}"))

        handler.save_checkpoint = save_checkpoint


def main() -> None:
    install()
    from verl.trainer.sft_trainer import main as verl_main

    verl_main()


if __name__ == "__main__":
    main()
