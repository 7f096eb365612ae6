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


# GPT-2-style layers: transformer.h[i].{ln_1, attn, ln_2, mlp}; GPT-2's projections are Conv1D (c_attn, c_proj, c_fc).
_GPT2_NAMES = dict(layers="transformer.h", attn="attn", mlp="mlp", attn_norms=("ln_1",), mlp_norms=("ln_2",),
                   mlp_entry="ln_2")
_GPT2_STYLE: tuple[dict[str, Any], ...] = (
    # gpt-sw3 checkpoints are GPT-2 models (GPT2Config, model_type gpt2)
    dict(family="gpt2", model_types=("gpt2", "gpt-sw3"), causal_lm_class="GPT2LMHeadModel", config_class="GPT2Config",
         num_layers_key="n_layer", lora_targets=("c_attn", "c_proj", "c_fc"), **_GPT2_NAMES),
    _decoder("gpt_bigcode", "gpt_bigcode", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", _GPT2_NAMES,
             num_layers_key="n_layer", lora_targets=("c_attn", "c_proj", "c_fc")),
    _decoder("gpt_neo", "gpt_neo", "GPTNeoForCausalLM", "GPTNeoConfig", _GPT2_NAMES, num_layers_key="num_layers",
             tiny_overrides={"attention_types": [[["global", "local"], 2]], "window_size": 8},
             lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")),
    # BioGPT's MLP is two modules of the layer itself (fc1, activation, fc2)
    _decoder("biogpt", "biogpt", "BioGptForCausalLM", "BioGptConfig",
             dict(layers="biogpt.layers", mlp="fc1", mlp_parts=("fc2",), mlp_out="fc2",
                  attn_norms=("self_attn_layer_norm",), mlp_norms=("final_layer_norm",), mlp_entry="final_layer_norm"),
             lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
)

# Parallel residual: x + attn(norm(x)) + mlp(norm'(x)); a norm both read goes only with the whole block.
_SHARED_NORM = dict(attn_norms=(), mlp_norms=(), mlp_entry="mlp", parallel=True)
_PARALLEL_RESIDUAL: tuple[dict[str, Any], ...] = (
    _decoder("gptj", "gptj", "GPTJForCausalLM", "GPTJConfig", _SHARED_NORM, layers="transformer.h", attn="attn",
             shared_norms=("ln_1",), num_layers_key="n_layer", tiny_overrides={"rotary_dim": 8},
             lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")),
    _decoder("codegen", "codegen", "CodeGenForCausalLM", "CodeGenConfig", _SHARED_NORM, layers="transformer.h",
             attn="attn", shared_norms=("ln_1",), num_layers_key="n_layer", tiny_overrides={"rotary_dim": 8},
             lora_targets=("qkv_proj", "out_proj", "fc_in", "fc_out")),
    _decoder("phi", "phi", "PhiForCausalLM", "PhiConfig", _SHARED_NORM, shared_norms=("input_layernorm",),
             lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    _decoder("cohere", "cohere", "CohereForCausalLM", "CohereConfig", _SHARED_NORM, shared_norms=("input_layernorm",)),
    _decoder("cohere2", "cohere2", "Cohere2ForCausalLM", "Cohere2Config", _SHARED_NORM,
             shared_norms=("input_layernorm",)),
    # Falcon: parallel unless configured otherwise; the layer adds attention into the MLP output in place.
    # Falcon-40B-style layers have a norm per sublayer (ln_attn, ln_mlp), older ones one shared input norm.
    _decoder("falcon", "falcon", "FalconForCausalLM", "FalconConfig",
             dict(attn_norms=("ln_attn",), mlp_norms=("post_attention_layernorm", "ln_mlp"),
                  mlp_entry="post_attention_layernorm"),
             layers="transformer.h", attn="self_attention", shared_norms=("input_layernorm",),
             parallel=("parallel_attn", "new_decoder_architecture"), full_shape_mlp=True,
             lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    _decoder("gpt_neox", "gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", _PRE_NORM, layers="gpt_neox.layers",
             attn="attention", parallel=("use_parallel_residual",),
             lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    # StableLM: sequential by default; with use_parallel_residual both sublayers read the input norm
    _decoder("stablelm", "stablelm", "StableLmForCausalLM", "StableLmConfig",
             dict(attn_norms=(), mlp_norms=("post_attention_layernorm",), mlp_entry="post_attention_layernorm"),
             shared_norms=("input_layernorm",), parallel=("use_parallel_residual",)),
)


# Hybrids: a layer's token mixer is attention or, in its place, a linear-attention (Gated DeltaNet), Mamba or
# short-convolution mixer, as the config's per-layer types say. Tiny models: the config classes' defaults shrunk.
_JAMBA_NAMES = dict(attn_norms=("input_layernorm",), mlp="feed_forward", mlp_norms=("pre_ff_layernorm",),
                    mlp_entry="pre_ff_layernorm", mixers={"mamba": "mamba"}, tiny_overrides=None)
_DELTANET = dict(mixers={"linear_attn": "linear_attention"}, tiny_overrides=None)
_HYBRID: tuple[dict[str, Any], ...] = (
    _decoder("qwen3_next", "qwen3_next", "Qwen3NextForCausalLM", "Qwen3NextConfig", _PRE_NORM, **_DELTANET),
    _decoder("qwen3_5_text", "qwen3_5_text", "Qwen3_5ForCausalLM", "Qwen3_5TextConfig", _PRE_NORM, **_DELTANET),
    _decoder("qwen3_5_moe_text", "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", _PRE_NORM,
             **_DELTANET),
    _decoder("jamba", "jamba", "JambaForCausalLM", "JambaConfig", _JAMBA_NAMES),
    _decoder("bamba", "bamba", "BambaForCausalLM", "BambaConfig", _JAMBA_NAMES),
    _decoder("lfm2", "lfm2", "Lfm2ForCausalLM", "Lfm2Config",
             dict(attn_norms=("operator_norm",), mlp="feed_forward", mlp_norms=("ffn_norm",), mlp_entry="ffn_norm"),
             mixers={"conv": "conv"}, tiny_overrides=None),
    # Granite-4 hybrids: Mamba-2 or attention; the MLP sublayer is the shared MLP plus the routed experts
    _decoder("granitemoehybrid", "granitemoehybrid", "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
             _PRE_NORM, mlp="shared_mlp", mlp_parts=("block_sparse_moe",), mixers={"mamba": "mamba"},
             tiny_overrides=None),
)


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
) + _GPT2_STYLE + _PARALLEL_RESIDUAL + _HYBRID
