"""`mrloss train --config F [key=value ...]`: a config -> a training run with `MultiRegionTrainer`.

Runs on CPU and GPU, as one process or under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU). The output
directory receives the model and tokenizer (``save_pretrained``), ``config.yaml`` (the resolved config),
``metrics.json`` (final metrics, per-region losses, the log history; ``train.train_loss`` the mean step loss of
the whole run, steps before a resume included), checkpoints every
``trainer.save_steps`` and the monitor's ``monitor/region_stats.jsonl``. Resuming a run whose last checkpoint is
its last step already prints that it is complete and exits 0, training and writing nothing.

With ``model.path: null`` the model is a tiny ``model.arch`` built from a transformers config and the
tokenizer a byte-level BPE trained on the training texts (no downloads): rank 0 trains it and saves it
under ``<output_dir>/tokenizer`` for the other ranks; a resumed run takes it from the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from mrloss.data.tokenizer import RUN_TOKENIZER_DIR
from mrloss.training.build import (
    build_model,
    build_tokenizer,
    check_learned_tokens,
    check_resume_model,
    ensure_data_files,
)
from mrloss.training.config import Config, ConfigError, build_weighting, load_config


@dataclasses.dataclass
class TrainingRun:
    """Everything a run is made of, built by `prepare_run`; `finish_run` trains and saves."""

    config: Config
    trainer: object  # mrloss.integrations.hf.MultiRegionTrainer
    tokenizer: object
    train_dataset: object
    eval_dataset: object | None
    resume_from_checkpoint: str | None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mrloss train", description="Train from a YAML config.")
    parser.add_argument(
        "--config", required=True, help="a YAML file or a built-in config: tag_based, position_based, structured"
    )
    parser.add_argument(
        "--trainer", choices=("hf", "trl"), help="hf: transformers.Trainer, trl: TRL's SFTTrainer (trainer.backend)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")
    args = parser.parse_args(argv)
    if args.trainer is not None:
        args.overrides.append(f"trainer.backend={args.trainer}")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"mrloss train: {error}", file=sys.stderr)
        return 2
    from mrloss.integrations.hf import RunAlreadyComplete

    try:
        metrics = finish_run(prepare_run(config))
    except RunAlreadyComplete as complete:  # re-running a finished run: nothing trained, nothing written
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mrloss train: {complete}")
        _leave_process_group()
        return 0
    if metrics["is_main_process"]:
        print(f"mrloss train: model, tokenizer and metrics saved to {config.trainer.output_dir}")
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun: wait for every rank, then close the group (no rank exits while a peer still talks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def prepare_run(config: Config, *, callbacks: tuple = ()) -> TrainingRun:
    """Build the TrainingArguments (this joins the torchrun process group), data, model and trainer."""
    from mrloss.data import MultiRegionDataset
    from mrloss.integrations.hf import MultiRegionTrainer

    check_output_dir(config.trainer)
    check_monitor_dir(config)
    args = training_arguments(config)
    resume = resolve_checkpoint(config.trainer.resume_from_checkpoint, config.trainer.output_dir)
    with args.main_process_first(desc="write the example data"):
        ensure_data_files(config.data)
    with args.main_process_first(desc="build the tokenizer"):
        tokenizer = build_tokenizer(config, resume, is_main=args.local_process_index == 0)
    data_options = dict(
        format=config.data.format,
        extra_keys=config.data.extra_keys,
        max_length=config.data.max_length,
        truncation=config.data.truncation,
        add_eos=config.data.add_eos,
    )
    train_dataset = MultiRegionDataset(config.data.train_files, tokenizer, **data_options)
    weighted_outside = check_learned_tokens(train_dataset, config.data)
    eval_dataset = None
    if config.data.val_files:
        eval_dataset = MultiRegionDataset(
            config.data.val_files, tokenizer, region_types=train_dataset.region_types, **data_options
        )
    model = build_model(config.model, tokenizer, max_length=config.data.max_length, seed=config.trainer.seed)
    if resume is not None:
        check_resume_model(model, resume)
    weighting, monitor, callbacks = _tools(config, train_dataset, weighted_outside, args.process_index == 0, callbacks)
    loss_options = dataclasses.asdict(config.loss)
    common = dict(processing_class=tokenizer, loss_options=loss_options, weighting=weighting, monitor=monitor)
    if config.trainer.backend == "trl":
        from mrloss.integrations.trl import MultiRegionSFTTrainer, sft_config

        # the data are encoded and truncated by mrloss already; TRL packs them ("bfd", padding-free) when asked
        args = sft_config(args, max_length=config.data.max_length, packing=config.data.pack)
        trainer = MultiRegionSFTTrainer(model, args, train_dataset, eval_dataset, callbacks=list(callbacks), **common)
    else:
        trainer = MultiRegionTrainer(
            model,
            args,
            train_dataset,
            eval_dataset,
            pack=config.data.pack,
            max_length=config.data.max_length if config.data.pack else None,
            callbacks=list(callbacks),
            **common,
        )
    return TrainingRun(config, trainer, tokenizer, train_dataset, eval_dataset, resume)


def finish_run(run: TrainingRun) -> dict:
    """Train, then save model + tokenizer + ``config.yaml`` + ``metrics.json``; returns the metrics."""
    import yaml

    trainer = run.trainer
    try:
        result = trainer.train(resume_from_checkpoint=run.resume_from_checkpoint)
    except OSError as error:  # e.g. a full disk while a checkpoint is written: one line (exit 1), not a traceback
        raise OSError(
            error.errno,
            f"training stopped at step {trainer.state.global_step}: {error.strerror or error}"
            f"{f' ({error.filename})' if error.filename else ''}; checkpoints written before are complete "
            f"(resume: trainer.resume_from_checkpoint=true)",
        ) from None
    trainer.save_model(run.config.trainer.output_dir)
    history = trainer.state.log_history
    region_logs = [entry for entry in history if any(key.startswith("loss/") for key in entry)]
    moments = (("first", region_logs[0]), ("last", region_logs[-1])) if region_logs else ()  # none: plain SFT
    metrics = {
        "train": result.metrics,
        "region_losses": {
            moment: {k[len("loss/") :]: v for k, v in entry.items() if k.startswith("loss/")} | {"step": entry["step"]}
            for moment, entry in moments
        },
        "region_types": list(run.train_dataset.region_types),
        "world_size": trainer.args.world_size,
        "log_history": history,
    }
    if trainer.is_world_process_zero():
        output_dir = Path(run.config.trainer.output_dir)
        (output_dir / "config.yaml").write_text(
            yaml.safe_dump(run.config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    return {**metrics, "is_main_process": trainer.is_world_process_zero()}


def training_arguments(config: Config):
    """`transformers.TrainingArguments` of the ``trainer`` section (device, DDP backend, schedule, saving)."""
    import torch

    t = config.trainer
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config trainer.device: 'cuda' but no CUDA device is available")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"config trainer.warmup_ratio: expected a fraction in [0, 1), got {t.warmup_ratio}")
    use_cpu = t.device == "cpu" or not torch.cuda.is_available()
    _check_trainer_names(t)
    if config.loss.backend == "triton" and use_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "config loss.backend: 'triton' runs on a CUDA device and this run is on the CPU; use auto or torch"
        )
    if config.fsdp.enabled and use_cpu:
        raise ConfigError(
            "config fsdp.enabled: transformers / accelerate shard with FSDP on CUDA devices only (on the CPU they "
            "would silently run DDP instead); set fsdp.enabled=false or train on GPUs"
        )
    evaluate = "no" if not config.data.val_files else ("steps" if t.eval_steps else "epoch")
    try:
        return _training_arguments(config, use_cpu, evaluate)
    except ValueError as error:  # transformers' own checks of the values above
        raise ConfigError(f"config trainer: {error}") from None


def _check_trainer_names(t) -> None:
    """ConfigError for a ``trainer.lr_scheduler`` or ``trainer.report_to`` name transformers does not know."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.trainer_utils import SchedulerType

    schedulers = [kind.value for kind in SchedulerType]
    if t.lr_scheduler not in schedulers:
        raise ConfigError(f"config trainer.lr_scheduler: expected one of {schedulers}, got {t.lr_scheduler!r}")
    reporters = ["all", "none", *INTEGRATION_TO_CALLBACK]
    unknown = [name for name in t.report_to if name not in reporters]
    if unknown:
        raise ConfigError(f"config trainer.report_to: unknown {unknown[0]!r}; expected names among {reporters}")


def _training_arguments(config: Config, use_cpu: bool, evaluate: str):
    import transformers

    t = config.trainer
    progress_bars = sys.stderr.isatty()  # a log file gets one line per log step, not a bar's carriage returns
    if not progress_bars:
        transformers.utils.logging.disable_progress_bar()  # "Writing model shards", "Loading weights"
    return transformers.TrainingArguments(
        output_dir=t.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        disable_tqdm=not progress_bars,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy=evaluate,
        eval_steps=t.eval_steps,
        prediction_loss_only=True,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=t.dataloader_num_workers,
        **checkpointing_arguments(config.model.gradient_checkpointing),
        report_to=t.report_to or "none",
        remove_unused_columns=False,
        **fsdp_arguments(config),
    )


def checkpointing_arguments(enabled: bool) -> dict:
    """The activation checkpointing switch of `transformers.TrainingArguments` under the name the installed release
    has: ``activation_checkpointing`` where it exists (``gradient_checkpointing`` is its deprecated alias there,
    warning on every run), else ``gradient_checkpointing``."""
    import transformers

    names = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def fsdp_arguments(config: Config) -> dict:
    """``fsdp`` / ``fsdp_config`` of `transformers.TrainingArguments` for the ``fsdp`` section (FSDP2)."""
    if not config.fsdp.enabled:
        return {}
    fsdp_config = {"version": 2, "reshard_after_forward": config.fsdp.reshard_after_forward}
    if config.fsdp.layers:
        fsdp_config["transformer_layer_cls_to_wrap"] = list(config.fsdp.layers)
    return {"fsdp": True, "fsdp_config": fsdp_config}


def check_output_dir(trainer_config) -> None:
    """ConfigError when ``trainer.output_dir`` is a file, or a non-empty directory that the run neither resumes from
    (``resume_from_checkpoint``) nor may overwrite (``overwrite_output_dir``): its checkpoints and logs would be
    replaced (the tokenizer a failed start left behind does not count). With ``overwrite_output_dir`` the old
    ``checkpoint-N`` directories are removed (rank 0), so that a later ``resume_from_checkpoint: true`` never
    picks one of the old run. Runs before the process group exists."""
    output_dir = Path(trainer_config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"config trainer.output_dir: {output_dir} exists and is not a directory")
    if not output_dir.is_dir() or trainer_config.resume_from_checkpoint:
        return
    if all(entry.name == RUN_TOKENIZER_DIR for entry in output_dir.iterdir()):
        return  # empty, or only the tokenizer of a run that failed before training (e.g. on its data)
    if not trainer_config.overwrite_output_dir:
        raise ConfigError(
            f"config trainer.output_dir: {output_dir} is not empty; resume it (trainer.resume_from_checkpoint=true), "
            "replace it (trainer.overwrite_output_dir=true) or choose another directory"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        for checkpoint in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            if checkpoint.is_dir():
                shutil.rmtree(checkpoint)


def check_monitor_dir(config: Config) -> None:
    """ConfigError when ``monitor.output_dir`` (set apart from the run directory) already holds another run's
    ``region_stats.jsonl`` and the run neither resumes nor may overwrite (``trainer.overwrite_output_dir``, as for
    the run directory itself): a fresh run would replace that record. Inside ``trainer.output_dir`` the record is
    covered by `check_output_dir`."""
    from mrloss.debug.monitor import STATS_FILE

    monitor, trainer = config.monitor, config.trainer
    if not monitor.enabled or monitor.output_dir is None or trainer.resume_from_checkpoint:
        return
    stats = Path(monitor.output_dir) / STATS_FILE
    if stats.exists() and not trainer.overwrite_output_dir:
        raise ConfigError(
            f"config monitor.output_dir: {stats} holds the record of another run; replace it "
            "(trainer.overwrite_output_dir=true) or choose another directory"
        )


def resolve_checkpoint(resume, output_dir: str) -> str | None:
    """``resume_from_checkpoint``: None/False -> None; True -> the last ``checkpoint-N`` in output_dir."""
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ConfigError(f"config trainer.resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N")
        return last
    if not os.path.isdir(resume):
        raise ConfigError(f"config trainer.resume_from_checkpoint: {resume!r} is not a directory")
    return resume


def _tools(config: Config, train_dataset, weighted_outside: bool, is_main: bool, callbacks: tuple):
    """The configured region weighting (refused when its epoch weights cannot act on the training data) and
    monitor (and the monitor's Trainer callback)."""
    region_types = train_dataset.region_types
    weighting = build_weighting(config.weighting)
    try:
        if weighting is not None:
            weighting.type_multipliers(region_types, 1)  # the types the tools name must be the data's
        if weighting is not None and weighting.dynamic_weights is not None:
            weighting.dynamic_weights.check_epoch_weights_act(region_types, weighted_outside=weighted_outside)
    except ValueError as error:
        raise ConfigError(f"config weighting.{error}") from None
    monitor = None
    if config.monitor.enabled:
        from mrloss.debug import MultiRegionTrainingMonitor

        monitor_dir = config.monitor.output_dir or os.path.join(config.trainer.output_dir, "monitor")
        monitor = MultiRegionTrainingMonitor(monitor_dir if is_main else None, region_types)
        if is_main and not config.trainer.resume_from_checkpoint and monitor.stats_path.exists():
            monitor.stats_path.unlink()  # a fresh run starts a fresh record; a resumed one appends
        callbacks = (*callbacks, monitor.hf_callback())
    return weighting, monitor, callbacks
