"""Hugging Face transformers integration: a Trainer for multi-region weighted SFT.

- `apply_mrloss(model, **loss_options)` (from `mrloss.integrations.patch`, importable here) patches a loaded causal
  LM *instance*: the fused weighted loss from the hidden states, no logits.
- `MultiRegionTrainer(transformers.Trainer)`: uses `mrloss.data.MultiRegionCollator`, makes
  ``num_items_in_batch`` the global sum of weights of the optimizer step (all micro-batches, all ranks),
  applies an optional region weighting (`mrloss.weighting`) per batch, feeds an optional monitor, and
  logs the mean token loss of every region type as ``loss/<type>`` next to the Trainer's ``loss``.

transformers is imported at module level: this module is the integration itself, and `import mrloss`
does not import it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import time
import warnings

import torch
import transformers

from mrloss.integrations.heads import LOSS_OPTIONS, unwrap_causal_lm  # noqa: F401  (LOSS_OPTIONS: a public name here)
from mrloss.integrations.patch import TOKEN_METRICS_FLAG, apply_mrloss, weight_sum
from mrloss.integrations.region_logs import RegionLogStats
from mrloss.ops.normalization import IGNORE_INDEX, valid_weight_sum
from mrloss.weighting.tracker import RegionStepTracker, all_reduce_sum

CHECKPOINT_STAGING = ".checkpoint-staging"  # inside the run directory; transformers never takes it for a checkpoint
TRAIN_LOSS_FILE = "mrloss_train_loss.json"  # in each checkpoint: Σ of the step losses so far (train_loss on resume)


class RunAlreadyComplete(ValueError):
    """``train(resume_from_checkpoint=...)`` from a checkpoint at (or past) the run's last step: nothing to train.
    (transformers would train one step past ``max_steps`` and save ``checkpoint-<max_steps + 1>``.)"""


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments of a `MultiRegionCollator` batch: without the region ids, and for
    packed rows without ``attention_mask``, so that transformers masks per sample from ``position_ids``
    (block-diagonal causal mask for sdpa / eager, varlen for flash attention)."""
    inputs = {k: v for k, v in batch.items() if k not in ("region_type_ids", "region_ids")}
    if "cu_seq_lens_q" in inputs:
        inputs.pop("attention_mask", None)
    return inputs


class MultiRegionProgressCallback(transformers.trainer_callback.ProgressCallback):
    """The Trainer's progress bar, with the last logged loss and tokens/s shown on the bar itself."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4g}"}
            if "tokens_per_second" in logs:
                postfix["tok/s"] = f"{logs['tokens_per_second']:.0f}"
            self.training_bar.set_postfix(postfix, refresh=False)
        super().on_log(args, state, control, logs=logs, **kwargs)


class MultiRegionTrainer(transformers.Trainer):
    """`transformers.Trainer` for multi-region weighted SFT.

    model: a supported ``*ForCausalLM`` (or PEFT model); `apply_mrloss(model, **loss_options)` is applied.
    train_dataset / eval_dataset: `mrloss.data.MultiRegionDataset` (items with ``input_ids``,
    ``token_weights``, ``region_type_ids``). data_collator: default `mrloss.data.MultiRegionCollator`
    (pad id from ``processing_class``; ``pack`` / ``max_length`` / ``pad_to_multiple_of`` go to it).
    region_types: names of ``region_type_ids`` (default ``train_dataset.region_types``).
    weighting: optional object with ``adjust(token_weights, region_type_ids, region_types, epoch)``,
    ``update(type_losses)``, ``multipliers()``, ``state_dict()`` / ``load_state_dict()`` (e.g.
    `mrloss.weighting.RegionWeighting`); epochs passed to it count from 1.
    monitor: optional `mrloss.debug.MultiRegionTrainingMonitor` (or an object with its ``log_batch_stats``
    returning the same record), called on rank 0.

    Normalization: ``num_items_in_batch`` = Σ valid shifted weights of all micro-batches of the optimizer
    step on all ranks, so the loss equals one big batch on one device. Hence ``remove_unused_columns``
    is switched off (the collator needs ``region_type_ids``) and ``average_tokens_across_devices`` on.
    """

    def __init__(
        self,
        model=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        *,
        processing_class=None,
        data_collator=None,
        loss_options: dict | None = None,
        region_types: list[str] | None = None,
        weighting=None,
        monitor=None,
        pack: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        **kwargs,
    ):
        apply_mrloss(model, **(loss_options or {}))
        self.ignore_index = (loss_options or {}).get("ignore_index", IGNORE_INDEX)
        if data_collator is None:
            data_collator = self._default_data_collator(
                processing_class, pack=pack, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of
            )
        if args is not None:
            args.remove_unused_columns = False
            args.average_tokens_across_devices = True
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = True
        self.region_types = list(
            region_types if region_types is not None else getattr(train_dataset, "region_types", [])
        )
        self.weighting = weighting
        self.monitor = monitor
        # the region step loop (statistics -> all ranks -> weighting.update -> checkpoint state); the monitor
        # records on rank 0 only
        self.region_tracker = RegionStepTracker(
            self.region_types,
            weighting=weighting,
            monitor=monitor if self.is_world_process_zero() else None,
            ignore_index=self.ignore_index,
        )
        if self.pop_callback(transformers.trainer_callback.ProgressCallback) is not None:
            self.add_callback(MultiRegionProgressCallback)
        # per-type losses and token metrics since the last training log (the tracker holds the step's), and of
        # the evaluation running now (not through the tracker: evaluation feeds no weighting and no monitor)
        self._train_log_stats = RegionLogStats(self.region_types, self.ignore_index)
        self._eval_log_stats = RegionLogStats(self.region_types, self.ignore_index, overall_loss=True)
        self._log_tokens = 0
        self._log_time = time.perf_counter()

    def _default_data_collator(self, processing_class, **collator_options):
        """The collator when none is passed: `MultiRegionCollator` with the pad id of ``processing_class``
        (`mrloss.integrations.trl.MultiRegionSFTTrainer` returns None here: TRL builds its own)."""
        from mrloss.data import MultiRegionCollator

        if processing_class is None or processing_class.pad_token_id is None:
            raise ValueError(
                "MultiRegionTrainer: pass a tokenizer with a pad token (processing_class) or a data_collator"
            )
        return MultiRegionCollator(processing_class.pad_token_id, **collator_options)

    # -- weights and normalization ------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Micro-batches of one optimizer step, with weighting applied, and their global Σ of weights."""
        self._update_weighting()
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if self.weighting is not None:
            epoch = int(self.state.epoch or 0) + 1
            for batch in batch_samples:
                batch["token_weights"] = self.weighting.adjust(
                    batch["token_weights"], batch["region_type_ids"], self.region_types, epoch
                )
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Σ of valid shifted weights over ``batch_samples`` and all ranks (float64 on ``device``: valid weights of
        1e37 sum past float32's range; the loss divides by it in float64, `mrloss.ops.normalization.weight_scales`).
        """
        if not batch_samples or "token_weights" not in batch_samples[0]:
            return None
        total = sum(valid_weight_sum(b["labels"], b["token_weights"], self.ignore_index) for b in batch_samples)
        total = total.to(device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)  # MPS: no fp64
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return weight_sum(total)

    def _update_weighting(self) -> None:
        """Feed the last optimizer step's per-type mean token losses (all ranks) to the weighting."""
        self.region_tracker.update_weighting(functools.partial(all_reduce_sum, device=self.args.device))

    # -- loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = dict(inputs)
        setattr(unwrap_causal_lm(self.model), TOKEN_METRICS_FLAG, not model.training or self._logs_this_step())
        loss, outputs = super().compute_loss(
            model, model_inputs(batch), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if "region_type_ids" in batch:
            if model.training:
                self._record_region_losses(batch, outputs)
            else:
                self._eval_log_stats.add(batch, outputs)
        return (loss, outputs) if return_outputs else loss

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step being computed ends in a training log (transformers' DefaultFlowCallback rule
        for logging_strategy "steps"; any other strategy: every step): only then are the token metrics computed."""
        step = self.state.global_step + 1
        if self.args.logging_strategy != transformers.trainer_utils.IntervalStrategy.STEPS:
            return True
        return (step == 1 and self.args.logging_first_step) or step % max(1, self.state.logging_steps or 1) == 0

    def _record_region_losses(self, batch, outputs) -> None:
        """Per-type loss sums of one training micro-batch (`mrloss.metrics.region_statistics`, through the region
        tracker; on rank 0 also the monitor), fed to the weighting's and the log's statistics."""
        record = self.region_tracker.statistics(batch, outputs.token_losses, self.state.global_step)
        self._train_log_stats.add(batch, outputs, self.region_tracker.record(record))
        self._log_tokens += (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        )

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """`transformers.Trainer.evaluation_loop`, whose metrics also get ``<prefix>_loss/<type>`` and the token
        metrics ``<prefix>_mean_token_accuracy``, ``<prefix>_entropy`` (also per type) over the learned tokens of
        the whole evaluation set, all ranks (prefix: ``eval``, or ``eval_<name>`` for several sets), and whose
        ``<prefix>_loss`` is the weighted mean Σw·l/Σw of the whole set (the Trainer's is a mean of batch means,
        which moves with the evaluation batch size)."""
        self._eval_log_stats.zero()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._eval_log_stats.pop_logs(f"{metric_key_prefix}_", self.args.device))
        return output

    # -- logging ------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs (those with ``loss``) also get ``loss/<type>`` (mean unweighted token loss of the
        region type since the last log, all ranks), ``tokens_per_second``, ``weight/<type>``, and TRL's token
        metrics over the learned tokens: ``mean_token_accuracy`` and ``entropy``, also per type (``entropy/<type>``)."""
        if "loss" in logs:
            tokens = all_reduce_sum(
                torch.tensor([float(self._log_tokens)], dtype=torch.float64), device=self.args.device
            )
            now = time.perf_counter()
            logs["tokens_per_second"] = round(float(tokens[0]) / max(now - self._log_time, 1e-9), 1)
            logs.update(self._train_log_stats.pop_logs("", self.args.device))
            if self.weighting is not None:
                logs.update({f"weight/{t}": round(m, 4) for t, m in self.weighting.multipliers().items()})
            self._log_tokens, self._log_time = 0, now
        super().log(logs, start_time)

    # -- checkpoints and resume ---------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """As `transformers.Trainer._save_checkpoint`, plus the region tracker's state, but atomic: everything goes
        into ``<run dir>/CHECKPOINT_STAGING/checkpoint-N`` first and is renamed to ``<run dir>/checkpoint-N`` once
        complete, so a checkpoint cut short (full disk, kill) is never one that ``resume_from_checkpoint`` picks.
        Old checkpoints are rotated (``save_total_limit``) only after the rename."""
        run_dir = self._get_output_dir(trial)
        name = f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_dir = os.path.join(run_dir, CHECKPOINT_STAGING)
        staged, final = os.path.join(staging_dir, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left by an interrupted save
        self.accelerator.wait_for_everyone()
        self._staging_dir, save_total_limit = staging_dir, self.args.save_total_limit
        self.args.save_total_limit = None  # rotate below, among the complete checkpoints
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir, self.args.save_total_limit = None, save_total_limit
        session_sum = self._session_loss_sum()  # every rank: a collective
        if self.is_world_process_zero():
            self.region_tracker.save_state(staged)
            if self._resumed_loss_sum is not None:  # the Σ of every step so far (unknown: no file)
                with open(os.path.join(staged, TRAIN_LOSS_FILE), "w", encoding="utf-8") as file:
                    loss_sum = self._resumed_loss_sum + session_sum
                    json.dump({"global_step": self.state.global_step, "step_loss_sum": loss_sum}, file)
        self.accelerator.wait_for_everyone()  # every rank's files are in
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)  # the same step saved again (a resumed run)
            os.replace(staged, final)
            with contextlib.suppress(OSError):
                os.rmdir(staging_dir)  # when empty
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging_dir):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, os.path.basename(self.state.best_model_checkpoint)
                )
            transformers.trainer_utils.rotate_checkpoints(
                run_dir, save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        """The run directory; while `_save_checkpoint` writes, the staging directory inside it."""
        staging_dir = getattr(self, "_staging_dir", None)
        return staging_dir if staging_dir is not None else super()._get_output_dir(trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """As `transformers.Trainer.train`; a resumed run also restores the region tracker's state (weighting and
        pending step sums), rewinds the monitor's record to the checkpoint's step (no step recorded twice) and
        reports ``train_loss`` over every step of the run. `RunAlreadyComplete` from a checkpoint at the last step."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint")
        self._resumed_loss_sum, self._resumed_step = 0.0, 0  # Σ step losses before the resume (None: unknown)
        if resume_from_checkpoint:
            state_file = os.path.join(resume_from_checkpoint, transformers.trainer.TRAINER_STATE_NAME)
            if os.path.isfile(state_file):  # else transformers starts at step 0 (weights only)
                self._resumed_step = transformers.TrainerState.load_from_json(state_file).global_step
            if self._resumed_step:
                self._check_not_complete(resume_from_checkpoint)
                self._resumed_loss_sum = _read_step_loss_sum(resume_from_checkpoint)
            self.region_tracker.load_state(resume_from_checkpoint)
            if self.monitor is not None and self.is_world_process_zero() and hasattr(self.monitor, "rewind"):
                self.monitor.rewind(self._resumed_step)
        self._log_time = time.perf_counter()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_not_complete(self, checkpoint: str) -> None:
        """`RunAlreadyComplete` when ``checkpoint`` holds the run's last step already (``max_steps``, or the steps of
        ``num_train_epochs``)."""
        max_steps = self.args.max_steps
        if max_steps <= 0:
            max_steps = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        if self._resumed_step >= max_steps:
            raise RunAlreadyComplete(
                f"{checkpoint} holds step {self._resumed_step} of {max_steps}: the run is already complete, nothing "
                "to train (raise max_steps to train further)"
            )

    # -- train_loss over the whole run --------------------------------------------------------------
    def _session_loss_sum(self) -> float:
        """Σ of the step losses since this ``train`` call began, those since the last log averaged over the ranks as
        a log does (transformers' ``train_loss`` takes each rank's own). Every rank calls it (a collective)."""
        return self._total_loss_scalar + self.accelerator.gather(self._tr_loss.detach().reshape(1)).mean().item()

    def _finalize_training(self, trial, num_train_samples, start_time):
        """`transformers.Trainer._finalize_training` with ``train_loss`` (Σ step losses / global step) over every
        step of the run: the Σ before a resume comes from the checkpoint (transformers counts those steps in the
        divisor only). A checkpoint without `TRAIN_LOSS_FILE` (not written by this trainer): the mean over the
        steps since the resume, with a warning."""
        session_sum = self._session_loss_sum()
        self._tr_loss.zero_()  # in session_sum already
        # what transformers divides _total_loss_scalar by: the steps of this call (5.11+), global_step (before)
        divisor = max(self.state.global_step - getattr(self, "_initial_global_step", 0), 0.001)
        if self._resumed_loss_sum is not None:
            mean = (self._resumed_loss_sum + session_sum) / max(self.state.global_step, 1)
        else:
            warnings.warn(
                f"train_loss is the mean over steps {self._resumed_step + 1}-{self.state.global_step} only: the "
                f"checkpoint resumed from has no {TRAIN_LOSS_FILE}",
                stacklevel=2,
            )
            mean = session_sum / max(self.state.global_step - self._resumed_step, 1)
        self._total_loss_scalar = mean * divisor
        return super()._finalize_training(trial, num_train_samples, start_time)


def _read_step_loss_sum(checkpoint: str) -> float | None:
    """The Σ of step losses `MultiRegionTrainer` saved in ``checkpoint`` (`TRAIN_LOSS_FILE`), None without one."""
    path = os.path.join(checkpoint, TRAIN_LOSS_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        return float(json.load(file)["step_loss_sum"])
