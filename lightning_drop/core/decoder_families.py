"""Decoder (causal LM) families as data: the keyword arguments of one `ArchSpec` each.

Standard library only: copied with `architectures.py` into every dropped checkpoint.
"""

from __future__ import annotations

from typing import Any

_PRE_NORM = dict(attn_norms=("input_layernorm",), mlp_norms=("post_attention_layernorm",),
                 mlp_entry="post_attention_layernorm")
_SANDWICH = dict(attn_norms=("input_layernorm", "post_attention_layernorm"),
                 mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
                 mlp_entry="pre_feedforward_layernorm")
# OLMo2's MLP has no pre-norm: the residual stream h enters the MLP itself.
_POST_NORM = dict(attn_norms=("post_attention_layernorm",), mlp_norms=("post_feedforward_layernorm",),
                  mlp_entry="mlp")


def _decoder(family: str, model_type: str, causal_lm_class: str, config_class: str, norms: dict[str, Any],
             **more: Any) -> dict[str, Any]:
    return dict(family=family, model_types=(model_type,), causal_lm_class=causal_lm_class,
                config_class=config_class, **norms, **more)


DECODER_FAMILIES: tuple[dict[str, Any], ...] = (
    _decoder("llama", "llama", "LlamaForCausalLM", "LlamaConfig", _PRE_NORM),
    _decoder("mistral", "mistral", "MistralForCausalLM", "MistralConfig", _PRE_NORM,
             tiny_overrides={"sliding_window": 8}),
    _decoder("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2Config", _PRE_NORM,
             tiny_overrides={"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    _decoder("qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3Config", _PRE_NORM, tiny_overrides={"head_dim": 16}),
    _decoder("gemma2", "gemma2", "Gemma2ForCausalLM", "Gemma2Config", _SANDWICH,
             tiny_overrides={"sliding_window": 8, "head_dim": 16}),
    _decoder("gemma3", "gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig", _SANDWICH,
             tiny_overrides={"sliding_window": 8, "head_dim": 16, "sliding_window_pattern": 2}),
    _decoder("phi3", "phi3", "Phi3ForCausalLM", "Phi3Config", _PRE_NORM, tiny_overrides={"pad_token_id": 0}),
    _decoder("olmo2", "olmo2", "Olmo2ForCausalLM", "Olmo2Config", _POST_NORM),
    _decoder("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3Config", _PRE_NORM,
             tiny_overrides={"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8,
                             "qk_nope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
                             "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                             "moe_intermediate_size": 32, "first_k_dense_replace": 1,
                             "n_shared_experts": 1}),
    # Baichuan ships only remote modeling code (trust_remote_code); its layout is Llama's.
    _decoder("baichuan", "baichuan", "BaichuanForCausalLM", "BaichuanConfig", _PRE_NORM),
)
