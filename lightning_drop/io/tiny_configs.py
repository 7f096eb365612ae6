"""Tiny random-init configs of any causal-LM model type of the installed transformers.

A model type's config class is built with its defaults (sizes of a real checkpoint) and shrunk consistently:
every size field a config may use under any of its names is set to one small value, per-layer lists are
re-sized to the new layer count keeping each layer kind, and the few fields a family needs beyond that are
data (`FAMILY_OVERRIDES`), never code. Types that cannot become a tiny decoder on CPU are listed in
`REFUSED` with the reason, so callers (tests, the support table) never skip one silently.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError

NUM_LAYERS = 4
HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
WINDOW = 8  # sliding windows shorter than a test sequence, so the window is exercised

# field names (as the installed config classes spell them) -> the small value; set only where a config has it
_SIZES: dict[tuple[str, ...], Any] = {
    ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"): HIDDEN,
    ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
     "decoder_attention_heads"): HEADS,
    ("head_dim", "attention_head_dim", "kv_channels", "v_head_dim", "linear_key_head_dim",
     "linear_value_head_dim", "mamba_d_head", "mamba_head_dim"): HEAD_DIM,
    ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "encoder_ffn_dim", "decoder_ffn_dim",
     "dense_intermediate_size"): 128,
    ("moe_intermediate_size", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"): 32,
    ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"): 4,
    ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"): 2,
    ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"): 1,
    ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"): 512,
    ("sliding_window", "sliding_window_size", "window_size"): WINDOW,
    ("kv_lora_rank",): 16, ("q_lora_rank",): 24, ("qk_rope_head_dim",): 8, ("qk_nope_head_dim",): 8,
    ("n_group", "topk_group"): 1, ("first_k_dense_replace",): 1,
    ("state_size", "mamba_d_state", "ssm_state_size"): 16,
    ("linear_num_key_heads", "linear_num_value_heads"): HEADS,
    # Mamba-2 mixers: heads x head_dim must equal expand (2) x hidden
    ("mamba_n_heads", "mamba_num_heads"): 2 * HIDDEN // HEAD_DIM, ("mamba_d_ssm",): 2 * HIDDEN,
    ("rotary_dim",): HEAD_DIM // 2,
    ("mamba_n_groups", "n_groups"): 1,
    ("time_step_rank", "mamba_dt_rank"): 8,
    ("num_key_value_heads", "num_kv_heads"): 2,
    ("conv_L_cache", "mamba_d_conv", "conv_kernel", "linear_conv_kernel_dim"): 4,
}
# fields that must equal another after the shrink (MLA: rotary embeddings span the rope part of a head only)
_DERIVED = {"head_dim": "qk_rope_head_dim"}
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "decoder_layers")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
              "cls_token_id", "unk_token_id", "mask_token_id")
_VOCAB = ("vocab_size", "n_vocab", "padded_vocab_size")
VOCAB_SIZE = 320
_SUBCONFIGS = ("text_config", "decoder", "language_config", "llm_config", "vision_config")

# Per-family fields beyond the shared shrink, as data: the periods and offsets of hybrids (so that 4 layers hold
# every layer kind), MLA ranks, RoPE sections that must sum to head_dim / 2.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
              "use_mamba_kernels": False},
    "falcon_mamba": {"use_mamba_kernels": False},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "use_mamba_kernels": False},
    "mamba2": {"num_heads": 2 * HIDDEN // HEAD_DIM},
    "bamba": {"attn_layer_indices": [1, 3]},
    "lfm2": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"]},
    # one sublayer per layer: Mamba-2 ("linear_attention") first, as in the released checkpoints; three token
    # mixers, so that a test can drop two and keep one, and MLP layers after the first drops, so that a cut
    # may start with a layer that mixes no tokens
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "mlp", "mlp", "full_attention",
                                         "linear_attention"]},
    # dense and MoE feed-forwards interleaved, and attention chunks shorter than a test sequence
    "llama4_text": {"moe_layers": [1, 3], "attention_chunk_size": WINDOW},
    # multi-head latent attention expands its one shared latent to every head: as many KV heads as heads
    **dict.fromkeys(("axk1", "glm4_moe_lite", "minicpm3", "sarvam_mla", "youtu"), {"num_key_value_heads": HEADS}),
}

# Model types that cannot be a tiny decoder here, and why (checked by the tests: each must still fail to build).
_PER_LAYER = "sizes live in per-layer sub-configs, which the shrink does not reach yet"
_INCONSISTENT = "the shrunk config is not yet consistent"
REFUSED: dict[str, str] = {
    "gemma3n": "needs an extra package (timm) for its vision tower",
    "prophetnet": "encoder-decoder (layer counts are per stack)",
    "reformer": "an encoder unless configured as a decoder (LSH/local attention, not a standard decoder)",
    "musicgen": "audio decoder over several codebooks, not a text decoder",
    "musicgen_melody": "audio decoder over several codebooks, not a text decoder",
    "xmod": "needs a language id per input (language adapters)",
    "rwkv": "pure recurrent model (no attention sublayer); its size fields are not shrunk yet",
    "xlstm": "pure recurrent model (no attention sublayer); its size fields are not shrunk yet",
    "blt": "byte-latent model of several sub-models: too slow to build tiny on CPU",
    "phi4_multimodal": "multimodal model whose audio/vision towers are too slow to build tiny on CPU",
    "moss_transcribe_diarize": "speech model whose audio encoder is not shrunk yet (300M parameters)",
    "gemma3n_text": "per-layer KV-cache sharing needs more layers than a tiny model has",
    **{t: _PER_LAYER for t in ("dots3_note", "dots3_note_text", "gemma4", "gemma4_assistant", "gemma4_text",
                               "gemma4_unified", "gemma4_unified_assistant", "gemma4_unified_text")},
    **{t: f"{_INCONSISTENT}: multi-head latent attention sizes" for t in (
        "axk2", "deepseek_v2", "deepseek_v32", "glm_moe_dsa", "hy_v4", "longcat_flash")},
    **{t: f"{_INCONSISTENT}: hybrid layer pattern or Mamba sizes" for t in (
        "lfm2_moe", "zamba", "zamba2", "hrm_text")},
    **{t: f"{_INCONSISTENT}: attention sizes read from a field it does not set" for t in (
        "cohere_compass_text", "dbrx", "dory", "dots1", "kolibri1_1", "nemotron", "qwen4_exp", "qwen4_exp_text")},
}


def _set(config: Any, key: str, value: Any) -> None:
    """Set a config field; fields that are read-only properties (computed from others) are left to compute."""
    try:
        setattr(config, key, value)
    except AttributeError:
        pass


def _set_sizes(config: Any) -> int:
    """Shrink `config`'s size fields in place; returns its old layer count (0 when it has none)."""
    old_layers = 0
    for key in _LAYER_COUNTS:
        if isinstance(getattr(config, key, None), int):
            old_layers = old_layers or getattr(config, key)
    for keys, value in _SIZES.items():
        for key in keys:
            old = getattr(config, key, None)
            if key == "head_dim" and hasattr(config, key) and old is None:
                old = value  # derived from hidden / heads by the model: the same value, stated
            if isinstance(old, int) and not isinstance(old, bool) and old > 0:
                # a single KV head (multi-query attention) or routed expert per token stays single
                _set(config, key, 1 if old == 1 else value)
    for key, source in _DERIVED.items():
        if getattr(config, key, None) is not None and getattr(config, source, None) is not None:
            _set(config, key, getattr(config, source))
    for key in _VOCAB:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, VOCAB_SIZE)
    return old_layers


def _resized(kinds: list[Any], n: int) -> list[Any]:
    """`kinds` cut to `n` entries, later entries replaced so that every kind of the original is present."""
    new = list(kinds[:n])
    missing = [k for k in dict.fromkeys(kinds) if k not in new]
    pos = n - 1
    for kind in missing:
        while pos >= 0 and new.count(new[pos]) < 2:
            pos -= 1
        if pos < 0:
            break
        new[pos] = kind
        pos -= 1
    return new


def _layer_count(config: Any, old_layers: int) -> int:
    """Enough layers (at least NUM_LAYERS) to hold each distinct kind of every per-layer list."""
    need = NUM_LAYERS
    for value in vars(config).values():
        per_layer = isinstance(value, list) and old_layers and len(value) == old_layers
        if per_layer and all(isinstance(v, str) for v in value):
            need = max(need, len(set(value)))  # named kinds; flags and numbers per layer need no more layers
    return need


def _shrink(config: Any, special_ids: dict[str, int]) -> None:
    old_layers = _set_sizes(config)
    n = _layer_count(config, old_layers)
    for key in _LAYER_COUNTS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, n)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and old_layers and len(value) == old_layers and key not in _TOKEN_IDS:
            setattr(config, key, _resized(value, n))
    for key in _TOKEN_IDS:
        if getattr(config, key, None) is not None:
            setattr(config, key, special_ids.get(key, special_ids["eos_token_id"]))
    for key, value in FAMILY_OVERRIDES.get(getattr(config, "model_type", ""), {}).items():
        setattr(config, key, value)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    for key in _SUBCONFIGS:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, special_ids)


def causal_lm_types() -> list[str]:
    """Every model type the installed transformers maps to a causal LM, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def causal_lm_class(model_type: str) -> type:
    """The transformers causal-LM class of `model_type`; UserError when transformers maps none."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise UserError(f"'{model_type}' is not a causal-LM model type of the installed transformers "
                        f"({transformers.__version__})")
    return getattr(transformers, name)


def shrunk_config(model_type: str, special_ids: dict[str, int], **overrides: Any) -> Any:
    """A tiny config of any causal-LM `model_type`: its config class's defaults, shrunk; token ids from
    `special_ids` (pad/bos/eos of the tokenizer used with it) so that they lie inside the small vocabulary."""
    if model_type in REFUSED:
        raise UserError(f"no tiny '{model_type}' model: {REFUSED[model_type]}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = causal_lm_class(model_type)
    # a type served by another type's class (Exaone by LlamaForCausalLM) keeps its own flat config class; a
    # multimodal type's (Llama 4's, with sub-configs) is not the causal LM's
    own = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else cls.config_class
    config = (cls.config_class if getattr(own, "sub_configs", None) else own)()
    _shrink(config, special_ids)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
