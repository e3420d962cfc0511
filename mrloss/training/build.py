"""What a training run is built from: the data files (example data on demand), the tokenizer and the model.

Shared by `mrloss train` (`mrloss.training.run`) and ``python -m mrloss.integrations.verl``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mrloss.data.tokenizer import RUN_TOKENIZER_DIR
from mrloss.training.config import Config, ConfigError, DataConfig, ModelConfig


def ensure_data_files(data: DataConfig) -> None:
    """With ``data.write_examples``, write the example data set into the directory of every missing file
    (atomically: ranks and concurrent runs never see a half-written file). Then every file must exist."""
    missing = [Path(f) for f in [*data.train_files, *data.val_files] if not Path(f).exists()]
    if missing and data.write_examples:
        from mrloss.data import write_examples

        for directory in sorted({path.parent for path in missing}):
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory, prefix=".examples-") as scratch:
                for path in write_examples(scratch).values():
                    target = directory / Path(path).name
                    if not target.exists():
                        os.replace(path, target)
        missing = [path for path in missing if not path.exists()]
    if missing:
        hint = "" if data.write_examples else " (data.write_examples=true writes the example data set there)"
        raise ConfigError(f"config data: file(s) not found: {', '.join(map(str, missing))}{hint}")


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


def build_model(model_config: ModelConfig, tokenizer, *, max_length: int | None, seed: int):
    """``model.path`` loaded with transformers, or a tiny randomly initialized ``model.arch``."""
    import torch
    import transformers

    dtype = getattr(torch, model_config.dtype)
    options = {"attn_implementation": model_config.attn_implementation} if model_config.attn_implementation else {}
    if model_config.path is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(model_config.path, dtype=dtype, **options)
    head_dim = model_config.hidden_size // model_config.num_heads
    try:
        model_config_hf = transformers.AutoConfig.for_model(
            model_config.arch,
            vocab_size=len(tokenizer),
            hidden_size=model_config.hidden_size,
            intermediate_size=model_config.intermediate_size,
            num_hidden_layers=model_config.num_layers,
            num_attention_heads=model_config.num_heads,
            num_key_value_heads=model_config.num_kv_heads,
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
    return transformers.AutoModelForCausalLM.from_config(model_config_hf, dtype=dtype, **options)
