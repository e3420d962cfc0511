"""torchrun entry: verl's own SFT trainer (``verl.trainer.sft_trainer.main``) with the mrloss loss.

    torchrun --standalone --nproc_per_node=N -m mrloss.integrations.verl.trainer <verl hydra overrides>
        +mrloss.loss=mrloss [+mrloss.backend=auto +mrloss.chunk_size=N +mrloss.softcap=C +mrloss.label_smoothing=E]

The switch is the ``mrloss`` block of verl's config: ``mrloss.loss=mrloss`` swaps verl's ``sft_loss`` for
`mrloss.integrations.verl.engine` (fused loss from hidden states, Ulysses shards, no logits);
``mrloss.loss=verl`` (or no block) leaves verl's loss untouched (our dataset still works with it).
The dataset is chosen by verl itself: ``data.custom_cls.path=pkg://mrloss.integrations.verl.dataset
data.custom_cls.name=MultiRegionSFTDataset``.
"""
from __future__ import annotations

from functools import partial

LOSS_CHOICES = ("mrloss", "verl")


def install() -> None:
    """Wrap ``SFTTrainer._build_engine`` so that, when the config asks for it, the engine it builds uses
    mrloss. Idempotent."""
    from verl.trainer import sft_trainer

    original = sft_trainer.SFTTrainer._build_engine
    if getattr(original, "mrloss_installed", False):
        return

    def _build_engine(self):
        original(self)
        options = mrloss_options(self.config)
        if options.pop("loss") != "mrloss":
            return
        from mrloss.integrations.verl.engine import mrloss_sft_loss, patch_engine

        patch_engine(self.engine, options)
        self.loss_fn = partial(mrloss_sft_loss, config=None)
        self.training_client.set_loss_fn(loss_fn=self.loss_fn)

    _build_engine.mrloss_installed = True
    sft_trainer.SFTTrainer._build_engine = _build_engine


def mrloss_options(config) -> dict:
    """The ``mrloss`` block of a verl config as a plain dict, ``loss`` defaulting to "verl" (absent block)."""
    from omegaconf import OmegaConf

    block = config.get("mrloss", None)
    options = {} if block is None else dict(OmegaConf.to_container(block, resolve=True))
    options.setdefault("loss", "verl")
    if options["loss"] not in LOSS_CHOICES:
        raise ValueError(f"mrloss.loss must be one of {LOSS_CHOICES}, got {options['loss']!r}")
    return options


def main() -> None:
    install()
    from verl.trainer.sft_trainer import main as verl_main

    verl_main()


if __name__ == "__main__":
    main()
