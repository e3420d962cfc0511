"""The tests' one builder of tiny causal LMs: a transformers config (no download), seeded random weights.

Importable from test modules and from the processes they spawn (pytest puts ``tests/`` on ``sys.path``).

- `tiny_causal_lm(vocab_size, model_type, **config)`: a hand-sized model of one family (the tests of one feature).
- `tiny_config(model_type)` / `build_tiny(model_type)`: any family of the installed transformers shrunk generically
  (sizes, layer types, sub-configs, special token ids), for the test that runs every ``*ForCausalLM``."""

import torch
import transformers
from transformers.integrations import hub_kernels

# The tests never reach the Hugging Face Hub. With the `kernels` package installed (the verl extra pins one),
# transformers would fetch hub kernels for Mamba-style layers (causal-conv1d, mamba-ssm) and fail without a network;
# its own PyTorch path is the one under test.
if getattr(hub_kernels, "_kernels_available", False):
    hub_kernels._kernels_available = False

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


TINY_VOCAB = 100
MAX_TINY_PARAMETERS = 4_000_000
# Every family: config keys set when the config has them (the sizes of every shape, the MoE routers on, the head
# scales away from 1 so that a model ignoring one shows).
GENERIC_TINY = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    # encoder-decoder families' decoders, and other spellings of the sizes
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_encoder_layers=1,
    num_decoder_layers=2,
    embedding_size=32,
    input_embedding_size=32,
    output_embedding_size=32,
    rotary_dim=8,
    # state-space layers (Mamba, Bamba, Falcon-H1, Jamba, Zamba, ...): d_ssm = heads * head dim = expand * hidden
    mamba_d_ssm=64,
    mamba_n_heads=8,
    mamba_d_head=8,
    mamba_d_state=8,
    mamba_chunk_size=8,
    mamba_expand=2,
    mamba_n_groups=1,
    state_size=8,
    ssm_state_size=8,
    chunk_size=8,
    n_groups=1,
    time_step_rank=8,
    mamba_num_heads=8,
    mamba_head_dim=8,
    # hybrid layer patterns (Jamba, Bamba): layer 0 state-space, layer 1 attention (+ experts)
    attn_layer_period=2,
    attn_layer_offset=1,
    expert_layer_period=2,
    expert_layer_offset=1,
    attn_layer_indices=[1],
    # per-layer inputs (Gemma-3n, Gemma-4)
    vocab_size_per_layer_input=TINY_VOCAB,
    hidden_size_per_layer_input=8,
    num_kv_shared_layers=0,
    laurel_rank=8,
    # gated linear attention (Qwen3-Next, Qwen3.5)
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    # multi-head latent attention (DeepSeek and kin)
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    output_router_logits=True,
    router_aux_loss_coef=0.37,
    aux_loss_coef=0.37,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    sep_token_id=2,
    decoder_start_token_id=1,
    tie_word_embeddings=False,
    final_logit_softcapping=3.0,
    logit_scale=0.37,
    logits_scaling=2.5,
    lm_head_multiplier=0.7,
)
HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")  # set where not None
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id")


def _has(config, key: str) -> bool:
    return key in config.to_dict() or key in getattr(config, "attribute_map", {})


def _layer_lists(config, layers: int) -> tuple[int, dict]:
    """Per-layer lists of ``config`` (``layer_types``, ...) cut to one layer of each kind, in order; the new layer
    count (at least ``layers``)."""
    old = getattr(config, "num_hidden_layers", None)
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or not types:
        return layers, {}
    keep = sorted({types.index(kind) for kind in types})
    keep += [i for i in range(len(types)) if i not in keep][: max(0, layers - len(keep))]
    keep.sort()
    lists = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and old is not None and len(value) == old and key != "architectures":
            lists[key] = [value[i] for i in keep]
    return len(keep), lists


def tiny_kwargs(config) -> dict:
    """Keyword arguments that shrink ``config`` (a built default config): `GENERIC_TINY` where it has the key,
    per-layer lists cut, each sub-config shrunk the same way (as a dict)."""
    kwargs = {key: value for key, value in GENERIC_TINY.items() if _has(config, key)}
    kwargs = {key: value for key, value in kwargs.items() if key not in HEAD_KEYS or getattr(config, key) is not None}
    if "kv_lora_rank" in kwargs:  # multi-head latent attention: as many key-value heads as heads
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    if isinstance(getattr(config, "block_types", None), (list, tuple)):  # a repeating pattern (RecurrentGemma)
        kwargs["num_hidden_layers"] = max(kwargs.get("num_hidden_layers", 2), len(config.block_types))
    layers, lists = _layer_lists(config, kwargs.get("num_hidden_layers", 2))
    if lists:
        kwargs.update(lists, num_hidden_layers=layers)
    for key in TOKEN_ID_KEYS:  # a list of eos ids: one
        if key in kwargs and isinstance(getattr(config, key, None), (list, tuple)):
            kwargs[key] = [kwargs[key]]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[name] = {**sub.to_dict(), **tiny_kwargs(sub)}
    return kwargs


# model_type -> config keys the generic shrinking cannot derive
FAMILY_OVERRIDES = {"granitemoehybrid": {"layer_types": ["mamba", "attention"]}}  # its default has no attention layer


def tiny_config(model_type: str, **overrides):
    """A shrunk config of ``model_type`` (see `tiny_kwargs`, `FAMILY_OVERRIDES`), eager attention; ``overrides`` set
    last."""
    default = transformers.AutoConfig.for_model(model_type)
    overrides = {**FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    config = transformers.AutoConfig.for_model(model_type, **{**tiny_kwargs(default), **overrides})
    config._attn_implementation = "eager"
    return config


def build_tiny(model_type: str, *, seed: int = 0, auto_class=transformers.AutoModelForCausalLM, **overrides):
    """A float32 model of ``model_type`` from `tiny_config` (weights after ``torch.manual_seed(seed)``), in eval
    mode (no dropout). ValueError when it would have more than `MAX_TINY_PARAMETERS` parameters and buffers
    (counted on the meta device first: a config this function cannot shrink)."""
    config = tiny_config(model_type, **overrides)
    with torch.device("meta"):
        meta = auto_class.from_config(config)
    size = sum(t.numel() for t in [*meta.parameters(), *meta.buffers()])
    if size > MAX_TINY_PARAMETERS:
        raise ValueError(f"not tiny: {size} parameters")
    torch.manual_seed(seed)
    return auto_class.from_config(config).float().eval()


IMAGE_TOKEN, VISION_START, VISION_END = 97, 96, 95  # token ids of the tiny vision-language models


def tiny_vision_language_model(model_type: str, *, seed: int = 0):
    """``(model, image_inputs)``: a float32 ``*ForConditionalGeneration`` of ``model_type`` ("qwen2_5_vl" or "gemma3",
    vocabulary `TINY_VOCAB`, eval mode) and the model inputs of one row of 12 tokens with one image (4 image tokens
    at 3..6 between VISION_START and VISION_END): ``input_ids``, ``attention_mask``, ``pixel_values`` and the
    family's own extras (``image_grid_thw``; ``token_type_ids``)."""
    text = dict(vocab_size=TINY_VOCAB, **TINY_SIZES, max_position_embeddings=128, pad_token_id=0, bos_token_id=1)
    input_ids = torch.randint(3, VISION_END - 5, (1, 12), generator=torch.Generator().manual_seed(seed))
    input_ids[0, 2], input_ids[0, 3:7], input_ids[0, 7] = VISION_START, IMAGE_TOKEN, VISION_END
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if model_type == "qwen2_5_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=4)
        vision.update(spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0])
        ids = dict(image_token_id=IMAGE_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
        config = dict(text_config={**text, "rope_parameters": rope}, vision_config=vision, video_token_id=98, **ids)
        # 4 x 4 patches of 4 x 4 pixels (2 frames), merged 2 x 2: 4 image tokens
        inputs.update(pixel_values=torch.randn(16, 3 * 2 * 4 * 4), image_grid_thw=torch.tensor([[1, 4, 4]]))
    elif model_type == "gemma3":
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, patch_size=4)
        ids = dict(image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START, eoi_token_index=VISION_END)
        config = dict(
            text_config={**text, "head_dim": 8},
            vision_config={**vision, "image_size": 16},
            mm_tokens_per_image=4,
            **ids,
        )
        inputs.update(pixel_values=torch.randn(1, 3, 16, 16), token_type_ids=(input_ids == IMAGE_TOKEN).long())
    else:
        raise ValueError(f"no tiny vision-language model of {model_type!r}")
    model_config = transformers.AutoConfig.for_model(model_type, **config)
    model_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.AutoModelForImageTextToText.from_config(model_config).float().eval(), inputs
