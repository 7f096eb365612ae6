"""Where each vision-transformer family keeps its blocks, attention, MLP, norms and LayerScale — as data.

The vision counterpart of `lightning_drop.architectures.ArchSpec`. Depends only on the standard library and
torch, because it is copied next to `modeling_dropped.py` into every dropped vision checkpoint.

Layer numbering. ViT, DINOv2 (+registers) and DINOv3 have one list of blocks: index i is block i. SwinV2 has
stages (`swinv2.encoder.layers[s].blocks[b]`); its blocks are numbered by ONE FLAT INDEX over all blocks in
stage order (stage 0 first), so with depths (2, 2, 6, 2) flat 0-1 are stage 0, 2-3 stage 1, 4-9 stage 2 and
10-11 stage 3. `VisionSpec.block_names(model)` gives the "stage.block" name of every flat index
("0.0", "0.1", "1.0", ...) and `flat_index(model, "2.3")` converts back. Drop lists in configs, scores and
reports always use the flat index.

Residual forms (the sublayer's output Y is what is removed with it):
- pre-norm ViT:     h = x + attn(LN1(x));               y = h + mlp(LN2(h))
- DINOv2 / DINOv3:  h = x + ls1 * attn(LN1(x));         y = h + ls2 * mlp(LN2(h))   (LayerScale is inside Y)
- SwinV2 (res-post-norm): h = x + LN1(attn(x));          y = h + LN2(mlp(h))         (post-norms are inside Y)
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
class VisionSpec:
    """Module names of one vision-transformer family (relative to a block unless said otherwise).

    - `layers`: path of the ModuleList of blocks inside the *base* model (e.g. `encoder.layer`); for staged
      families the ModuleList of stages, whose blocks are in `stage_blocks`.
    - `base_prefix`: attribute holding the base model inside task heads (`vit`, `dinov2`, ...); "" when the
      family has no head class (DINOv3 ViT: the model is the base model).
    - `attn` / `mlp`: the sublayer modules (the MLP may be split in several, as SwinV2's intermediate+output).
    - `attn_extra` / `mlp_extra`: norms and LayerScales that belong to the sublayer and go with it.
    - `mlp_entry`: the module whose *input* is h (the residual stream between the sublayers).
    - `attn_in` / `mlp_in`: modules whose input is the sublayer's own input ("" = the block's input), and
      `attn_out` / `mlp_out`: modules whose output is the sublayer's contribution to the residual stream
      (after LayerScale / post-norm). Used by the "without residual" ablation and by hook counts.
    - `full_shape_attn`: the family's block reshapes the attention output (SwinV2 windows), so the stand-in
      must return zeros of the input's shape instead of a broadcast scalar zero.
    """

    family: str
    model_types: tuple[str, ...]
    config_class: str
    model_classes: tuple[str, ...]
    classification_class: str | None
    base_prefix: str
    layers: str
    attn: str = "attention"
    mlp: tuple[str, ...] = ("mlp",)
    attn_extra: tuple[str, ...] = ()
    mlp_extra: tuple[str, ...] = ()
    layer_scales: tuple[str, ...] = ()
    mlp_entry: str = "layernorm_after"
    attn_in: str = "attention"
    attn_out: str = "attention"
    mlp_in: str = "mlp"
    mlp_out: str = "mlp"
    stage_blocks: str | None = None
    full_shape_attn: bool = False
    num_layers_key: str = "num_hidden_layers"
    tiny_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def staged(self) -> bool:
        return self.stage_blocks is not None

    def base_model(self, model: nn.Module) -> nn.Module:
        """The base model inside a task head (or the model itself when it is the base model)."""
        inner = getattr(model, self.base_prefix, None) if self.base_prefix else None
        return inner if isinstance(inner, nn.Module) else model

    def _walk(self, obj: Any, path: str) -> Any:
        for part in path.split("."):
            if not hasattr(obj, part):
                raise AttributeError(f"{type(obj).__name__} has no '{path}' for vision family {self.family}")
            obj = getattr(obj, part)
        return obj

    def get_stages(self, model: nn.Module) -> list[nn.ModuleList]:
        """Lists of blocks, one per stage (a single stage for plain ViTs)."""
        top = self._walk(self.base_model(model), self.layers)
        if not self.staged:
            return [top]
        return [getattr(stage, self.stage_blocks) for stage in top]

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        """All blocks in flat order (stage order for SwinV2). The list is not registered anywhere."""
        return nn.ModuleList([b for stage in self.get_stages(model) for b in stage])

    def block_names(self, model: nn.Module) -> list[str]:
        """Human name of each flat index: "i" for plain ViTs, "stage.block" for staged families."""
        if not self.staged:
            return [str(i) for i in range(len(self.get_layers(model)))]
        return [f"{s}.{b}" for s, stage in enumerate(self.get_stages(model)) for b in range(len(stage))]

    def flat_index(self, model: nn.Module, name: str | int) -> int:
        """Flat index of a block given as an int or a "stage.block" string."""
        if isinstance(name, int):
            return name
        names = self.block_names(model)
        if name not in names:
            raise UserError(f"no block '{name}' in this {self.family} model; blocks are {', '.join(names)}")
        return names.index(name)

    def layer_prefixes(self, model: nn.Module) -> list[str]:
        """State-dict prefix ("swinv2.encoder.layers.1.blocks.0.") of every flat index of `model`."""
        names = {id(m): n for n, m in model.named_modules()}
        return [names[id(b)] + "." for b in self.get_layers(model)]

    def attn_modules(self) -> tuple[str, ...]:
        return (self.attn, *self.attn_extra)

    def mlp_modules(self) -> tuple[str, ...]:
        return (*self.mlp, *self.mlp_extra)


_VIT = dict(attn="attention", mlp=("mlp",), attn_extra=("layernorm_before",), mlp_extra=("layernorm_after",),
            mlp_entry="layernorm_after", attn_in="attention", attn_out="attention", mlp_in="mlp", mlp_out="mlp")
_DINO = dict(attn="attention", mlp=("mlp",), attn_extra=("norm1", "layer_scale1"),
             mlp_extra=("norm2", "layer_scale2"), layer_scales=("layer_scale1", "layer_scale2"),
             mlp_entry="norm2", attn_in="attention", attn_out="layer_scale1", mlp_in="mlp", mlp_out="layer_scale2")
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              image_size=32, patch_size=8, num_channels=3)

VISION_SPECS: tuple[VisionSpec, ...] = (
    VisionSpec("vit", ("vit",), "ViTConfig", ("ViTForImageClassification", "ViTModel"),
               "ViTForImageClassification", "vit", "layers", **_VIT, tiny_overrides=dict(_SMALL)),
    VisionSpec("dinov2", ("dinov2",), "Dinov2Config", ("Dinov2ForImageClassification", "Dinov2Model"),
               "Dinov2ForImageClassification", "dinov2", "encoder.layer", **_DINO,
               tiny_overrides={**_SMALL, "mlp_ratio": 2, "layerscale_value": 0.5}),
    VisionSpec("dinov2_with_registers", ("dinov2_with_registers",), "Dinov2WithRegistersConfig",
               ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersModel"),
               "Dinov2WithRegistersForImageClassification", "dinov2_with_registers", "encoder.layer", **_DINO,
               tiny_overrides={**_SMALL, "mlp_ratio": 2, "layerscale_value": 0.5, "num_register_tokens": 2}),
    # transformers ships DINOv3 ViT only as a backbone (no classification head): VisionDropModule adds one.
    VisionSpec("dinov3_vit", ("dinov3_vit",), "DINOv3ViTConfig", ("DINOv3ViTModel",), None, "",
               "model.layer", **_DINO,
               tiny_overrides={**_SMALL, "layerscale_value": 0.5, "num_register_tokens": 2}),
    VisionSpec("swinv2", ("swinv2",), "Swinv2Config", ("Swinv2ForImageClassification", "Swinv2Model"),
               "Swinv2ForImageClassification", "swinv2", "encoder.layers", stage_blocks="blocks",
               attn="attention", mlp=("intermediate", "output"), attn_extra=("layernorm_before",),
               mlp_extra=("layernorm_after",), mlp_entry="intermediate", attn_in="", attn_out="layernorm_before",
               mlp_in="intermediate", mlp_out="layernorm_after", full_shape_attn=True, num_layers_key="depths",
               tiny_overrides=dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                   window_size=4, mlp_ratio=2.0, drop_path_rate=0.0, num_channels=3)),
)

_BY_MODEL_TYPE = {mt: spec for spec in VISION_SPECS for mt in spec.model_types}
DROPPED_PREFIX = "dropped_"


def supported_vision_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def vision_spec_for_model_type(model_type: str) -> VisionSpec:
    base = model_type[len(DROPPED_PREFIX):] if model_type.startswith(DROPPED_PREFIX) else model_type
    if base not in _BY_MODEL_TYPE:
        raise UserError(f"unsupported vision architecture '{model_type}'; supported model types: "
                         f"{', '.join(supported_vision_model_types())}")
    return _BY_MODEL_TYPE[base]


def get_vision_spec(model_or_config: Any) -> VisionSpec:
    """The VisionSpec of a model, its config, a config dict, or a model_type string."""
    if isinstance(model_or_config, str):
        return vision_spec_for_model_type(model_or_config)
    if isinstance(model_or_config, dict):
        base = model_or_config.get("base_model_type") or model_or_config.get("model_type")
    else:
        config = getattr(model_or_config, "config", model_or_config)
        base = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    if not base:
        raise UserError(f"cannot tell the architecture of {type(model_or_config).__name__}: no model_type")
    return vision_spec_for_model_type(base)
