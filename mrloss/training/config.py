"""YAML config schema of a training run: load, validate, ``key.sub=value`` overrides, defaults.

A config has six sections; every key is optional except ``data.train_files``::

    data:      train_files, val_files, format, extra_keys, max_length, truncation, pack, add_eos, write_examples
    model:     path (null: a tiny model built from a transformers config), arch, hidden_size, num_layers,
               num_heads, num_kv_heads, intermediate_size, vocab_size, dtype, attn_implementation,
               gradient_checkpointing
    loss:      the options of `mrloss.LossOptions` a run sets (`LOSS_CONFIG_OPTIONS`: backend, chunk_size, ...)
    trainer:   output_dir, epochs, max_steps, learning_rate, per_device_batch_size,
               gradient_accumulation_steps, weight_decay, warmup_ratio, lr_scheduler, max_grad_norm,
               seed, logging_steps, save_steps, save_total_limit, eval_steps, resume_from_checkpoint,
               overwrite_output_dir, device, dataloader_num_workers, report_to, backend (hf | trl)
    weighting: dynamic_weights (DynamicWeightAdjuster config or null),
               region_dependencies (RegionDependencyHandler config or null)
    monitor:   enabled, output_dir
    fsdp:      enabled, reshard_after_forward, layers

Rules: an unknown key anywhere is an error naming its path (``data.max_lenght``); values are type-checked
(an int is accepted for a float; a string such as ``1e-3`` -- which YAML reads as a string -- is accepted
for a float when it parses as one; a single string for a list of strings), then range-checked (`VALUE_RANGES`:
a batch size of 0 or a learning rate of nan is an error); a recursive YAML alias is an error. Relative paths are
relative to the working directory of the run (the run scripts run from the repository root). Overrides
``key.sub=value`` are applied before validation; the value is parsed as YAML (``trainer.max_steps=3``,
``model.path=null``, ``data.train_files=[a.jsonl,b.jsonl]``), except that a ``#`` YAML would read as the
start of a comment is kept: ``trainer.output_dir=/data/run #2`` is the string ``/data/run #2``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mrloss.configs import builtin_configs, resolve_config
from mrloss.data.encode import DEFAULT_MAX_LENGTH
from mrloss.data.tokenizer import DEFAULT_VOCAB_SIZE
from mrloss.formats import INPUT_FORMATS
from mrloss.ops.options import MODEL_OPTIONS, LossOptions

DataFormat = Literal[("auto", *INPUT_FORMATS)]  # data.format: "auto" or a format of mrloss.formats' registry


class ConfigError(ValueError):
    """A config problem; the message starts with the key path (``config trainer.epochs: ...``)."""


@dataclasses.dataclass
class DataConfig:
    """Where the samples are and how they become token sequences (see `mrloss.data`)."""

    # JSONL / JSON / Parquet, or directories of `mrloss prepare --tokenizer` (their tokenizer is used when
    # model.path is null); required
    train_files: list[str] = dataclasses.field(default_factory=list)
    val_files: list[str] = dataclasses.field(default_factory=list)
    format: DataFormat = "auto"
    # top-level sample keys besides the format's and mrloss.formats.METADATA_KEYS: error, keep (as metadata), or
    # a list of key names kept
    extra_keys: Literal["error", "keep"] | list[str] = "error"
    max_length: int | None = DEFAULT_MAX_LENGTH
    truncation: Literal["right", "left", "error"] = "right"
    pack: bool = False  # pack several samples per row (position_ids restart per sample)
    add_eos: bool = True
    # True: a missing train/val file is created by writing the shipped example data set
    # (`mrloss.data.examples.write_examples`) into that file's directory first.
    write_examples: bool = False


@dataclasses.dataclass
class ModelConfig:
    """``path``: a local HF model directory (model + tokenizer). null: a tiny randomly initialized model of
    architecture ``arch`` (a transformers model_type) with the sizes below and a byte-level BPE tokenizer
    of ``vocab_size`` trained on the training texts -- no downloads."""

    path: str | None = None
    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = DEFAULT_VOCAB_SIZE
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None  # None: transformers' default (sdpa)
    gradient_checkpointing: bool = False


# The options of `mrloss.LossOptions` a run sets: its model options (not decided per call), except ignore_index (the
# data pipeline marks what is not learned with IGNORE_INDEX itself). A new loss option becomes a config key here.
LOSS_CONFIG_OPTIONS = tuple(name for name in MODEL_OPTIONS if name != "ignore_index")


def _loss_config_class() -> type:
    """The ``loss`` section's dataclass: one field per `LOSS_CONFIG_OPTIONS`, typed and defaulted as in
    `mrloss.LossOptions` (its Literal types are the allowed values)."""
    hints, defaults = typing.get_type_hints(LossOptions), LossOptions()
    fields = [(name, hints[name], dataclasses.field(default=getattr(defaults, name))) for name in LOSS_CONFIG_OPTIONS]
    doc = "Options of `mrloss.linear_cross_entropy`; softcap null keeps the model's final_logit_softcapping."
    return dataclasses.make_dataclass("LossConfig", fields, namespace={"__doc__": doc, "__module__": __name__})


LossConfig = _loss_config_class()


@dataclasses.dataclass
class TrainerConfig:
    """Training loop settings (mapped onto `transformers.TrainingArguments` by `mrloss.training.run`)."""

    output_dir: str = "outputs/multi_region"
    epochs: float = 1.0
    max_steps: int | None = None  # set: overrides epochs
    learning_rate: float = 1e-3
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # fraction of the total steps, in [0, 1)
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 10
    save_steps: int | None = None  # null: no intermediate checkpoints (the final model is always saved)
    save_total_limit: int | None = 2
    eval_steps: int | None = None  # null: evaluate at the end of each epoch when val_files are given
    resume_from_checkpoint: str | bool | None = None  # a checkpoint dir, or true: the last in output_dir
    overwrite_output_dir: bool = False  # true: train into a non-empty output_dir (its old checkpoints are removed)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dataloader_num_workers: int = 0
    report_to: list[str] = dataclasses.field(default_factory=list)  # e.g. [tensorboard]
    # hf: mrloss.integrations.hf.MultiRegionTrainer; trl: mrloss.integrations.trl.MultiRegionSFTTrainer (TRL's
    # SFTTrainer; data.pack becomes TRL's padding-free "bfd" packing); `mrloss train --trainer trl` sets it
    backend: Literal["hf", "trl"] = "hf"


@dataclasses.dataclass
class WeightingConfig:
    """Region steering tools (`mrloss.weighting.RegionWeighting.from_config` takes this section)."""

    dynamic_weights: dict | None = None
    region_dependencies: dict | None = None


@dataclasses.dataclass
class MonitorConfig:
    """`mrloss.debug.MultiRegionTrainingMonitor`: per-region statistics as JSONL (default
    ``<trainer.output_dir>/monitor``)."""

    enabled: bool = True
    output_dir: str | None = None


@dataclasses.dataclass
class FsdpConfig:
    """FSDP2 (``fully_shard`` through transformers / accelerate; run under torchrun): ``fully_shard`` on each
    module whose class name is in ``layers`` (empty: the model's ``_no_split_modules``, its decoder layer), then
    on the root; accelerate also gives the input embedding and [final norm, lm_head] their own units."""

    enabled: bool = False
    reshard_after_forward: bool = True  # false: keep parameters gathered from forward to backward (ZeRO-2)
    layers: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    weighting: WeightingConfig = dataclasses.field(default_factory=WeightingConfig)
    monitor: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)
    fsdp: FsdpConfig = dataclasses.field(default_factory=FsdpConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read the YAML file at ``path``, or the built-in config of that name (None: all defaults), apply
    ``key.sub=value`` overrides, validate."""
    raw: Any = {}
    if path is not None:
        path = resolve_config(path)  # a built-in name (``tag_based``) or a file
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            builtin = ", ".join(builtin_configs())
            raise ConfigError(f"config file {str(path)!r} not found (built-in configs: {builtin})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        raw = {} if raw is None else raw
        _check_acyclic(raw, "", set(), set())
    raw = apply_overrides(raw, overrides)
    config = config_from_dict(raw)
    if not config.data.train_files:
        raise ConfigError("config data.train_files: required (one or more JSONL / JSON / Parquet files)")
    return config


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of ``raw`` with each ``a.b.c=value`` set (value parsed as YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(raw).__name__}")
    raw = _deep_copy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        try:
            value = _override_value(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: value is not valid YAML: {error}") from None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: config {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _override_value(text: str):
    """The YAML value of an override, or ``text`` itself where YAML would drop a trailing comment (the shell has
    already taken the user's quotes: ``/data/run #2`` must not become ``/data/run``)."""
    tokens = [token for token in yaml.scan(text) if not isinstance(token, yaml.StreamEndToken)]
    end = max((token.end_mark.index for token in tokens), default=0)
    return text if text[end:].strip() else yaml.safe_load(text)


def _check_acyclic(value, path: str, ancestors: set[int], checked: set[int]) -> None:
    """ConfigError for a YAML alias inside its own anchor (``a: &x [*x]``), which would recurse forever.
    ``checked``: containers already walked (shared aliases are walked once)."""
    if not isinstance(value, (dict, list)) or id(value) in checked:
        return
    if id(value) in ancestors:
        raise ConfigError(f"config {path or '<top>'}: a YAML alias refers to its own anchor (recursive structure)")
    ancestors.add(id(value))
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        _check_acyclic(item, f"{path}.{key}" if path else str(key), ancestors, checked)
    ancestors.discard(id(value))
    checked.add(id(value))


class ValueRange(typing.NamedTuple):
    """``low < value`` (``low <= value`` when ``inclusive``) and, when ``high`` is set, ``value <= high``."""

    low: float
    inclusive: bool = False
    high: float | None = None

    def describe(self) -> str:
        lower = f"{'>=' if self.inclusive else '>'} {self.low}"
        return lower if self.high is None else f"{lower} and <= {self.high}"

    def __contains__(self, value) -> bool:
        above = value >= self.low if self.inclusive else value > self.low
        return above and (self.high is None or value <= self.high)


# ranges the types cannot say: key path -> ValueRange; every float must also be finite
VALUE_RANGES = {
    "data.max_length": ValueRange(0),
    "model.hidden_size": ValueRange(0),
    "model.num_layers": ValueRange(0),
    "model.num_heads": ValueRange(0),
    "model.num_kv_heads": ValueRange(0),
    "model.intermediate_size": ValueRange(0),
    "model.vocab_size": ValueRange(0),
    "loss.chunk_size": ValueRange(0),
    "loss.softcap": ValueRange(0),
    "loss.label_smoothing": ValueRange(0, inclusive=True, high=1),
    "trainer.epochs": ValueRange(0),
    "trainer.max_steps": ValueRange(0),
    "trainer.learning_rate": ValueRange(0, inclusive=True),
    "trainer.per_device_batch_size": ValueRange(0),
    "trainer.gradient_accumulation_steps": ValueRange(0),
    "trainer.weight_decay": ValueRange(0, inclusive=True),
    "trainer.warmup_ratio": ValueRange(0, inclusive=True, high=1),
    "trainer.max_grad_norm": ValueRange(0, inclusive=True),
    "trainer.logging_steps": ValueRange(0),
    "trainer.save_steps": ValueRange(0),
    "trainer.save_total_limit": ValueRange(0),
    "trainer.eval_steps": ValueRange(0),
    "trainer.dataloader_num_workers": ValueRange(0, inclusive=True),
    "trainer.seed": ValueRange(0, inclusive=True, high=2**32 - 1),  # numpy's seed range
}


def check_ranges(config: Config) -> None:
    """ConfigError for a value outside `VALUE_RANGES` or a float that is not finite (null is always allowed)."""
    for section in dataclasses.fields(config):
        for field in dataclasses.fields(getattr(config, section.name)):
            path = f"{section.name}.{field.name}"
            value = getattr(getattr(config, section.name), field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config {path}: expected a finite number, got {value}")
            if path in VALUE_RANGES and value is not None and value not in VALUE_RANGES[path]:
                raise ConfigError(f"config {path}: expected a value {VALUE_RANGES[path].describe()}, got {value}")


def config_from_dict(raw: dict) -> Config:
    """Validate a nested dict against the schema (unknown keys, wrong types and values out of range raise
    ConfigError)."""
    config = _build(Config, raw, "")
    check_ranges(config)
    try:  # every rule of the loss options (VALUE_RANGES above only words the common ones for a config)
        LossOptions(**dataclasses.asdict(config.loss))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config loss: {error}") from None
    check_model_sizes(config.model)
    build_weighting(config.weighting)
    return config


def check_model_sizes(model: ModelConfig) -> None:
    """ConfigError for sizes of the tiny model (``model.path`` null) that attention cannot split: ``hidden_size``
    into ``num_heads`` heads, ``num_heads`` into ``num_kv_heads`` groups."""
    if model.path is not None:
        return
    if model.hidden_size % model.num_heads:
        raise ConfigError(
            f"config model.num_heads: model.hidden_size {model.hidden_size} is not a multiple of "
            f"{model.num_heads} heads"
        )
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(
            f"config model.num_kv_heads: model.num_heads {model.num_heads} is not a multiple of {model.num_kv_heads} "
            "key/value heads"
        )


def build_weighting(section: WeightingConfig):
    """`mrloss.weighting.RegionWeighting` of the ``weighting`` section (None when both tools are off); its checks
    (unknown keys, values out of range, dependency cycles) as ConfigError ``config weighting.<key>: ...``."""
    if section.dynamic_weights is None and section.region_dependencies is None:
        return None
    from mrloss.weighting import RegionWeighting

    try:
        return RegionWeighting.from_config(dataclasses.asdict(section))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config weighting.{error}") from None


def _deep_copy(value):
    return {k: _deep_copy(v) for k, v in value.items()} if isinstance(value, dict) else value


def _build(cls, raw, path: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path or '<top>'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"config {key_path}: unknown key (known keys here: {', '.join(sorted(fields))})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            values[key] = _build(annotation, {} if value is None else value, key_path)
        else:
            values[key] = _check(value, annotation, key_path)
    return cls(**values)


def _check(value, annotation, path: str):
    """``value`` converted to ``annotation`` (int, float, bool, str, dict, list[X], Literal, X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _check(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"config {path}: expected {_describe(annotation)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config {path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_check(item, args[0], f"{path}[{i}]") for i, item in enumerate(items)]
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, annotation):
        return value
    raise ConfigError(f"config {path}: expected {_describe(annotation)}, got {type(value).__name__} {value!r}")


def _describe(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return "null" if annotation is type(None) else annotation.__name__
