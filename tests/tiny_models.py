"""The tests' one builder of tiny causal LMs: a transformers config (no download), seeded random weights.

Importable from test modules and from the processes they spawn (pytest puts ``tests/`` on ``sys.path``)."""

import torch
import transformers

TINY_SIZES = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_causal_lm(vocab_size: int, model_type: str = "llama", *, seed: int = 0, **config):
    """A float32 ``*ForCausalLM`` of ``model_type`` with ``TINY_SIZES`` (``config`` overrides them and sets any
    other config key, e.g. ``attn_implementation="eager"``, ``tie_word_embeddings``), initialized after
    ``torch.manual_seed(seed)``."""
    model_config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**TINY_SIZES, **config})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(model_config).float()
