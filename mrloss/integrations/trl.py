"""TRL integration: multi-region weighted SFT through TRL's ``SFTTrainer`` with mrloss's fused weighted loss.

`MultiRegionSFTTrainer` is `mrloss.integrations.hf.MultiRegionTrainer` (global Σw as ``num_items_in_batch``,
region weighting, ``loss/<type>`` logs, monitor) on top of ``trl.SFTTrainer`` (its data preparation, packing,
``padding_free``, ``completion_only_loss`` / ``assistant_only_loss``, PEFT, logs). Its data: any of mrloss's
formats (files, raw samples, a `mrloss.data.MultiRegionDataset`) or a ``datasets.Dataset`` with ``input_ids``
and ``token_weights`` (and optionally ``region_type_ids``, ``labels``, ``completion_mask``, ``assistant_masks``);
a plain TRL dataset (text, messages, prompt-completion) trains with weight 1 on TRL's labels, i.e. TRL's own loss.

The learned-token rule with TRL's masks: a token is trained iff TRL keeps its label (``completion_only_loss``
masks the prompt, ``assistant_only_loss`` what is not the assistant's, padding-free each sample's first token)
*and* its weight is > 0; its weight is the region weight; the normalizer is the Σ of those weights over the
optimizer step (all micro-batches and ranks).

What TRL 1.16 needed worked around (each where it is done):
- ``SFTTrainer.__init__`` patches the model's forward with its fused LM head and ``compute_loss`` takes the loss
  from its per-token log-probs (``Σ -log p / max(count, 1)``): the mrloss forward is put back after TRL's
  ``__init__``, a ``fused_lm_head=True`` call is an error, and ``compute_loss`` is the model's own loss
  (`_MRLossSFTTrainer`), so TRL's unweighted loss cannot run silently.
- TRL's entropy and ``mean_token_accuracy`` came from that head: they come from the mrloss forward's own
  token metrics (``token_entropy`` / ``token_accuracy``, computed in the loss's row pass: no extra LM-head
  pass), over the learned tokens, logged through TRL's metric lists.
- TRL truncates only ``input_ids`` / ``labels`` and keeps only those two when packing; its collator knows no
  other column: `_MRLossSFTTrainer._prepare_dataset` cuts and packs every per-token column (TRL's
  ``pack_dataset``), `TokenWeightCollator` lays them out like TRL's collator (padded or padding-free).
- ``SFTTrainer`` refuses a custom collator with ``padding_free``: TRL builds its collator, which is then wrapped.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import datasets
import torch
import transformers
import trl
from trl.data_utils import get_dataset_column_names, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import create_model_from_path, pad

from mrloss.formats import FORMAT_SPECS, FORMATS
from mrloss.formats.tag_based import TAG_NAME
from mrloss.integrations.heads import unwrap_causal_lm
from mrloss.integrations.hf import MultiRegionTrainer, apply_mrloss
from mrloss.ops.normalization import IGNORE_INDEX, learned_mask

# Per-token columns TRL does not know, and their padding values.
TOKEN_COLUMNS = {"token_weights": 0.0, "region_type_ids": -1}
_COLUMN_DTYPES = {"token_weights": torch.float32, "region_type_ids": torch.int64}
# Keys that mark raw samples of mrloss's plain-text formats, which TRL would otherwise train on as plain text
# (TRL reads the chat format itself; a tag_based sample is TRL's "text" with LEARN tags in it).
_FORMAT_COLUMNS = tuple(key for spec in FORMAT_SPECS if spec.name in FORMATS for key in spec.identifying_keys)
_TAG = f"<{TAG_NAME}"


# -- data ---------------------------------------------------------------------------------------------------
def sft_dataset(source, tokenizer=None, *, region_types: list[str] | None = None, **dataset_options):
    """Multi-region data as a ``datasets.Dataset`` for TRL: ``input_ids``, ``token_weights`` and
    ``region_type_ids`` (a list of ``ClassLabel`` whose names are the region types; -1 outside every region).

    source: a `mrloss.data.MultiRegionDataset`; a data file path or a list of them (JSONL / JSON / Parquet); a
    list of raw samples (dicts in any of mrloss's formats); a ``datasets.Dataset`` -- returned as is when it is
    tokenized (``input_ids``) or plain TRL data, encoded by mrloss when it holds raw multi-region samples
    (``segments`` / ``learning_regions`` columns, or ``<LEARN`` tags in ``text``). ``dataset_options`` go to
    `MultiRegionDataset` (format, extra_keys, max_length, truncation, add_eos); ``region_types``: the vocabulary to use
    (e.g. the training set's for an evaluation set). None stays None.
    """
    from mrloss.data import MultiRegionDataset

    if source is None:
        return None
    if isinstance(source, dict):  # TRL's several evaluation sets
        return {
            name: sft_dataset(part, tokenizer, region_types=region_types, **dataset_options)
            for name, part in source.items()
        }
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        if not _holds_raw_regions(source):
            return source
        from mrloss.data.records import drop_nulls

        source = [drop_nulls(row) for row in source]  # a row lacks the columns of other formats: null
    if not isinstance(source, MultiRegionDataset):
        if tokenizer is None:
            raise ValueError("sft_dataset: multi-region data needs the tokenizer (processing_class) to encode it")
        options = dict(dataset_options, region_types=region_types)
        if isinstance(source, (str, Path)) or (
            isinstance(source, list) and source and isinstance(source[0], (str, Path))
        ):
            source = MultiRegionDataset(source, tokenizer, **options)
        elif isinstance(source, list):
            source = MultiRegionDataset.from_samples(source, tokenizer, **options)
        else:
            raise TypeError(
                "sft_dataset: expected a MultiRegionDataset, data file path(s), a list of raw samples or a "
                f"datasets.Dataset, got {type(source).__name__}"
            )
    items = [source[i] for i in range(len(source))]
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int64")),
            "token_weights": datasets.List(datasets.Value("float32")),
            "region_type_ids": datasets.List(datasets.ClassLabel(names=list(source.region_types))),
        }
    )
    columns = {name: [item[name].tolist() for item in items] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def dataset_region_types(dataset) -> list[str]:
    """The region types named by a dataset's ``region_type_ids`` ``ClassLabel`` (`sft_dataset`); [] without."""
    features = getattr(dataset, "features", None) or {}
    feature = getattr(features.get("region_type_ids"), "feature", None)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else []


def _holds_raw_regions(dataset) -> bool:
    """Whether an untokenized ``datasets`` dataset holds raw multi-region samples (TRL would read them as text)."""
    columns = get_dataset_column_names(dataset)
    if "input_ids" in columns:
        return False
    if any(column in columns for column in _FORMAT_COLUMNS):
        return True
    if "text" in columns and isinstance(dataset, datasets.Dataset):
        return any(isinstance(text, str) and _TAG in text for text in dataset["text"])
    return False


class TokenWeightCollator:
    """TRL's collator plus the per-token columns it does not know (`TOKEN_COLUMNS`), laid out the same way:
    right-padded rows, or one flattened row with ``padding_free``, padded to ``pad_to_multiple_of``.

    Without ``token_weights`` in the items every token gets weight 1 (the loss is then TRL's own, normalized by
    the step's count of valid labels). Batch: TRL's keys plus ``token_weights [B, T] fp32`` (0 on padding) and,
    when the items have them, ``region_type_ids [B, T] int64`` (-1 on padding). Another collator must return
    the columns itself (its layout is unknown here): ValueError otherwise."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        padding_free = getattr(self.collator, "padding_free", False)
        for name, padding_value in TOKEN_COLUMNS.items():
            if name not in examples[0] or name in batch:
                continue
            if not isinstance(self.collator, DataCollatorForLanguageModeling):
                raise ValueError(
                    f"MultiRegionSFTTrainer: the items have {name} but the data_collator "
                    f"{type(self.collator).__name__} does not return it; return it from the collator (aligned with "
                    "input_ids) or leave data_collator to TRL"
                )
            values = [torch.as_tensor(example[name], dtype=_COLUMN_DTYPES[name]) for example in examples]
            if padding_free:
                values = [torch.cat(values)]
            batch[name] = pad(
                values,
                padding_value=padding_value,
                padding_side="right",
                pad_to_multiple_of=getattr(self.collator, "pad_to_multiple_of", None),
            )
            if batch[name].shape != batch["input_ids"].shape:
                raise ValueError(
                    f"TokenWeightCollator: {name} {tuple(batch[name].shape)} does not line up with input_ids "
                    f"{tuple(batch['input_ids'].shape)}; every per-token column must have the length of input_ids"
                )
        if "token_weights" not in batch:
            batch["token_weights"] = torch.ones(batch["input_ids"].shape, dtype=torch.float32)
        return batch


# -- config -------------------------------------------------------------------------------------------------
def sft_config(args=None, **sft_options) -> trl.SFTConfig:
    """``args`` (None, ``transformers.TrainingArguments`` or ``trl.SFTConfig``) as an ``SFTConfig``, with
    ``sft_options`` (``max_length``, ``packing``, ...) set; a TrainingArguments converts as TRL converts it."""
    if args is None:
        return trl.SFTConfig(**sft_options)
    if not isinstance(args, trl.SFTConfig):
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict hides it
        return trl.SFTConfig(**{**values, **sft_options})
    for key, value in sft_options.items():
        setattr(args, key, value)
    return args


# -- the loss and TRL's token metrics -------------------------------------------------------------------------
def token_metric_sums(outputs, labels, token_weights=None, *, ignore_index: int = IGNORE_INDEX):
    """TRL's ``entropy`` and ``mean_token_accuracy`` inputs over the learned tokens, from the mrloss forward's
    ``token_entropy`` / ``token_accuracy`` [B, T] (target-aligned, from the loss's row pass); labels and
    token_weights [B, T] as in the batch. Returns float32 0-dim tensors (Σ entropy, Σ correct, count)."""
    mask = learned_mask(labels, token_weights, ignore_index, target_aligned=True).to(outputs.token_entropy.device)
    return outputs.token_entropy[mask].sum(), outputs.token_accuracy[mask].sum(), mask.sum().float()


def _refuse_fused_lm_head(causal_lm) -> None:
    """Make ``model(..., fused_lm_head=True)`` (TRL's unweighted loss path) an error on the mrloss forward."""
    mrloss_forward = causal_lm.forward

    @functools.wraps(mrloss_forward)
    def forward(*args, fused_lm_head: bool = False, **kwargs):
        if fused_lm_head:
            raise RuntimeError(
                "MultiRegionSFTTrainer: TRL's fused LM head (fused_lm_head=True) was replaced by mrloss's weighted "
                "loss; the model's own forward with labels and token_weights computes it"
            )
        return mrloss_forward(*args, **kwargs)

    causal_lm.forward = forward


class _MRLossSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the model's own (the mrloss forward), with TRL's logs kept and every
    per-token column carried through TRL's data preparation. `MultiRegionSFTTrainer` puts
    `MultiRegionTrainer` in front of it."""

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation (tokenizing, labels from ``completion_mask`` / ``assistant_masks``), then truncation
        to ``max_length`` and packing of every per-token column together (TRL would cut and keep only
        ``input_ids`` and ``labels``)."""
        columns = [name for name in TOKEN_COLUMNS if name in get_dataset_column_names(dataset)]
        if not columns:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        untruncated = copy.copy(args)
        untruncated.max_length, untruncated.shuffle_dataset = None, False
        dataset = super()._prepare_dataset(dataset, processing_class, untruncated, False, formatting_func, dataset_name)
        columns = ["input_ids", "labels", *columns]
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, datasets.Dataset) else {}
        if packing:
            if args.max_length is None:
                raise ValueError("When packing is enabled, `max_length` can't be `None`.")
            dataset = dataset.select_columns(columns)
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        elif args.max_length is not None:
            if args.truncation_mode not in ("keep_start", "keep_end"):
                raise ValueError(f"Unsupported truncation mode: {args.truncation_mode}")
            window = (
                slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)
            )
            dataset = dataset.map(lambda example: {name: example[name][window] for name in columns}, **map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss (``transformers.Trainer.compute_loss``: the mrloss forward with the step's Σw),
        plus TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` logs."""
        mode = "train" if self.model.training else "eval"
        loss, outputs = transformers.Trainer.compute_loss(
            self, model, {**inputs, "use_cache": False}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if outputs.token_entropy is not None:  # None on steps that do not log (MultiRegionTrainer._logs_this_step)
            labels, weights = inputs["labels"], inputs.get("token_weights")
            sums = token_metric_sums(outputs, labels, weights, ignore_index=self.ignore_index)
            entropy_sum, num_correct, num_valid = (self.accelerator.gather_for_metrics(s).sum() for s in sums)
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
            accuracy = (num_correct / num_valid).item() if num_valid > 0 else 0.0
            self._metrics[mode]["mean_token_accuracy"].append(accuracy)
        if mode == "train":  # TRL's token count: attention_mask, or the padding-free row's length
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


class MultiRegionSFTTrainer(MultiRegionTrainer, _MRLossSFTTrainer):
    """``trl.SFTTrainer`` for multi-region weighted SFT with mrloss's fused loss.

    model: a supported ``*ForCausalLM`` instance (or PEFT model), or a model path / id (loaded as TRL loads it);
    ``peft_config`` (LoRA etc.) is applied by TRL -- keep ``lm_head`` out of its ``target_modules``.
    args: ``trl.SFTConfig`` (or TrainingArguments, converted; None: TRL's defaults): ``packing``,
    ``padding_free``, ``max_length``, ``completion_only_loss``, ``assistant_only_loss`` work as in TRL.
    train_dataset / eval_dataset: anything `sft_dataset` takes (encoded with ``processing_class`` and
    ``dataset_options``). loss_options / region_types / weighting / monitor: as in `MultiRegionTrainer`
    (region_types default: the training set's). Other keywords go to ``trl.SFTTrainer``.

    TRL's ``loss_type="dft"``, ``compute_loss_func`` and ``label_smoothing_factor`` are refused (use
    ``loss_options={"label_smoothing": ...}``).
    """

    def __init__(
        self,
        model,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        *,
        processing_class=None,
        loss_options: dict | None = None,
        region_types: list[str] | None = None,
        weighting=None,
        monitor=None,
        dataset_options: dict | None = None,
        **kwargs,
    ):
        args = sft_config(args)
        if args.loss_type != "nll" or kwargs.get("compute_loss_func") is not None or args.label_smoothing_factor > 0:
            raise ValueError(
                "MultiRegionSFTTrainer: the loss is mrloss's weighted cross-entropy; loss_type='dft', "
                "compute_loss_func and label_smoothing_factor are not supported "
                "(label smoothing: loss_options={'label_smoothing': x})"
            )
        if isinstance(model, (str, Path)):
            model = create_model_from_path(str(model), **(args.model_init_kwargs or {}))
        if isinstance(processing_class, transformers.PreTrainedTokenizerBase) and processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token  # what TRL does, needed before its __init__
        train_dataset = sft_dataset(train_dataset, processing_class, **(dataset_options or {}))
        if region_types is None:
            region_types = dataset_region_types(train_dataset)
        eval_dataset = sft_dataset(eval_dataset, processing_class, region_types=region_types, **(dataset_options or {}))
        super().__init__(
            model,
            args,
            train_dataset,
            eval_dataset,
            processing_class=processing_class,
            loss_options=loss_options,
            region_types=region_types,
            weighting=weighting,
            monitor=monitor,
            **kwargs,
        )
        # TRL's __init__ patched the forward with its fused LM head: put the mrloss forward back, refuse TRL's path
        causal_lm = unwrap_causal_lm(self.model)
        apply_mrloss(self.model, **(loss_options or {}))
        _refuse_fused_lm_head(causal_lm)
        if not isinstance(self.data_collator, TokenWeightCollator):
            self.data_collator = TokenWeightCollator(self.data_collator)

    def _default_data_collator(self, processing_class, pack=False, max_length=None, pad_to_multiple_of=None):
        """None: TRL builds its collator (padded or padding-free), which __init__ wraps in `TokenWeightCollator`."""
        if pack or max_length is not None or pad_to_multiple_of is not None:
            raise ValueError(
                "MultiRegionSFTTrainer: pack / max_length / pad_to_multiple_of are SFTConfig's here "
                "(SFTConfig(packing=True, max_length=..., pad_to_multiple_of=...))"
            )
        return None
