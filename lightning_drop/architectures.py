"""Where each decoder family keeps its layers, attention, MLP and norms — described as data.

Adding a family is one `ArchSpec` entry, not a modeling file. This module depends only on the
standard library and torch, because it is copied next to `modeling_dropped.py` into every dropped
checkpoint (transformers' remote-code loader imports it from there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

try:  # the package's class when it is installed; this file also runs alone as a checkpoint's remote code
    from lightning_drop.errors import UserError
except ImportError:
    UserError = ValueError


@dataclass(frozen=True)
class ArchSpec:
    """Module names of one decoder family.

    `attn_norms` / `mlp_norms` are removed together with their sublayer (pre-norms, and the post-norms
    of sandwich/post-norm families). `mlp_entry` is the module whose *input* is the residual stream
    between the two sublayers (h = x + attn(...)): scores hook there, so a family whose MLP has no
    pre-norm (OLMo2) names the MLP itself.
    """

    family: str
    model_types: tuple[str, ...]
    causal_lm_class: str
    config_class: str
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    mlp_entry: str = "post_attention_layernorm"
    # Extra config fields a tiny random-init test model needs (kept with the family).
    tiny_overrides: dict[str, Any] = field(default_factory=dict)

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of decoder layers of `model` (a CausalLM or its inner base model)."""
        obj: Any = model
        for part in self.layers.split("."):
            if not hasattr(obj, part):
                # Accept the inner model (e.g. LlamaModel) as well as the CausalLM.
                if part == "model" and hasattr(obj, "layers"):
                    continue
                raise AttributeError(f"{type(model).__name__} has no '{self.layers}' for family {self.family}")
            obj = getattr(obj, part)
        return obj

    @property
    def layer_prefix(self) -> str:
        """State-dict prefix of layer i is f"{layer_prefix}.{i}."."""
        return self.layers


_PRE_NORM = dict(attn_norms=("input_layernorm",), mlp_norms=("post_attention_layernorm",),
                 mlp_entry="post_attention_layernorm")
_SANDWICH = dict(attn_norms=("input_layernorm", "post_attention_layernorm"),
                 mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
                 mlp_entry="pre_feedforward_layernorm")
_POST_NORM = dict(attn_norms=("post_attention_layernorm",), mlp_norms=("post_feedforward_layernorm",),
                  mlp_entry="mlp")

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), "LlamaForCausalLM", "LlamaConfig", **_PRE_NORM),
    ArchSpec("mistral", ("mistral",), "MistralForCausalLM", "MistralConfig", **_PRE_NORM,
             tiny_overrides={"sliding_window": 8}),
    ArchSpec("qwen2", ("qwen2",), "Qwen2ForCausalLM", "Qwen2Config", **_PRE_NORM,
             tiny_overrides={"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    ArchSpec("qwen3", ("qwen3",), "Qwen3ForCausalLM", "Qwen3Config", **_PRE_NORM,
             tiny_overrides={"head_dim": 16}),
    ArchSpec("gemma2", ("gemma2",), "Gemma2ForCausalLM", "Gemma2Config", **_SANDWICH,
             tiny_overrides={"sliding_window": 8, "head_dim": 16}),
    ArchSpec("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", "Gemma3TextConfig", **_SANDWICH,
             tiny_overrides={"sliding_window": 8, "head_dim": 16, "sliding_window_pattern": 2}),
    ArchSpec("phi3", ("phi3",), "Phi3ForCausalLM", "Phi3Config", **_PRE_NORM,
             tiny_overrides={"pad_token_id": 0}),
    ArchSpec("olmo2", ("olmo2",), "Olmo2ForCausalLM", "Olmo2Config", **_POST_NORM),
    ArchSpec("deepseek_v3", ("deepseek_v3",), "DeepseekV3ForCausalLM", "DeepseekV3Config", **_PRE_NORM,
             tiny_overrides={"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8,
                             "qk_nope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
                             "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                             "moe_intermediate_size": 32, "first_k_dense_replace": 1,
                             "n_shared_experts": 1}),
    # Baichuan ships only remote modeling code (trust_remote_code); its layout is Llama's.
    ArchSpec("baichuan", ("baichuan",), "BaichuanForCausalLM", "BaichuanConfig", **_PRE_NORM),
)

_BY_MODEL_TYPE = {mt: spec for spec in SPECS for mt in spec.model_types}
DROPPED_PREFIX = "dropped_"


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def spec_for_model_type(model_type: str) -> ArchSpec:
    """Look a family up by `config.model_type` (a dropped type maps to its base family)."""
    base = model_type[len(DROPPED_PREFIX):] if model_type.startswith(DROPPED_PREFIX) else model_type
    if base not in _BY_MODEL_TYPE:
        hint = ""
        if base in _vision_model_types():
            hint = (" ('" + base + "' is a vision transformer: use lightning_drop.vision — apply_drop, "
                    "VisionImportanceTracker, VisionLayerDrop)")
        raise UserError(
            f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}"
            + hint
        )
    return _BY_MODEL_TYPE[base]


def _vision_model_types() -> list[str]:
    """Vision model types, when this file is inside the package; a copy next to a checkpoint has none.

    Imported by name, not with a relative `from .vision ...`: transformers' remote-code loader copies every
    relatively imported file next to the checkpoint's modeling file and would look for one.
    """
    if __package__ != "lightning_drop":
        return []
    import importlib

    return importlib.import_module(f"{__package__}.vision.architectures").supported_vision_model_types()


def get_spec(model_or_config: Any) -> ArchSpec:
    """The ArchSpec of a model, its config, or a model_type string."""
    if isinstance(model_or_config, str):
        return spec_for_model_type(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    base = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    if base is None:
        raise UserError(f"cannot tell the architecture of {type(model_or_config).__name__}: no config.model_type")
    return spec_for_model_type(base)
