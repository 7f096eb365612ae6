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
# Further names of the same two layouts, found in transformers' Llama-like decoders.
_PRE_NORM_FFN = dict(attn_norms=("input_layernorm",), mlp_norms=("pre_feedforward_layernorm",),
                     mlp_entry="pre_feedforward_layernorm")
_PRE_NORM_NAMED = dict(attn_norms=("attention_layernorm",), mlp_norms=("feedforward_layernorm",),
                       mlp_entry="feedforward_layernorm")
_SANDWICH_SELF_ATTN = dict(attn_norms=("input_layernorm", "post_self_attn_layernorm"),
                           mlp_norms=("post_attention_layernorm", "post_mlp_layernorm"),
                           mlp_entry="post_attention_layernorm")
_SANDWICH_NUMBERED = dict(attn_norms=("input_layernorm", "post_norm1"),
                          mlp_norms=("post_attention_layernorm", "post_norm2"), mlp_entry="post_attention_layernorm")
_SANDWICH_PRE_MLP = dict(attn_norms=("input_layernorm", "post_attention_layernorm"),
                         mlp_norms=("pre_mlp_layernorm", "post_mlp_layernorm"), mlp_entry="pre_mlp_layernorm")
# Every norm layout of a layer `x + attn(norms(x))`, `h + mlp(norms(h))`, by the norm names it uses: the
# families below use them, and a model type no family knows is matched against them (`io/family_inference`).
NORM_LAYOUTS: dict[str, dict[str, Any]] = {
    "pre-norm": _PRE_NORM, "pre-norm (pre_feedforward)": _PRE_NORM_FFN, "pre-norm (named)": _PRE_NORM_NAMED,
    "sandwich": _SANDWICH, "sandwich (post_self_attn)": _SANDWICH_SELF_ATTN,
    "sandwich (post_norm1/2)": _SANDWICH_NUMBERED, "sandwich (pre_mlp)": _SANDWICH_PRE_MLP, "post-norm": _POST_NORM,
}


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
)


def _llama_like(model_type: str, causal_lm_class: str, config_class: str, norms: dict[str, Any] = _PRE_NORM,
                **more: Any) -> dict[str, Any]:
    return _decoder(model_type, model_type, causal_lm_class, config_class, norms, **more)


# Transformers' decoders with Llama's layout under their own names: `model.layers[i]` holds `self_attn` and an
# MLP or mixture-of-experts block (the whole block, router and shared experts included, is the MLP sublayer),
# each with its own norms. Each entry passed the family matrix (tests/test_family_matrix.py); their tiny models
# are their config classes' defaults, shrunk (`io/tiny_configs`).
_LLAMA_LIKE: tuple[dict[str, Any], ...] = (
    _llama_like("afmoe", "AfmoeForCausalLM", "AfmoeConfig", _SANDWICH_PRE_MLP),  # MoE
    _llama_like("apertus", "ApertusForCausalLM", "ApertusConfig", _PRE_NORM_NAMED),
    _llama_like("apertus1p5_text", "Apertus1p5TextForCausalLM", "Apertus1p5TextConfig", _PRE_NORM_NAMED),
    _llama_like("arcee", "ArceeForCausalLM", "ArceeConfig"),
    _llama_like("aria_text", "AriaTextForCausalLM", "AriaTextConfig"),  # MoE
    _llama_like("beam", "BeamForCausalLM", "BeamConfig", _SANDWICH),  # MoE
    _llama_like("bitnet", "BitNetForCausalLM", "BitNetConfig"),
    _llama_like("cwm", "CwmForCausalLM", "CwmConfig"),
    _llama_like("doge", "DogeForCausalLM", "DogeConfig"),
    _llama_like("ernie4_5", "Ernie4_5ForCausalLM", "Ernie4_5Config"),
    _llama_like("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeConfig"),  # MoE
    _llama_like("exaone4", "Exaone4ForCausalLM", "Exaone4Config", _POST_NORM),
    _llama_like("exaone_moe", "ExaoneMoeForCausalLM", "ExaoneMoeConfig"),  # MoE
    _llama_like("flex_olmo", "FlexOlmoForCausalLM", "FlexOlmoConfig", _POST_NORM),  # MoE
    _llama_like("flint", "FlintForCausalLM", "FlintConfig"),  # MoE
    _llama_like("gemma", "GemmaForCausalLM", "GemmaConfig"),
    _llama_like("glm", "GlmForCausalLM", "GlmConfig"),
    _llama_like("glm4", "Glm4ForCausalLM", "Glm4Config", _SANDWICH_SELF_ATTN),
    _llama_like("glm4_moe", "Glm4MoeForCausalLM", "Glm4MoeConfig"),  # MoE
    _llama_like("granite", "GraniteForCausalLM", "GraniteConfig"),
    _llama_like("granite_swa", "GraniteSWAForCausalLM", "GraniteSWAConfig"),
    _llama_like("granitemoe", "GraniteMoeForCausalLM", "GraniteMoeConfig", mlp="block_sparse_moe"),  # MoE
    _llama_like("granitemoe_swa", "GraniteMoeSWAForCausalLM", "GraniteMoeSWAConfig", mlp="block_sparse_moe"),  # MoE
    _llama_like("granitemoeshared", "GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig",
                mlp="block_sparse_moe"),  # MoE
    _llama_like("helium", "HeliumForCausalLM", "HeliumConfig"),
    _llama_like("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config"),
    _llama_like("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config"),  # MoE
    _llama_like("hy_v3", "HYV3ForCausalLM", "HYV3Config"),  # MoE
    _llama_like("hyperclovax", "HyperCLOVAXForCausalLM", "HyperCLOVAXConfig", _SANDWICH_NUMBERED),
    _llama_like("jais2", "Jais2ForCausalLM", "Jais2Config"),
    _llama_like("kolibri1", "Kolibri1ForCausalLM", "Kolibri1Config", _SANDWICH_SELF_ATTN),  # MoE
    _llama_like("laguna", "LagunaForCausalLM", "LagunaConfig"),  # MoE
    _llama_like("mellum", "MellumForCausalLM", "MellumConfig"),  # MoE
    _llama_like("mimo_v2_flash", "MiMoV2FlashForCausalLM", "MiMoV2FlashConfig"),  # MoE
    _llama_like("minicpm5_moe", "MiniCPM5MoeForCausalLM", "MiniCPM5MoeConfig"),  # MoE
    _llama_like("minimax_m2", "MiniMaxM2ForCausalLM", "MiniMaxM2Config"),  # MoE
    _llama_like("minimax_m3_vl_text", "MiniMaxM3VLForCausalLM", "MiniMaxM3VLTextConfig"),  # MoE
    _llama_like("ministral", "MinistralForCausalLM", "MinistralConfig"),
    _llama_like("ministral3", "Ministral3ForCausalLM", "Ministral3Config"),
    _llama_like("mixtral", "MixtralForCausalLM", "MixtralConfig"),  # MoE
    _llama_like("nanochat", "NanoChatForCausalLM", "NanoChatConfig"),
    _llama_like("olmo", "OlmoForCausalLM", "OlmoConfig"),
    _llama_like("olmo3", "Olmo3ForCausalLM", "Olmo3Config", _POST_NORM),
    _llama_like("olmoe", "OlmoeForCausalLM", "OlmoeConfig"),  # MoE
    _llama_like("persimmon", "PersimmonForCausalLM", "PersimmonConfig"),
    _llama_like("phimoe", "PhimoeForCausalLM", "PhimoeConfig"),  # MoE
    _llama_like("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig"),  # MoE
    _llama_like("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig"),  # MoE
    _llama_like("seed_oss", "SeedOssForCausalLM", "SeedOssConfig"),
    _llama_like("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config"),
    _llama_like("solar_open", "SolarOpenForCausalLM", "SolarOpenConfig"),  # MoE
    _llama_like("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config"),
    _llama_like("vaultgemma", "VaultGemmaForCausalLM", "VaultGemmaConfig", _PRE_NORM_FFN),
)

# Mixture-of-experts blocks that return (output, router scores), which the layer unpacks: a dropped MLP returns
# the pair too. Llama 4 interleaves them with dense MLPs (`is_moe_layer`) and reshapes the MLP output.
_MOE_PAIR: tuple[dict[str, Any], ...] = (
    _llama_like("gpt_oss", "GptOssForCausalLM", "GptOssConfig", mlp_pair=True, tiny_overrides=None),
    # a multimodal llama4 checkpoint loads as its text model (AutoModelForCausalLM gives Llama4ForCausalLM)
    {**_decoder("llama4", "llama4_text", "Llama4ForCausalLM", "Llama4TextConfig", _PRE_NORM, mlp="feed_forward",
                mlp_pair="is_moe_layer", full_shape_mlp=True, tiny_overrides=None), "model_types": ("llama4_text", "llama4")},
)

# GPT-1: post-norm after the residual, n = ln_1(x + attn(x)), y = ln_2(n + mlp(n)); the norms belong to the
# residual stream and stay when a sublayer is dropped. Its attention returns a list its layer extends.
_RESIDUAL_POST_NORM: tuple[dict[str, Any], ...] = (
    _decoder("openai-gpt", "openai-gpt", "OpenAIGPTLMHeadModel", "OpenAIGPTConfig",
             dict(layers="transformer.h", attn="attn", mlp="mlp", attn_norms=(), mlp_norms=(), mlp_entry="mlp"),
             residual_norms=("ln_1", "ln_2"), attn_returns="list", num_layers_key="n_layer", tiny_overrides=None,
             lora_targets=("c_attn", "c_proj", "c_fc")),
)

# Attention modules that return something else than (states, weights): a third value (JetMoE's router loss,
# GPT-NeoX-Japanese's bias, added by the layer), or the residual stream itself (Bloom's attention and MLP add the
# residual they are given: the stand-ins return it; the contributions are their `dense` outputs).
_OTHER_RETURNS: tuple[dict[str, Any], ...] = (
    _llama_like("jetmoe", "JetMoeForCausalLM", "JetMoeConfig", attn="self_attention", attn_returns="triple",
                tiny_overrides=None),
    _decoder("gpt_neox_japanese", "gpt_neox_japanese", "GPTNeoXJapaneseForCausalLM", "GPTNeoXJapaneseConfig",
             _PRE_NORM, layers="gpt_neox_japanese.layers", attn="attention", attn_returns="triple",
             tiny_overrides=None),
    _decoder("bloom", "bloom", "BloomForCausalLM", "BloomConfig", _PRE_NORM, layers="transformer.h",
             attn="self_attention", attn_returns="residual", attn_out="self_attention.dense",
             mlp_out="mlp.dense_4h_to_h", num_layers_key="n_layer", tiny_overrides=None),
)

# Model types with a config class of their own, served by another family's model class: their dropped classes
# carry the config's name (`DroppedExaoneLlamaForCausalLM`, see modeling_dropped.dropped_class_name).
_SERVED_BY_OTHERS: tuple[dict[str, Any], ...] = (
    _decoder("exaone", "exaone", "LlamaForCausalLM", "ExaoneConfig", _PRE_NORM, tiny_overrides=None),
    _decoder("internlm3", "internlm3", "LlamaForCausalLM", "InternLM3Config", _PRE_NORM, tiny_overrides=None),
    _decoder("iquestcoder", "iquestcoder", "LlamaForCausalLM", "IQuestCoderConfig", _PRE_NORM, tiny_overrides=None),
    _decoder("param2moe", "param2moe", "Glm4MoeForCausalLM", "Param2MoeConfig", _PRE_NORM, tiny_overrides=None),
    _decoder("sarvam_moe", "sarvam_moe", "Glm4MoeForCausalLM", "SarvamMoEConfig", _PRE_NORM, tiny_overrides=None),
    _decoder("sarvam_mla", "sarvam_mla", "DeepseekV3ForCausalLM", "SarvamMLAConfig", _PRE_NORM, tiny_overrides=None),
)

# Pre-norm decoders under further names: XGLM's MLP is two modules of the layer (as BioGPT's); MPT's MLP adds
# the residual it is given itself (its contribution is `down_proj`'s output); ModernBERT's decoder has no
# attention norm in layer 0; Cohere2-MoE is Cohere2's parallel layer with an MoE block.
_MORE_NAMES: tuple[dict[str, Any], ...] = (
    _decoder("xglm", "xglm", "XGLMForCausalLM", "XGLMConfig",
             dict(mlp="fc1", mlp_parts=("fc2",), mlp_out="fc2", attn_norms=("self_attn_layer_norm",),
                  mlp_norms=("final_layer_norm",), mlp_entry="final_layer_norm"),
             num_layers_key="num_layers", tiny_overrides=None),
    _decoder("mpt", "mpt", "MptForCausalLM", "MptConfig",
             dict(attn_norms=("norm_1",), mlp_norms=("norm_2",), mlp_entry="norm_2"), layers="transformer.blocks",
             attn="attn", mlp="ffn", mlp_out="ffn.down_proj", num_layers_key="n_layers", tiny_overrides=None),
    _decoder("modernbert-decoder", "modernbert-decoder", "ModernBertDecoderForCausalLM", "ModernBertDecoderConfig",
             dict(attn_norms=("attn_norm",), mlp_norms=("mlp_norm",), mlp_entry="mlp_norm"), attn="attn",
             tiny_overrides=None),
    _decoder("cohere2_moe", "cohere2_moe", "Cohere2MoeForCausalLM", "Cohere2MoeConfig", _SHARED_NORM,
             shared_norms=("input_layernorm",), tiny_overrides=None),
)

# Llama's layout with multi-head latent attention (a compressed KV cache, as DeepSeek-V3's).
_LATENT_ATTENTION: tuple[dict[str, Any], ...] = (
    _llama_like("axk1", "AXK1ForCausalLM", "AXK1Config", tiny_overrides=None),  # MoE
    _llama_like("glm4_moe_lite", "Glm4MoeLiteForCausalLM", "Glm4MoeLiteConfig", tiny_overrides=None),  # MoE
    _llama_like("minicpm3", "MiniCPM3ForCausalLM", "MiniCPM3Config", tiny_overrides=None),
    _llama_like("youtu", "YoutuForCausalLM", "YoutuConfig", tiny_overrides=None),
)
DECODER_FAMILIES += (_GPT2_STYLE + _PARALLEL_RESIDUAL + _HYBRID + _LLAMA_LIKE + _MOE_PAIR + _RESIDUAL_POST_NORM
                     + _OTHER_RETURNS + _SERVED_BY_OTHERS + _MORE_NAMES + _LATENT_ATTENTION)

# Single-sublayer layers: Nemotron-H's layer is x + mixer(norm(x)), its one `mixer` a Mamba-2, attention, MLP or
# MoE block as the layer's `block_type` (its entry of the config's `layers_block_type`) says; "linear_attention"
# is its name for Mamba-2. Dropping a layer's mixer drops the layer.
_SINGLE_SUBLAYER: tuple[dict[str, Any], ...] = (
    _decoder("nemotron_h", "nemotron_h", "NemotronHForCausalLM", "NemotronHConfig",
             dict(attn_norms=("norm",), mlp_norms=("norm",), mlp_entry="norm"), attn="mixer", mlp="mixer",
             layer_roles={"full_attention": "full_attention", "linear_attention": "mamba", "mlp": "mlp",
                          "moe": "mlp"}, role_attr="block_type", num_layers_key="layers_block_type",
             tiny_overrides=None),
)
DECODER_FAMILIES += _SINGLE_SUBLAYER
LLAMA_LIKE_FAMILIES = tuple(f["family"] for f in _LLAMA_LIKE)
