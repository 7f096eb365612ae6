"""Transformers with some attention and/or MLP sublayers removed: decoders and vision encoders alike.

A dropped sublayer is replaced by a parameter-free stand-in that contributes zero to the residual
stream, and the modules that belong to it (norms, DINOv2/v3 LayerScale, SwinV2 post-norms) by
`nn.Identity`, so the family's own layer code runs unchanged and the dropped weights are physically gone.
Layer numbering never changes (flat block index for staged families, see `architectures.py`): a block drop
is a layer whose two sublayers are both dropped. For decoders, layers whose token mixer is dropped (attention,
or a hybrid's linear-attention, Mamba or convolution mixer) get no cache slot: the dropped config marks them
through `kv_sharing_modes`, which transformers' caches turn into storage-free `DummyLayer`s (no KV, no
recurrent or conv state); the first layer keeps a slot that only counts tokens (see `DroppedAttention`).

This file depends only on torch, transformers and `architectures.py` (with its two family files): it is
copied into every dropped checkpoint so that `trust_remote_code=True` loads it where lightning_drop is not
installed.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Iterable, Sequence

import transformers
from torch import nn

try:  # the package's class when it is installed; this file also runs alone as a checkpoint's remote code
    from lightning_drop.errors import UserError
except ImportError:
    UserError = ValueError

try:  # inside the package
    from .standins import (RESIDUAL_OUTPUTS, DroppedAttention, DroppedIdentity, DroppedMLP,
                           DroppedResidualOutput, DroppedWindowAttention, is_standin)
except ImportError:  # pragma: no cover - imported as a flat module next to a checkpoint
    from standins import (RESIDUAL_OUTPUTS, DroppedAttention, DroppedIdentity, DroppedMLP,  # type: ignore
                          DroppedResidualOutput, DroppedWindowAttention, is_standin)

try:  # inside the package
    from .architectures import (ALL_SPECS, ATTENTION_LAYER_TYPES, DROPPED_PREFIX, ArchSpec,
                                get_spec, spec_for_model_type)
except ImportError:  # pragma: no cover - imported as a flat module next to a checkpoint
    from architectures import (ALL_SPECS, ATTENTION_LAYER_TYPES, DROPPED_PREFIX, ArchSpec,  # type: ignore
                               get_spec, spec_for_model_type)


def _as_index(v: Any) -> int | None:
    """An int from ints, numpy and 0-d torch integers; None for anything else (bools included)."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


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
        i = _as_index(v)
        if i is None:
            raise UserError(f"drop lists hold layer indices or per-layer booleans, got {v!r}")
        if num_layers is not None and not 0 <= i < num_layers:
            raise UserError(f"drop list index {i} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        out.append(i)
    return sorted(set(out))


def dropped_layers(model: nn.Module) -> tuple[list[int], list[int]]:
    """(attention indices, MLP indices) of the sublayers gone from `model`, read from the modules themselves.

    In a family whose layers hold one sublayer each (Nemotron-H) the sublayer a layer never had counts as gone:
    a layer is a dropped block once its one sublayer is dropped. `drop_lists` gives the drops alone."""
    spec = get_spec(model)
    layers = spec.get_layers(model)
    attn = [i for i, layer in enumerate(layers)
            if not spec.holds(layer, "attn") or is_standin(getattr(layer, spec.mixer_name(layer)))]
    mlp = [i for i, layer in enumerate(layers) if not spec.holds(layer, "mlp") or is_standin(getattr(layer, spec.mlp))]
    return attn, mlp


def drop_lists(model: nn.Module) -> tuple[list[int], list[int]]:
    """`dropped_layers` less the sublayers a single-sublayer layer never had: the drops configs and reports list."""
    return _held(get_spec(model), get_spec(model).get_layers(model), *dropped_layers(model))


def _held(spec: ArchSpec, layers: Sequence[nn.Module], attn: Iterable[int],
          mlp: Iterable[int]) -> tuple[list[int], list[int]]:
    """`attn` / `mlp` less the sublayers their layers do not have (single-sublayer families)."""
    return [i for i in attn if spec.holds(layers[i], "attn")], [i for i in mlp if spec.holds(layers[i], "mlp")]


def _check_indices(name: str, indices: Sequence[Any], num_layers: int, names: Sequence[str] = ()) -> list[int]:
    """Validated sorted indices: ints of any integer type, or block names ("stage.block") from `names`."""
    seen: set[int] = set()
    for v in indices:
        i = names.index(v) if isinstance(v, str) and v in names else _as_index(v)
        if i is None:
            hint = f" or a block name ({', '.join(names[:3])}, ...)" if names else ""
            raise UserError(f"{name} index {v!r} is not an integer layer index{hint}")
        if not 0 <= i < num_layers:
            raise UserError(f"{name} index {i} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        if i in seen:
            raise UserError(f"{name} index {i} is listed twice")
        seen.add(i)
    return sorted(seen)


def _to_identity(layer: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):  # a family's optional norms may be absent or None
            setattr(layer, name, DroppedIdentity(getattr(layer, name)))


def _replace_modules(layer: nn.Module, spec: ArchSpec, attn: bool, mlp: bool, index: int | None = None,
                     parallel: bool = False) -> None:
    attn, mlp = attn and spec.holds(layer, "attn"), mlp and spec.holds(layer, "mlp")  # a block: the layer's own
    if attn:
        mixer, role = spec.mixer_name(layer), spec.layer_kind(layer)
        # attention returns what the family's attention does; other token mixers return the states alone
        attention = mixer not in spec.mixers if role is None else role in ("full_attention", "sliding_attention")
        setattr(layer, mixer, DroppedWindowAttention() if spec.full_shape_attn
                else DroppedAttention(index, spec.attn_returns if attention else "states"))
        _to_identity(layer, (*spec.attn_norms, *(() if parallel else spec.shared_norms)))
    if mlp:
        for name in (spec.mlp, *spec.mlp_parts):
            part = getattr(layer, name, None)
            if part is None and name != spec.mlp:  # an optional part (Granite-4's routed experts in a dense layer)
                continue
            setattr(layer, name, DroppedResidualOutput() if type(part).__name__ in RESIDUAL_OUTPUTS
                    else DroppedMLP(spec.full_shape_mlp, spec.mlp_returns_pair(layer)))
        _to_identity(layer, spec.mlp_norms)
    if parallel and is_standin(getattr(layer, spec.mixer_name(layer))) and is_standin(getattr(layer, spec.mlp)):
        _to_identity(layer, spec.shared_norms)  # read by both sublayers: gone with the whole block only


def apply_drop(model: nn.Module, attn: Iterable[Any] = (), mlp: Iterable[Any] = ()) -> nn.Module:
    """Drop attention sublayers `attn` and MLP sublayers `mlp` (original layer indices) in place.

    Staged families also accept block names ("1.0"). A block is dropped by listing its index in both; in a
    single-sublayer family (Nemotron-H) that drops the layer's one sublayer, which may also be listed alone
    under its own kind.
    Drops accumulate over calls (iterative dropping). Raises ValueError for an index out of range, a
    duplicate, a sublayer already dropped, or a request that would leave no attention and no MLP at all;
    nothing is changed when it raises.
    """
    spec = get_spec(model)
    dropped_config_class(spec)  # a family we cannot express as dropped classes fails before anything changes
    layers = spec.get_layers(model)
    n = len(layers)
    names = spec.block_names(model) if spec.staged else ()
    attn = _check_indices("attention", list(attn), n, names)
    mlp = _check_indices("MLP", list(mlp), n, names)
    attn, mlp = _one_sublayer_each(spec, layers, attn, mlp)
    old_attn, old_mlp = dropped_layers(model)
    again = sorted(set(attn) & set(old_attn)), sorted(set(mlp) & set(old_mlp))
    if again[0] or again[1]:
        raise UserError(f"already dropped: attention {again[0]}, MLP {again[1]}")
    new_attn, new_mlp = sorted(set(old_attn) | set(attn)), sorted(set(old_mlp) | set(mlp))
    if len(new_attn) == n and len(new_mlp) == n:
        raise UserError(f"refusing to drop every block: all {n} attention and all {n} MLP sublayers would be gone")
    if len(new_attn) == n and spec.hybrid:  # transformers' hybrid caches and masks need one token mixer
        raise UserError(f"refusing to drop every token mixer: all {n} layers of this {spec.family} model would mix "
                        "no tokens")
    parallel = spec.is_parallel(model.config)
    for i in set(attn) | set(mlp):
        _replace_modules(layers[i], spec, i in attn, i in mlp, i, parallel)
    _mark_dropped(model, spec, new_attn, new_mlp)
    return model


def _one_sublayer_each(spec: ArchSpec, layers: Sequence[nn.Module], attn: list[int],
                       mlp: list[int]) -> tuple[list[int], list[int]]:
    """Requested drops as the layers hold them: in a single-sublayer family an index in both lists is the block,
    i.e. the layer's one sublayer; an index in one list naming a sublayer its layer lacks is refused."""
    if not spec.layer_roles:
        return attn, mlp
    for i in sorted(set(attn) ^ set(mlp)):
        if not spec.holds(layers[i], "attn" if i in attn else "mlp"):
            has = spec.layer_kind(layers[i])
            raise UserError(f"layer {i} of this {spec.family} model has no {'MLP' if i in mlp else 'token mixer'}: its "
                            f"one sublayer is {'an MLP' if has == 'mlp' else f'a {has} mixer'} (drop it under its own "
                            "kind, or the layer as a block)")
    both = sorted(set(attn) | set(mlp))
    return _held(spec, layers, both, both)


def _mark_dropped(model: nn.Module, spec: ArchSpec, attn: list[int], mlp: list[int]) -> None:
    """Switch the model and its config to the dropped classes and record the drop lists (`drop_lists`')."""
    attn, mlp = _held(spec, spec.get_layers(model), attn, mlp)
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
    """Adds the drop lists (range-checked against the config's own layer count) to a family's config."""

    def __post_init__(self, **kwargs: Any) -> None:
        spec = spec_for_model_type(self.model_type)  # type: ignore[attr-defined]
        n = spec.num_layers(kwargs if spec.num_layers_key in kwargs else self)
        self.drop_attn_list = normalize_drop_list(getattr(self, "drop_attn_list", None), n)
        self.drop_mlp_list = normalize_drop_list(getattr(self, "drop_mlp_list", None), n)
        if not getattr(self, "base_model_type", None):
            self.base_model_type = self.model_type[len(DROPPED_PREFIX):]  # type: ignore[attr-defined]
        super().__post_init__(**kwargs)  # type: ignore[misc]


class _NoKVForDroppedAttention:
    """Tells a decoder's caches which layers store no KV (their attention is dropped)."""

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        dropped = set(self.drop_attn_list)  # type: ignore[attr-defined]
        modes = ["reuse" if i in dropped else None for i in range(self.num_hidden_layers)]  # type: ignore[attr-defined]
        modes[0] = None  # the slot the cache's length is read from (see DroppedAttention)
        types = getattr(self, "layer_types", None) or ()
        attention = [i for i, t in enumerate(types) if t in ATTENTION_LAYER_TYPES]
        if attention and all(modes[i] == "reuse" for i in attention):  # masks are sized from an attention slot
            modes[attention[0]] = None
        return modes



class _DroppedModelMixin:
    """Builds the family's model, then removes what the config says was dropped."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        spec = get_spec(config)
        layers = spec.get_layers(self)  # type: ignore[arg-type]
        attn, mlp = set(config.drop_attn_list), set(config.drop_mlp_list)
        parallel = spec.is_parallel(config)
        for i in attn | mlp:
            _replace_modules(layers[i], spec, i in attn, i in mlp, i, parallel)
        # Checkpoints written by the LLM-Drop reference code still hold the dropped weights.
        patterns = dropped_key_patterns(spec, sorted(attn), sorted(mlp), spec.layer_prefixes(self),  # type: ignore[arg-type]
                                        parallel)
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | set(patterns)


def dropped_key_patterns(spec: ArchSpec, attn: Sequence[int], mlp: Sequence[int],
                         prefixes: Sequence[str] | None = None, parallel: bool = False) -> list[str]:
    """Regexes of the state-dict keys that belong to dropped modules.

    `prefixes[i]` is layer i's state-dict prefix (`spec.layer_prefixes(model)`); without it, the unstaged
    `spec.layer_prefix` numbering is assumed.
    """
    def prefix(i: int) -> str:
        return prefixes[i] if prefixes is not None else f"{spec.layer_prefix}.{i}."

    pats = [re.escape(prefix(i) + name) + r"\." for i in attn for name in spec.attn_modules(parallel=parallel)]
    pats += [re.escape(prefix(i) + name) + r"\." for i in mlp for name in spec.mlp_modules()]
    pats += [re.escape(prefix(i) + name) + r"\." for i in sorted(set(attn) & set(mlp)) for name in spec.shared_norms
             if parallel]
    return pats


_CONFIGS: dict[str, type] = {}
_MODELS: dict[tuple[str, str], type] = {}


def _transformers_class(spec: ArchSpec, name: str) -> type:
    try:
        return getattr(transformers, name)
    except AttributeError as err:
        raise UserError(
            f"dropping needs transformers' own {name}, and transformers {transformers.__version__} does not "
            f"ship it: a remote-code family ({spec.family}) loads and scores from its local code, but its "
            "dropped checkpoint could only be loaded by that code"
        ) from err


def dropped_config_class(spec: ArchSpec) -> type:
    """`Dropped<FamilyConfig>`: the family's config plus `drop_attn_list`/`drop_mlp_list`, built once."""
    if spec.family not in _CONFIGS:
        for name in spec.model_classes:  # every class the family needs exists, or none is built
            _transformers_class(spec, name)
        base_config = _transformers_class(spec, spec.config_class)
        kv = (_NoKVForDroppedAttention,) if spec.inputs == "text" else ()
        _CONFIGS[spec.family] = type(
            f"Dropped{base_config.__name__}",
            (_DroppedConfigMixin, *kv, base_config),
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
        _inherit_conversion_mapping(spec.model_types[0], _CONFIGS[spec.family].model_type)
    return _CONFIGS[spec.family]


def dropped_model_class(spec: ArchSpec, base_name: str) -> type:
    """`Dropped<ModelClass>` for one of the family's model classes (causal LM, head or base model)."""
    key = (spec.family, base_name)
    if key not in _MODELS:
        base_model = _transformers_class(spec, base_name)
        _MODELS[key] = type(dropped_class_name(spec, base_name), (_DroppedModelMixin, base_model),
                            {"__module__": __name__, "config_class": dropped_config_class(spec)})
        _inherit_conversion_mapping(base_name, _MODELS[key].__name__)  # a class's own (GPT-NeoX's `embed_out`)
    return _MODELS[key]


def _inherit_conversion_mapping(source: str, dropped: str) -> None:
    """Give a dropped type its family's checkpoint conversion mapping (renamed prefixes, per-expert tensors
    fused on load), which transformers looks up by model type or class name. Done where the class is built,
    so a checkpoint loaded through its remote code alone (no lightning_drop installed) reads its tensors as
    one loaded through the package does."""
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    mapping = get_checkpoint_conversion_mapping(source)
    if mapping is not None and get_checkpoint_conversion_mapping(dropped) is None:
        register_checkpoint_conversion_mapping(dropped, mapping)


def dropped_class_name(spec: ArchSpec, base_name: str) -> str:
    """`Dropped<ModelClass>`; a family served by another family's class (Exaone by `LlamaForCausalLM`) puts its
    config's name in front (`DroppedExaoneLlamaForCausalLM`), so that its checkpoints' `auto_map` names its own."""
    owner = next((s for s in ALL_SPECS if base_name in s.model_classes), spec)
    prefix = "" if owner.family == spec.family else spec.config_class.removesuffix("Config")
    return f"Dropped{prefix}{base_name}"


def base_class_name(model: nn.Module) -> str:
    """The transformers class a model is, or that its dropped class extends (`LlamaForCausalLM` for both
    `DroppedLlamaForCausalLM` and `DroppedExaoneLlamaForCausalLM`)."""
    cls = type(model)
    return cls.__bases__[-1].__name__ if issubclass(cls, _DroppedModelMixin) else cls.__name__


def dropped_classes(spec: ArchSpec) -> tuple[type, type]:
    """(Dropped<Config>, Dropped<first model class>) of a family: for decoders, the causal LM."""
    return dropped_config_class(spec), dropped_model_class(spec, spec.model_classes[0])


def __getattr__(name: str) -> type:
    """Lazy module attributes `Dropped<Config>` / `Dropped<Model>` for `auto_map` in saved configs."""
    for spec in ALL_SPECS:
        if name == f"Dropped{spec.config_class}":
            return dropped_config_class(spec)
        for cls in spec.model_classes:
            if name == dropped_class_name(spec, cls):
                return dropped_model_class(spec, cls)
    raise AttributeError(name)


def register_auto_classes() -> None:
    """Let transformers' Auto classes load dropped checkpoints of every family without remote code."""
    from transformers import AutoConfig

    for spec in ALL_SPECS:
        try:
            config_cls = dropped_config_class(spec)
        except ValueError:
            continue  # family not shipped by this transformers (e.g. Baichuan)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for name in spec.model_classes:
            auto = getattr(transformers, spec.auto_class(name))
            auto.register(config_cls, dropped_model_class(spec, name), exist_ok=True)


def replace_sublayers(layer: nn.Module, spec: ArchSpec, attn: bool, mlp: bool, index: int | None = None,
                      parallel: bool = False) -> None:
    """Put the stand-ins of a dropped attention and/or MLP into one `layer`, as `apply_drop` does, leaving the
    model's class and config alone: a trial drop (proving an inferred family, scoring a drop) that the caller
    undoes. `parallel`: the layer is a parallel-residual one (its shared norm goes with both sublayers)."""
    _replace_modules(layer, spec, attn, mlp, index, parallel)
