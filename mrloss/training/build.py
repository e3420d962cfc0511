"""What a training run is built from: the data files (example data on demand), the tokenizer and the model.

Shared by `mrloss train` (`mrloss.training.run`) and ``python -m mrloss.integrations.verl``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

from mrloss.data.tokenizer import RUN_TOKENIZER_DIR
from mrloss.training.config import Config, ConfigError, DataConfig, ModelConfig


def ensure_data_files(data: DataConfig) -> None:
    """Every train/val file must exist. With ``data.write_examples`` a missing file that is one of the shipped
    example paths (`mrloss.data.examples.example_path`, where the built-in configs read) is first written from the
    example data set (atomically: ranks and concurrent runs never see a half-written file); any other missing file
    is an error before anything is written (a typo'd path never fills the user's folder with example files)."""
    from mrloss.data.examples import EXAMPLE_DIRECTORY, is_example_path

    missing = [Path(f) for f in [*data.train_files, *data.val_files] if not Path(f).exists()]
    writable = [path for path in missing if data.write_examples and is_example_path(path)]
    not_found = [path for path in missing if path not in writable]
    if not_found:
        hint = (
            f" (data.write_examples writes the example data set only to {EXAMPLE_DIRECTORY}/<format>.jsonl)"
            if data.write_examples
            else ""
        )
        raise ConfigError(f"config data: file(s) not found: {', '.join(map(str, not_found))}{hint}")
    if writable:
        from mrloss.data import write_examples

        for directory in sorted({path.parent for path in writable}):
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory, prefix=".examples-") as scratch:
                for path in write_examples(scratch).values():
                    target = directory / Path(path).name
                    if not target.exists():
                        os.replace(path, target)


def check_learned_tokens(dataset, data: DataConfig) -> bool:
    """ConfigError when no training sample has a learned token (weight > 0): the run would train nothing and log
    losses of 0 (most often a ``data.format`` that does not match the files); a warning naming how many samples
    have none otherwise. ``dataset``: a `MultiRegionDataset` of ``data.train_files`` (tokenized data: only its
    token-weight and region-id columns are read, `MultiRegionDataset.learned_samples`). Returns whether a learned
    token lies outside every region (``default_weight > 0``: what a multiplier shared by all types acts against)."""
    learned, weighted_outside = dataset.learned_samples()
    count, without = len(learned), int((~learned).sum())
    if without == count:
        raise ConfigError(
            f"config data.train_files: 0 of {count} samples in {', '.join(data.train_files)} have a learned token "
            f"(weight > 0), so nothing would be trained: {_likely_cause(dataset, data)}"
        )
    if without:
        example = dataset.sample_ids[int((~learned).nonzero()[0])]
        warnings.warn(
            f"{without} of {count} training samples have no learned token (weight > 0) and train nothing, "
            f"e.g. {example}",
            stacklevel=2,
        )
    return weighted_outside


def _likely_cause(dataset, data: DataConfig) -> str:
    """The likely cause of a data set without learned tokens: truncation that cut the learned regions, the format the
    first sample looks like when it is not ``data.format``, else regions of weight 0 and default_weight 0."""
    if dataset.truncated:
        return (
            f"data.max_length {data.max_length} ({data.truncation} truncation) cut the learned regions of "
            f"{len(dataset.truncated)} samples"
        )
    from mrloss.data.records import iter_records
    from mrloss.formats import detect_format

    if data.format != "auto":
        raw = next((path for path in data.train_files if not Path(path).is_dir()), None)
        first = next(iter_records(raw), None) if raw is not None else None
        sample = first.sample if first is not None else None
        if isinstance(sample, dict):
            looks = detect_format(sample)
            tags = looks != "tag_based" or "<LEARN" in str(sample.get("text", ""))
            if looks != data.format and tags:
                return f"data.format is {data.format} but the samples look {looks} (set data.format={looks} or auto)"
    return "every region has weight 0 and so has the text outside them (default_weight); check data.format"


def build_tokenizer(config: Config, checkpoint: str | None, *, is_main: bool):
    """The model's tokenizer (``model.path``), the one of the checkpoint, or a BPE trained on the data
    (by the main process, saved in ``<output_dir>/tokenizer``; the others load it)."""
    from transformers import AutoTokenizer

    source = config.model.path or checkpoint or _tokenizer_of_tokenized_data(config.data.train_files)
    if source is None and not is_main:
        source = os.path.join(config.trainer.output_dir, RUN_TOKENIZER_DIR)
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        from mrloss.data.tokenizer import train_bpe_tokenizer_for_files

        tokenizer = train_bpe_tokenizer_for_files(config.data.train_files, config.data.format, config.model.vocab_size)
        tokenizer.save_pretrained(os.path.join(config.trainer.output_dir, RUN_TOKENIZER_DIR))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_of_tokenized_data(paths) -> str | None:
    """The tokenizer saved with tokenized training data (`mrloss prepare --tokenizer`), if that is the data."""
    from mrloss.data.tokenized import TOKENIZER_DIR, is_tokenized

    return next((os.path.join(path, TOKENIZER_DIR) for path in paths if is_tokenized(path)), None)


# the config's `model:` sizes of a tiny model -> the transformers config keys they set
TINY_MODEL_KEYS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


def build_model(model_config: ModelConfig, tokenizer, *, max_length: int | None, seed: int):
    """``model.path`` loaded with transformers, or a tiny randomly initialized ``model.arch``; ConfigError for an
    architecture mrloss cannot patch or an attention implementation transformers cannot use here."""
    import torch
    import transformers

    dtype = getattr(torch, model_config.dtype)
    options = {"attn_implementation": model_config.attn_implementation} if model_config.attn_implementation else {}
    if model_config.path is not None:
        with _attention_errors(model_config):
            model = transformers.AutoModelForCausalLM.from_pretrained(model_config.path, dtype=dtype, **options)
        return check_architecture(model, "model.path")
    head_dim = model_config.hidden_size // model_config.num_heads
    try:
        model_config_hf = transformers.AutoConfig.for_model(
            model_config.arch,
            vocab_size=len(tokenizer),
            **{hf_key: getattr(model_config, key) for key, hf_key in TINY_MODEL_KEYS.items()},
            head_dim=head_dim,
            max_position_embeddings=max(max_length or 0, 2048),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    except ValueError as error:
        raise ConfigError(
            f"config model.arch: {model_config.arch!r} is not a transformers model type ({error})"
        ) from None
    transformers.set_seed(seed)
    with _attention_errors(model_config):
        model = transformers.AutoModelForCausalLM.from_config(model_config_hf, dtype=dtype, **options)
    return check_architecture(model, "model.arch")


@contextlib.contextmanager
def _attention_errors(model_config: ModelConfig):
    """transformers' refusal of ``model.attn_implementation`` (not installed, unknown, unsupported by the model) as a
    ConfigError; other errors pass."""
    try:
        yield
    except (ImportError, ValueError) as error:
        if model_config.attn_implementation is None:
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"config model.attn_implementation: {model_config.attn_implementation!r}: {first_line}"
        ) from None


def check_architecture(model, key: str):
    """``model`` when its head passes `mrloss.integrations.head_input.check_head`, else ConfigError naming the config
    ``key`` it came from and the reason."""
    from mrloss.integrations.head_input import check_head

    try:
        check_head(model, model.forward, caller=f"config {key}")
    except TypeError as error:
        raise ConfigError(str(error)) from None
    return model


# transformers config key -> the mrloss config key that sets it (model.path null)
_MODEL_SHAPE_KEYS = {
    "model_type": "model.arch",
    "hidden_size": "model.hidden_size",
    "num_hidden_layers": "model.num_layers",
    "num_attention_heads": "model.num_heads",
    "num_key_value_heads": "model.num_kv_heads",
    "intermediate_size": "model.intermediate_size",
    "vocab_size": "model.vocab_size",
}


def check_resume_model(model, checkpoint: str) -> None:
    """ConfigError when the checkpoint to resume from holds a model of another shape than the one the config builds
    (its ``config.json``: architecture, sizes), naming the first key that differs; before any weight is loaded."""
    import json

    path = Path(checkpoint) / "config.json"
    if not path.exists():
        return  # not a transformers checkpoint: transformers reports it
    saved, built = json.loads(path.read_text(encoding="utf-8")), model.config.to_dict()
    for key, config_key in _MODEL_SHAPE_KEYS.items():
        if key in saved and key in built and saved[key] != built[key]:
            raise ConfigError(
                f"config trainer.resume_from_checkpoint: {checkpoint} holds a model with {key} {saved[key]!r}, the "
                f"config builds {built[key]!r} ({config_key}); resume with the run's model settings or start a new run"
            )
