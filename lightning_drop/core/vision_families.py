"""Vision-transformer families as data: the keyword arguments of one `ArchSpec` each.

Standard library only: copied with `architectures.py` into every dropped checkpoint.

Residual forms (the sublayer's output Y is what is removed with it):
- pre-norm ViT:     h = x + attn(LN1(x));               y = h + mlp(LN2(h))
- DINOv2 / DINOv3:  h = x + ls1 * attn(LN1(x));         y = h + ls2 * mlp(LN2(h))   (LayerScale is inside Y)
- SwinV2 (res-post-norm): h = x + LN1(attn(x));          y = h + LN2(mlp(h))         (post-norms are inside Y)
SwinV2 has stages; its blocks are numbered by one flat index over all blocks in stage order.
"""

from __future__ import annotations

from typing import Any

_VIT = dict(attn="attention", mlp="mlp", attn_norms=("layernorm_before",), mlp_norms=("layernorm_after",),
            mlp_entry="layernorm_after")
_DINO = dict(attn="attention", mlp="mlp", attn_norms=("norm1", "layer_scale1"), mlp_norms=("norm2", "layer_scale2"),
             layer_scales=("layer_scale1", "layer_scale2"), mlp_entry="norm2", attn_out="layer_scale1",
             mlp_out="layer_scale2")
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              image_size=32, patch_size=8, num_channels=3)


def _vision(family: str, config_class: str, model_classes: tuple[str, ...], classification_class: str | None,
            base_prefix: str, layers: str, parts: dict[str, Any], **more: Any) -> dict[str, Any]:
    return dict(family=family, model_types=(family,), causal_lm_class=None, config_class=config_class,
                inputs="image", model_classes=model_classes, classification_class=classification_class,
                base_prefix=base_prefix, layers=layers, **parts, **more)


VISION_FAMILIES: tuple[dict[str, Any], ...] = (
    _vision("vit", "ViTConfig", ("ViTForImageClassification", "ViTModel"), "ViTForImageClassification", "vit",
            "layers", _VIT, tiny_overrides=dict(_SMALL)),
    _vision("dinov2", "Dinov2Config", ("Dinov2ForImageClassification", "Dinov2Model"),
            "Dinov2ForImageClassification", "dinov2", "encoder.layer", _DINO,
            tiny_overrides={**_SMALL, "mlp_ratio": 2, "layerscale_value": 0.5}),
    _vision("dinov2_with_registers", "Dinov2WithRegistersConfig",
            ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersModel"),
            "Dinov2WithRegistersForImageClassification", "dinov2_with_registers", "encoder.layer", _DINO,
            tiny_overrides={**_SMALL, "mlp_ratio": 2, "layerscale_value": 0.5, "num_register_tokens": 2}),
    # transformers ships DINOv3 ViT only as a backbone (no classification head): the image task adds one.
    _vision("dinov3_vit", "DINOv3ViTConfig", ("DINOv3ViTModel",), None, "", "model.layer", _DINO,
            tiny_overrides={**_SMALL, "layerscale_value": 0.5, "num_register_tokens": 2}),
    _vision("swinv2", "Swinv2Config", ("Swinv2ForImageClassification", "Swinv2Model"), "Swinv2ForImageClassification",
            "swinv2", "encoder.layers",
            dict(attn="attention", mlp="intermediate", mlp_parts=("output",), attn_norms=("layernorm_before",),
                 mlp_norms=("layernorm_after",), mlp_entry="intermediate", attn_in="", attn_out="layernorm_before",
                 mlp_out="layernorm_after"),
            stage_blocks="blocks", full_shape_attn=True, num_layers_key="depths",
            tiny_overrides=dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=4, mlp_ratio=2.0, drop_path_rate=0.0, num_channels=3)),
)
