"""Transformers with some attention and/or MLP sublayers removed.

A dropped sublayer is replaced by a parameter-free stand-in that contributes zero to the residual
stream, and its norms by `nn.Identity`, so the family's own decoder-layer code runs unchanged and the
dropped weights are physically gone. Layer numbering never changes: a block drop is a layer whose
two sublayers are both dropped. Dropped attention layers get no KV-cache slot: the dropped config
marks them through `kv_sharing_modes`, which transformers' caches turn into storage-free
`DummyLayer`s (and sequence length is then read from the first layer that really attends).

This file depends only on torch, transformers and `architectures.py`: it is copied into every dropped
checkpoint so that `trust_remote_code=True` loads it where lightning_drop is not installed.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Sequence

import torch
import transformers
from torch import nn

try:  # the package's class when it is installed; this file also runs alone as a checkpoint's remote code
    from lightning_drop.errors import UserError
except ImportError:
    UserError = ValueError

try:  # inside the package
    from .architectures import DROPPED_PREFIX, SPECS, ArchSpec, get_spec, spec_for_model_type
except ImportError:  # pragma: no cover - imported as a flat module next to a checkpoint
    from architectures import DROPPED_PREFIX, SPECS, ArchSpec, get_spec  # type: ignore


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sublayer: adds nothing, caches nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(()), None


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP (or MoE) sublayer: adds nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states.new_zeros(())


def normalize_drop_list(value: Any, num_layers: int | None = None) -> list[int]:
    """Accept index lists or per-layer booleans (both occur in LLM-Drop configs); return sorted indices.

    With `num_layers`, indices must lie in 0..num_layers-1 and a boolean list must have one entry per layer:
    a config that names layer -1 or 99 is refused instead of dropping some other layer.
    """
    if value is None:
        return []
    values = list(value)
    if values and all(isinstance(v, bool) for v in values):
        if num_layers is not None and len(values) != num_layers:
            raise UserError(f"a per-layer boolean drop list needs {num_layers} entries, got {len(values)}")
        return [i for i, v in enumerate(values) if v]
    out = []
    for v in values:
        if isinstance(v, bool):
            raise UserError(f"drop lists hold layer indices or per-layer booleans, not a mix: got {values!r}")
        try:
            i = operator.index(v)
        except TypeError:
            raise UserError(f"drop lists hold layer indices or per-layer booleans, got {v!r}") from None
        if num_layers is not None and not 0 <= i < num_layers:
            raise UserError(f"drop list index {i} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        out.append(i)
    return sorted(set(out))


def _is_dropped(module: nn.Module | None) -> bool:
    return isinstance(module, (DroppedAttention, DroppedMLP))


def dropped_layers(model: nn.Module) -> tuple[list[int], list[int]]:
    """(attention indices, MLP indices) currently dropped in `model`, read from the modules themselves."""
    spec = get_spec(model)
    layers = spec.get_layers(model)
    attn = [i for i, layer in enumerate(layers) if _is_dropped(getattr(layer, spec.attn))]
    mlp = [i for i, layer in enumerate(layers) if _is_dropped(getattr(layer, spec.mlp))]
    return attn, mlp


def _check_indices(name: str, indices: Sequence[int], num_layers: int) -> list[int]:
    seen: set[int] = set()
    for v in indices:
        try:
            i = operator.index(v)  # ints, numpy and 0-d torch integers
        except TypeError:
            i = None
        if isinstance(v, bool) or i is None:
            raise UserError(f"{name} index {v!r} is not an integer")
        if not 0 <= i < num_layers:
            raise UserError(f"{name} index {i} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        if i in seen:
            raise UserError(f"{name} index {i} is listed twice")
        seen.add(i)
    return sorted(seen)


def _replace_modules(layer: nn.Module, spec: ArchSpec, attn: bool, mlp: bool) -> None:
    if attn:
        setattr(layer, spec.attn, DroppedAttention())
        for norm in spec.attn_norms:
            setattr(layer, norm, nn.Identity())
    if mlp:
        setattr(layer, spec.mlp, DroppedMLP())
        for norm in spec.mlp_norms:
            setattr(layer, norm, nn.Identity())


def apply_drop(model: nn.Module, attn: Iterable[int] = (), mlp: Iterable[int] = ()) -> nn.Module:
    """Drop attention sublayers `attn` and MLP sublayers `mlp` (original layer indices) in place.

    A block is dropped by listing its index in both. Drops accumulate over calls (iterative dropping).
    Raises ValueError for an index out of range, a duplicate, a sublayer already dropped, or a request
    that would leave no attention and no MLP at all.
    """
    spec = get_spec(model)
    dropped_classes(spec)  # a family we cannot express as dropped classes fails before anything changes
    layers = spec.get_layers(model)
    n = len(layers)
    attn = _check_indices("attention", list(attn), n)
    mlp = _check_indices("MLP", list(mlp), n)
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


def _mark_dropped(model: nn.Module, spec: ArchSpec, attn: list[int], mlp: list[int]) -> None:
    """Switch the model and its config to the dropped classes and record the drop lists."""
    config_cls, model_cls = dropped_classes(spec)
    config = model.config
    if not isinstance(config, config_cls):
        base_type = config.model_type
        config.__class__ = config_cls
        config.base_model_type = base_type
    config.drop_attn_list = list(attn)
    config.drop_mlp_list = list(mlp)
    if not isinstance(model, model_cls) and type(model).__name__ == spec.causal_lm_class:
        model.__class__ = model_cls


class _DroppedConfigMixin:
    """Adds the drop lists to a family's config, and tells caches which layers store no KV."""

    def __post_init__(self, **kwargs: Any) -> None:
        n = kwargs.get("num_hidden_layers", getattr(self, "num_hidden_layers", None))
        self.drop_attn_list = normalize_drop_list(getattr(self, "drop_attn_list", None), n)
        self.drop_mlp_list = normalize_drop_list(getattr(self, "drop_mlp_list", None), n)
        if not getattr(self, "base_model_type", None):
            self.base_model_type = self.model_type[len(DROPPED_PREFIX):]
        super().__post_init__(**kwargs)  # type: ignore[misc]

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        dropped = set(self.drop_attn_list)
        modes = ["reuse" if i in dropped else None for i in range(self.num_hidden_layers)]
        if all(modes):
            # No layer attends: keep one (never written, so empty) slot so the cache can still report a length.
            modes[0] = None
        return modes


class _DroppedModelMixin:
    """Builds the family's model, then removes what the config says was dropped."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        spec = get_spec(config)
        layers = spec.get_layers(self)  # type: ignore[arg-type]
        attn, mlp = set(config.drop_attn_list), set(config.drop_mlp_list)
        for i in attn | mlp:
            _replace_modules(layers[i], spec, i in attn, i in mlp)
        # Checkpoints written by the LLM-Drop reference code still hold the dropped weights.
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | set(
            dropped_key_patterns(spec, sorted(attn), sorted(mlp))
        )


def dropped_key_patterns(spec: ArchSpec, attn: Sequence[int], mlp: Sequence[int]) -> list[str]:
    """Regexes of the state-dict keys that belong to dropped modules."""
    pats = []
    for i in attn:
        for name in (spec.attn, *spec.attn_norms):
            pats.append(rf"{spec.layer_prefix}\.{i}\.{name}\.")
    for i in mlp:
        for name in (spec.mlp, *spec.mlp_norms):
            pats.append(rf"{spec.layer_prefix}\.{i}\.{name}\.")
    return pats


_CLASSES: dict[str, tuple[type, type]] = {}


def dropped_classes(spec: ArchSpec) -> tuple[type, type]:
    """(DroppedXConfig, DroppedXForCausalLM) for a family, built once from transformers' own classes."""
    if spec.family not in _CLASSES:
        try:
            base_config = getattr(transformers, spec.config_class)
            base_model = getattr(transformers, spec.causal_lm_class)
        except AttributeError as err:
            raise UserError(
                f"dropping needs transformers' own {spec.causal_lm_class}, and transformers "
                f"{transformers.__version__} does not ship it: a remote-code family ({spec.family}) loads and "
                "scores from its local code, but its dropped checkpoint could only be loaded by that code"
            ) from err
        config_cls = type(
            f"Dropped{base_config.__name__}",
            (_DroppedConfigMixin, base_config),
            {
                "__module__": __name__,
                "model_type": DROPPED_PREFIX + spec.model_types[0],
                "__annotations__": {"drop_attn_list": list | None, "drop_mlp_list": list | None,
                                    "base_model_type": str | None},
                "drop_attn_list": None,
                "drop_mlp_list": None,
                "base_model_type": None,
            },
        )
        model_cls = type(
            f"Dropped{base_model.__name__}",
            (_DroppedModelMixin, base_model),
            {"__module__": __name__, "config_class": config_cls},
        )
        _CLASSES[spec.family] = (config_cls, model_cls)
    return _CLASSES[spec.family]


def __getattr__(name: str) -> type:
    """Lazy module attributes `Dropped<Config>` / `Dropped<CausalLM>` for `auto_map` in saved configs."""
    for spec in SPECS:
        if name in (f"Dropped{spec.config_class}", f"Dropped{spec.causal_lm_class}"):
            config_cls, model_cls = dropped_classes(spec)
            return config_cls if name.endswith("Config") else model_cls
    raise AttributeError(name)


def register_auto_classes() -> None:
    """Let `AutoConfig`/`AutoModelForCausalLM` load dropped checkpoints without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for spec in SPECS:
        try:
            config_cls, model_cls = dropped_classes(spec)
        except ValueError:
            continue  # family not shipped by this transformers (e.g. Baichuan)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
