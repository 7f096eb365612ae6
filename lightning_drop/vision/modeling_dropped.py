"""Vision transformers with some attention and/or MLP sublayers removed.

As in the decoder core, a dropped sublayer is replaced by a parameter-free stand-in that adds nothing to the
residual stream, and the modules that belong to it (its norms, DINOv2/v3 LayerScale, SwinV2 post-norms) by
`nn.Identity`, so the family's own block forward runs unchanged and the weights are physically gone.
Numbering never changes (flat block index, see `architectures.py`); a block drop is both sublayers dropped.
Encoders have no KV cache, so nothing else is needed.

Depends only on torch, transformers and `architectures.py`: it is copied into every dropped vision checkpoint
so that `trust_remote_code=True` loads it where lightning_drop is not installed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import transformers
from torch import nn

try:  # the package's class when it is installed; this file also runs alone as a checkpoint's remote code
    from lightning_drop.errors import UserError
except ImportError:
    UserError = ValueError

try:  # inside the package
    from .architectures import DROPPED_PREFIX, VISION_SPECS, VisionSpec, get_vision_spec
except ImportError:  # pragma: no cover - imported as a flat module next to a checkpoint
    from architectures import DROPPED_PREFIX, VISION_SPECS, VisionSpec, get_vision_spec  # type: ignore


class DroppedVisionAttention(nn.Module):
    """Stands in for a removed attention sublayer: returns (zero, None), broadcast onto the residual."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(()), None


class DroppedWindowAttention(nn.Module):
    """For blocks that reshape the attention output (SwinV2 windows): zeros of the input's shape."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class DroppedVisionMLP(nn.Module):
    """Stands in for (one part of) a removed MLP sublayer: adds nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states.new_zeros(())


class DroppedResidualOutput(nn.Module):
    """For MLP output modules that add the residual themselves (`ViTOutput(hidden, input_tensor)` in
    transformers 4.x): returns the residual unchanged. Selected by naming the part in `RESIDUAL_OUTPUTS`."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return input_tensor


# Class names of MLP parts whose forward is (hidden_states, input_tensor) -> hidden + input_tensor.
RESIDUAL_OUTPUTS = ("ViTOutput", "Dinov2Output")
_STANDINS = (DroppedVisionAttention, DroppedWindowAttention, DroppedVisionMLP, DroppedResidualOutput)


def is_standin(module: nn.Module | None) -> bool:
    return isinstance(module, _STANDINS)


def normalize_drop_list(value: Any) -> list[int]:
    """Index lists or per-layer booleans -> sorted indices."""
    if value is None:
        return []
    values = list(value)
    if values and all(isinstance(v, bool) for v in values):
        return [i for i, v in enumerate(values) if v]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"drop lists hold flat block indices or per-block booleans, got {v!r}")
    return sorted(set(int(v) for v in values))


def dropped_layers(model: nn.Module) -> tuple[list[int], list[int]]:
    """(attention, MLP) flat indices currently dropped, read from the modules themselves."""
    spec = get_vision_spec(model)
    layers = spec.get_layers(model)
    attn = [i for i, b in enumerate(layers) if is_standin(getattr(b, spec.attn))]
    mlp = [i for i, b in enumerate(layers) if is_standin(getattr(b, spec.mlp[0]))]
    return attn, mlp


def _check_indices(kind: str, indices: Sequence[Any], n: int, names: list[str]) -> list[int]:
    seen: set[int] = set()
    for raw in indices:
        i = raw
        if isinstance(raw, str) and raw in names:  # "stage.block" for SwinV2
            i = names.index(raw)
        if isinstance(i, bool) or not isinstance(i, int):
            raise UserError(f"{kind} index {raw!r} is not a flat block index (int) or a block name ({names[0]}..)")
        if not 0 <= i < n:
            raise UserError(f"{kind} index {i} is out of range: the model has {n} blocks (0..{n - 1})")
        if i in seen:
            raise UserError(f"{kind} index {raw!r} is listed twice")
        seen.add(i)
    return sorted(seen)


def _replace_modules(block: nn.Module, spec: VisionSpec, attn: bool, mlp: bool) -> None:
    if attn:
        setattr(block, spec.attn, DroppedWindowAttention() if spec.full_shape_attn else DroppedVisionAttention())
        for name in spec.attn_extra:
            setattr(block, name, nn.Identity())
    if mlp:
        for name in spec.mlp:
            part = getattr(block, name)
            standin = DroppedResidualOutput() if type(part).__name__ in RESIDUAL_OUTPUTS else DroppedVisionMLP()
            setattr(block, name, standin)
        for name in spec.mlp_extra:
            setattr(block, name, nn.Identity())


def apply_drop(model: nn.Module, attn: Iterable[Any] = (), mlp: Iterable[Any] = ()) -> nn.Module:
    """Drop attention sublayers `attn` and MLP sublayers `mlp` (flat block indices or "stage.block") in place.

    Drops accumulate over calls. ValueError for an index out of range, a duplicate, a sublayer already
    dropped, or a request that would remove every block; nothing is changed when it raises.
    """
    spec = get_vision_spec(model)
    layers = spec.get_layers(model)
    n, names = len(layers), spec.block_names(model)
    attn = _check_indices("attention", list(attn), n, names)
    mlp = _check_indices("MLP", list(mlp), n, names)
    old_attn, old_mlp = dropped_layers(model)
    again = sorted(set(attn) & set(old_attn)), sorted(set(mlp) & set(old_mlp))
    if again[0] or again[1]:
        raise UserError(f"already dropped: attention {again[0]}, MLP {again[1]}")
    new_attn, new_mlp = sorted(set(old_attn) | set(attn)), sorted(set(old_mlp) | set(mlp))
    if len(new_attn) == n and len(new_mlp) == n:
        raise UserError(f"refusing to drop every block: all {n} attention and all {n} MLP sublayers would be gone")
    for i in set(attn) | set(mlp):
        _replace_modules(layers[i], spec, i in attn, i in mlp)
    _mark_dropped(model, spec, new_attn, new_mlp)
    return model


def _mark_dropped(model: nn.Module, spec: VisionSpec, attn: list[int], mlp: list[int]) -> None:
    config_cls = dropped_config_class(spec)
    config = model.config
    if not isinstance(config, config_cls):
        base_type = config.model_type
        config.__class__ = config_cls
        config.base_model_type = base_type
    config.drop_attn_list = list(attn)
    config.drop_mlp_list = list(mlp)
    name = type(model).__name__
    if name in spec.model_classes:
        model.__class__ = dropped_model_class(spec, name)


class _DroppedConfigMixin:
    def __post_init__(self, **kwargs: Any) -> None:
        self.drop_attn_list = normalize_drop_list(getattr(self, "drop_attn_list", None))
        self.drop_mlp_list = normalize_drop_list(getattr(self, "drop_mlp_list", None))
        if not getattr(self, "base_model_type", None):
            self.base_model_type = self.model_type[len(DROPPED_PREFIX):]
        super().__post_init__(**kwargs)  # type: ignore[misc]


class _DroppedModelMixin:
    """Builds the family's model, then removes what the config says was dropped."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        spec = get_vision_spec(config)
        layers = spec.get_layers(self)  # type: ignore[arg-type]
        attn, mlp = set(config.drop_attn_list), set(config.drop_mlp_list)
        for i in attn | mlp:
            _replace_modules(layers[i], spec, i in attn, i in mlp)
        prefixes = spec.layer_prefixes(self)  # type: ignore[arg-type]
        pats = [rf"{p}{name}\." for i in sorted(attn) for p in [prefixes[i]] for name in spec.attn_modules()]
        pats += [rf"{p}{name}\." for i in sorted(mlp) for p in [prefixes[i]] for name in spec.mlp_modules()]
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | set(pats)


_CONFIGS: dict[str, type] = {}
_MODELS: dict[tuple[str, str], type] = {}


def dropped_config_class(spec: VisionSpec) -> type:
    """`Dropped<FamilyConfig>`: the family's config plus `drop_attn_list`/`drop_mlp_list`."""
    if spec.family not in _CONFIGS:
        try:
            base_config = getattr(transformers, spec.config_class)
        except AttributeError as err:
            raise UserError(f"vision family '{spec.family}' needs {spec.config_class}, which transformers "
                             f"{transformers.__version__} does not ship") from err
        _CONFIGS[spec.family] = type(
            f"Dropped{base_config.__name__}", (_DroppedConfigMixin, base_config),
            {"__module__": __name__, "model_type": DROPPED_PREFIX + spec.model_types[0],
             "__annotations__": {"drop_attn_list": list | None, "drop_mlp_list": list | None,
                                 "base_model_type": str | None},
             "drop_attn_list": None, "drop_mlp_list": None, "base_model_type": None},
        )
    return _CONFIGS[spec.family]


def dropped_model_class(spec: VisionSpec, base_name: str) -> type:
    """`Dropped<ModelClass>` for one of the family's model classes (head or base model)."""
    key = (spec.family, base_name)
    if key not in _MODELS:
        base_model = getattr(transformers, base_name)
        _MODELS[key] = type(f"Dropped{base_name}", (_DroppedModelMixin, base_model),
                            {"__module__": __name__, "config_class": dropped_config_class(spec)})
    return _MODELS[key]


def __getattr__(name: str) -> type:
    """Lazy `Dropped<Config>` / `Dropped<Model>` attributes for `auto_map` in saved configs."""
    for spec in VISION_SPECS:
        if name == f"Dropped{spec.config_class}":
            return dropped_config_class(spec)
        for cls in spec.model_classes:
            if name == f"Dropped{cls}":
                return dropped_model_class(spec, cls)
    raise AttributeError(name)


def register_vision_auto_classes() -> None:
    """Let AutoConfig / AutoModel / AutoModelForImageClassification load dropped vision checkpoints."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    for spec in VISION_SPECS:
        try:
            config_cls = dropped_config_class(spec)
        except ValueError:
            continue
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for name in spec.model_classes:
            auto = AutoModelForImageClassification if name == spec.classification_class else AutoModel
            auto.register(config_cls, dropped_model_class(spec, name), exist_ok=True)
