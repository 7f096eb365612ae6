"""Where each family keeps its layers, attention, MLP and norms — decoders and vision encoders alike, as data.

Adding a family is one entry in `decoder_families.py` or `vision_families.py`, not a modeling file. This
module and those two depend only on the standard library and torch, because they are copied next to
`modeling_dropped.py` into every dropped checkpoint (transformers' remote-code loader imports them there).

Layer numbering. Decoders, ViT, DINOv2 (+registers) and DINOv3 have one list of layers: index i is layer i.
Staged families (SwinV2: `swinv2.encoder.layers[s].blocks[b]`) number their blocks by ONE FLAT INDEX over
all blocks in stage order, so with depths (2, 2, 6, 2) flat 0-1 are stage 0, 2-3 stage 1, 4-9 stage 2 and
10-11 stage 3. `ArchSpec.block_names(model)` gives the "stage.block" name of every flat index and
`flat_index(model, "2.3")` converts back. Drop lists in configs, scores and reports always use the flat index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

try:  # the package's class when it is installed; this file also runs alone as a checkpoint's remote code
    from lightning_drop.errors import UserError
except ImportError:
    UserError = ValueError

try:  # inside the package (and inside transformers' copy of a checkpoint's remote code)
    from .decoder_families import DECODER_FAMILIES
    from .vision_families import VISION_FAMILIES
except ImportError:  # pragma: no cover - imported as a flat module next to a checkpoint
    from decoder_families import DECODER_FAMILIES  # type: ignore
    from vision_families import VISION_FAMILIES  # type: ignore

DROPPED_PREFIX = "dropped_"
INPUTS = ("text", "image")
# LoRA's documented default names (Llama's linear layers); as a default they stand for any family's own targets
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Kinds of token mixer a layer may hold (attention's kind is read from the config's per-layer types).
MIXER_KINDS = ("full_attention", "sliding_attention", "linear_attention", "mamba", "conv")
# Per-layer config types whose cache slot holds keys and values: transformers sizes attention masks from one.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# What a family's attention module returns (`ArchSpec.attn_returns`).
ATTN_RETURNS = ("pair", "triple", "list", "residual")


@dataclass(frozen=True)
class ArchSpec:
    """Module names of one family (relative to a layer unless said otherwise).

    - `layers`: path of the ModuleList of layers (inside the base model when `base_prefix` is set); for
      staged families the ModuleList of stages, whose blocks are in `stage_blocks`.
    - `attn` / `mlp`: the sublayer modules; `mlp_parts`: further modules of the MLP sublayer (SwinV2's
      `output`) that are replaced with it.
    - `attn_norms` / `mlp_norms`: modules that belong to the sublayer and go with it: pre-norms, post-norms
      of sandwich/post-norm families, DINOv2/v3 LayerScale.
    - `mlp_entry`: the module whose *input* is h = x + attn(...), the residual stream between the sublayers
      (a family whose MLP has no pre-norm names the MLP itself). Scores hook there.
    - `attn_in` / `mlp_in`: modules whose input is the sublayer's own input ("" = the layer's input), and
      `attn_out` / `mlp_out`: modules whose output is the sublayer's contribution to the residual stream
      (after LayerScale / post-norm); default: the sublayer module itself. Used by the "without residual"
      metric and the run-time sublayer check.
    - `inputs`: "text" (input_ids + attention_mask; causal LMs with a KV cache) or "image" (pixel_values).
    - `model_classes`: transformers classes that get a `Dropped<cls>` counterpart (default: the causal LM);
      `classification_class` is the one loaded through AutoModelForImageClassification.
    - `base_prefix`: attribute holding the base model inside task heads (`vit`, `dinov2`, ...).
    - `full_shape_attn`: the layer reshapes the attention output (SwinV2 windows), so the stand-in returns
      zeros of the input's shape instead of a broadcast scalar zero.
    - `num_layers_key`: config field with the number of layers (a list of per-stage depths is summed; a list of
      per-layer types, Nemotron-H's `layers_block_type`, counts its entries).
    - `mixers`: token mixers other than `attn` that a layer may hold in its place (hybrids), module name ->
      kind (`linear_attention`, `mamba`, `conv`); they return the mixed states alone, not a tuple. The layer's
      token mixer is whichever of `attn` and these it has; `--target attn` drops token mixers of any kind.
    - `parallel`: attention and MLP read the same input X (`x + attn(ln1(x)) + mlp(ln2(x))`): True, or the
      config fields any of which says so (families with both layouts). Each is scored on (X, X + its output).
    - `shared_norms`: norms that both sublayers of a parallel layer read; they go only with the whole block
      (in a sequential layer of the same family they are attention's).
    - `full_shape_mlp`: the layer adds into (or reshapes) the MLP output, so the stand-in returns full-shape zeros.
    - `mlp_pair`: the MLP (a mixture-of-experts block) returns (output, router scores), which the layer unpacks:
      True, or the layer attribute that says so per layer (Llama 4's `is_moe_layer`); its stand-in returns a pair.
    - `attn_returns`: what the attention module returns, so that its stand-in returns the same: "pair" (states,
      weights), "triple" (a third value: JetMoE's router loss, GPT-NeoX-Japanese's bias), "list" ([states], GPT-1)
      or "residual" (Bloom: it adds the residual, its second argument, itself: (residual + states, weights)).
    - `residual_norms`: norms of the residual stream itself, after a sublayer's add (GPT-1's post-norm `ln_1`,
      `ln_2`). They stay when a sublayer is dropped (zeroing it still normalizes), so a dropped block is not an
      identity: its checkpoint keeps the dropped format. Attention is scored on (X, `ln_1`(X + attn)), the MLP on
      (h, `ln_2`(h + mlp)), h being the MLP's input.
    - `lora_targets`: names of the family's linear (or Conv1D) layers that LoRA adapts by default; empty: the
      linear layers found in the model's live sublayers (`io.family_inference.lora_targets`).
    - `layer_roles`: layers of ONE sublayer each (Nemotron-H), at `attn` (== `mlp`), whose kind the layer's
      `role_attr` (its entry of the config's per-layer types) names: type -> a token-mixer kind, or "mlp" (an
      MLP or MoE). The sublayer a layer lacks counts as gone, so dropping its one sublayer drops the layer.
    """

    family: str
    model_types: tuple[str, ...]
    causal_lm_class: str | None
    config_class: str
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    mlp_entry: str = "post_attention_layernorm"
    # Extra config fields a tiny random-init test model needs (kept with the family); None: the tiny model is
    # the config class's defaults shrunk (io/tiny_configs), as for any causal-LM type.
    tiny_overrides: dict[str, Any] | None = field(default_factory=dict)
    inputs: str = "text"
    model_classes: tuple[str, ...] = ()
    classification_class: str | None = None
    base_prefix: str = ""
    mlp_parts: tuple[str, ...] = ()
    attn_in: str | None = None
    attn_out: str | None = None
    mlp_in: str | None = None
    mlp_out: str | None = None
    layer_scales: tuple[str, ...] = ()
    stage_blocks: str | None = None
    full_shape_attn: bool = False
    num_layers_key: str = "num_hidden_layers"
    mixers: dict[str, str] = field(default_factory=dict)
    parallel: bool | tuple[str, ...] = False
    shared_norms: tuple[str, ...] = ()
    full_shape_mlp: bool = False
    mlp_pair: bool | str = False
    attn_returns: str = "pair"
    residual_norms: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    layer_roles: dict[str, str] = field(default_factory=dict)
    role_attr: str = "block_type"

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"ArchSpec {self.family}: inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.attn_returns not in ATTN_RETURNS:
            raise ValueError(f"ArchSpec {self.family}: attn_returns must be one of {ATTN_RETURNS}, "
                             f"got {self.attn_returns!r}")
        defaults = {"attn_in": self.attn, "attn_out": self.attn, "mlp_in": self.mlp, "mlp_out": self.mlp,
                    "model_classes": (self.causal_lm_class,) if self.causal_lm_class else ()}
        for name, value in defaults.items():
            if getattr(self, name) in (None, ()):
                object.__setattr__(self, name, value)

    # ------------------------------------------------------------------------------------ locating layers
    @property
    def staged(self) -> bool:
        return self.stage_blocks is not None

    def base_model(self, model: nn.Module) -> nn.Module:
        """The base model inside a task head (or the model itself when it is the base model)."""
        inner = getattr(model, self.base_prefix, None) if self.base_prefix else None
        return inner if isinstance(inner, nn.Module) else model

    def _walk(self, model: nn.Module, path: str) -> Any:
        obj: Any = model
        parts = path.split(".")
        for k, part in enumerate(parts):
            if not hasattr(obj, part):
                # Accept the inner model (e.g. LlamaModel) as well as the model holding it.
                if k == 0 and len(parts) > 1 and hasattr(obj, parts[1]):
                    continue
                raise AttributeError(f"{type(model).__name__} has no '{path}' for family {self.family}")
            obj = getattr(obj, part)
        return obj

    def get_stages(self, model: nn.Module) -> list[nn.ModuleList]:
        """Lists of layers, one per stage (a single stage for unstaged families)."""
        top = self._walk(self.base_model(model), self.layers)
        if not self.staged:
            return [top]
        return [getattr(stage, self.stage_blocks) for stage in top]

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        """All layers in flat order: the model's own ModuleList, or for staged families a new (unregistered)
        list of the blocks in stage order."""
        stages = self.get_stages(model)
        return stages[0] if not self.staged else nn.ModuleList([b for stage in stages for b in stage])

    @property
    def layer_prefix(self) -> str:
        """State-dict prefix of layer i is f"{layer_prefix}.{i}." (unstaged families, model with its head)."""
        return f"{self.base_prefix}.{self.layers}" if self.base_prefix else self.layers

    def layer_prefixes(self, model: nn.Module) -> list[str]:
        """State-dict prefix ("swinv2.encoder.layers.1.blocks.0.") of every flat index of `model`."""
        names = {id(m): n for n, m in model.named_modules()}
        return [names[id(b)] + "." for b in self.get_layers(model)]

    def block_names(self, model: nn.Module) -> list[str]:
        """Human name of each flat index: "i", or "stage.block" for staged families."""
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

    def num_layers(self, config: Any) -> int | None:
        """Number of (flat) layers a config or config dict describes; None when it does not say."""
        value = config.get(self.num_layers_key) if isinstance(config, dict) else getattr(config, self.num_layers_key, None)
        if isinstance(value, (list, tuple)):
            return len(value) if all(isinstance(d, str) for d in value) else sum(int(d) for d in value)
        return None if value is None else int(value)

    # ---------------------------------------------------------------------------------------- sublayers
    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP read the same input in models of this `config`."""
        if isinstance(self.parallel, bool):
            return self.parallel
        text = getattr(config, "get_text_config", lambda **_: config)(decoder=True)
        return any(bool(getattr(text, key, False)) for key in self.parallel)

    @property
    def hybrid(self) -> bool:
        """Whether a layer's token mixer may be of another kind than attention (or absent)."""
        return bool(self.mixers or self.layer_roles)

    def layer_kind(self, layer: nn.Module) -> str | None:
        """A single-sublayer layer's kind (a token-mixer kind or "mlp"); None where layers hold both sublayers."""
        return self.layer_roles[getattr(layer, self.role_attr)] if self.layer_roles else None

    def holds(self, layer: nn.Module, kind: str) -> bool:
        """Whether `layer` has a token mixer (`kind` "attn") or an MLP ("mlp"): every layer has both, except in
        single-sublayer families."""
        role = self.layer_kind(layer)
        return role is None or (role == "mlp") == (kind == "mlp")
    def mlp_returns_pair(self, layer: nn.Module) -> bool:
        """Whether this layer's MLP returns (output, router scores) rather than the output alone."""
        return self.mlp_pair if isinstance(self.mlp_pair, bool) else bool(getattr(layer, self.mlp_pair, False))

    def mixer_name(self, layer: nn.Module) -> str:
        """The module name of a layer's token mixer: `attn`, or the hybrid mixer the layer holds instead."""
        return next((n for n in (self.attn, *self.mixers) if isinstance(getattr(layer, n, None), nn.Module)), self.attn)

    def mixer_ends(self, layer: nn.Module) -> tuple[str, str]:
        """(`attn_in`, `attn_out`) of one layer: a hybrid layer's mixer stands where `attn` would."""
        mixer = self.mixer_name(layer)
        return (mixer if self.attn_in == self.attn else self.attn_in,
                mixer if self.attn_out == self.attn else self.attn_out)

    def mixer_kinds(self, model: nn.Module) -> list[str]:
        """Each layer's token-mixer kind: a hybrid mixer's from `mixers`; attention's from the config's per-layer
        types (sliding or chunked windows are `sliding_attention`), as transformers' caches read them; a
        single-sublayer layer's from `layer_roles` ("mlp": it mixes no tokens)."""
        config = getattr(model, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = getattr(text, "layer_types", None)
        kinds = []
        for i, layer in enumerate(self.get_layers(model)):
            name, role = self.mixer_name(layer), self.layer_kind(layer)
            if role is not None:  # a single-sublayer layer: its own kind ("mlp" where it mixes no tokens)
                kinds.append(role)
            elif name in self.mixers:
                kinds.append(self.mixers[name])
            elif isinstance(types, (list, tuple)) and i < len(types):
                kinds.append("sliding_attention" if types[i] in ("sliding_attention", "chunked_attention")
                             else "full_attention")
            else:
                window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
                kinds.append("sliding_attention" if window is not None and self.inputs == "text" else "full_attention")
        return kinds

    def attn_modules(self, layer: nn.Module | None = None, parallel: bool = False) -> tuple[str, ...]:
        """Every module of a layer that belongs to its attention (token-mixer) sublayer; given the layer, only
        those it has (a hybrid layer holds one of the mixers; a single-sublayer MLP layer none)."""
        if layer is not None and not self.holds(layer, "attn"):
            return ()
        names = (self.attn, *self.mixers, *self.attn_norms, *(() if parallel else self.shared_norms))
        return _present(layer, names)

    def mlp_modules(self, layer: nn.Module | None = None) -> tuple[str, ...]:
        """Every module of a layer that belongs to its MLP sublayer (none in a single-sublayer token-mixer layer)."""
        if layer is not None and not self.holds(layer, "mlp"):
            return ()
        return _present(layer, (self.mlp, *self.mlp_parts, *self.mlp_norms))

    @property
    def attn_extra(self) -> tuple[str, ...]:
        """The earlier vision name of `attn_norms`."""
        return self.attn_norms

    @property
    def mlp_extra(self) -> tuple[str, ...]:
        """The earlier vision name of `mlp_norms`."""
        return self.mlp_norms

    def auto_class(self, class_name: str) -> str:
        """Name of the transformers Auto class that loads `class_name` (or its Dropped counterpart)."""
        base = class_name[len("Dropped"):] if class_name.startswith("Dropped") else class_name
        if self.inputs == "text":
            return "AutoModelForCausalLM"
        return "AutoModelForImageClassification" if base == self.classification_class else "AutoModel"


def _present(layer: nn.Module | None, names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` (all of them without a layer), or those that are modules of `layer`."""
    if layer is None:
        return names
    return tuple(n for n in names if isinstance(getattr(layer, n, None), nn.Module))


SPECS: tuple[ArchSpec, ...] = tuple(ArchSpec(**f) for f in DECODER_FAMILIES)
VISION_SPECS: tuple[ArchSpec, ...] = tuple(ArchSpec(**f) for f in VISION_FAMILIES)
ALL_SPECS: tuple[ArchSpec, ...] = SPECS + VISION_SPECS

_BY_MODEL_TYPE = {mt: spec for spec in ALL_SPECS for mt in spec.model_types}


def supported_model_types(inputs: str | None = None) -> list[str]:
    """Model types this package can drop (only those taking `inputs` when given)."""
    return sorted(mt for mt, spec in _BY_MODEL_TYPE.items() if inputs in (None, spec.inputs))


def spec_for_model_type(model_type: str) -> ArchSpec:
    """Look a family up by `config.model_type` (a dropped type maps to its base family)."""
    base = model_type[len(DROPPED_PREFIX):] if model_type.startswith(DROPPED_PREFIX) else model_type
    if base not in _BY_MODEL_TYPE:
        raise UserError(
            f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}"
        )
    return _BY_MODEL_TYPE[base]


def get_spec(model_or_config: Any) -> ArchSpec:
    """The ArchSpec of a model, its config, a config dict, or a model_type string."""
    if isinstance(model_or_config, str):
        return spec_for_model_type(model_or_config)
    if isinstance(model_or_config, dict):
        base = model_or_config.get("base_model_type") or model_or_config.get("model_type")
    else:
        config = getattr(model_or_config, "config", model_or_config)
        base = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    if not base:
        raise UserError(f"cannot tell the architecture of {type(model_or_config).__name__}: no config.model_type")
    return spec_for_model_type(base)


def register_family(spec: ArchSpec) -> ArchSpec:
    """Make a family `get_spec` finds by its `model_types`, for this process: scoring, `apply_drop` and the
    run-time checks then work for it. Its checkpoints load with `load_dropped` only where it is registered
    too; a family in `decoder_families.py` / `vision_families.py` also travels with every checkpoint."""
    if not isinstance(spec, ArchSpec):
        raise UserError(f"register_family takes an ArchSpec, got {type(spec).__name__}")
    taken = [mt for mt in spec.model_types if mt in _BY_MODEL_TYPE]
    if not spec.model_types or taken:
        raise UserError(f"family '{spec.family}' needs model types no family has; taken: {', '.join(taken) or '-'}")
    if spec.inputs not in ("text", "image"):
        raise UserError(f"family '{spec.family}': inputs must be 'text' or 'image', got {spec.inputs!r}")
    _BY_MODEL_TYPE.update(dict.fromkeys(spec.model_types, spec))
    return spec


def decoder_spec(model_or_config: Any) -> ArchSpec:
    """`get_spec` for code that handles causal LMs only: a vision family gets a pointer to the vision tools."""
    spec = get_spec(model_or_config)
    if spec.inputs != "text":
        raise UserError(f"'{spec.model_types[0]}' is a vision transformer: use lightning_drop.vision's "
                        "ImageDataModule with DropModule(family=...) and LayerDrop, or the core functions "
                        "apply_drop / compute_importance / save_dropped directly")
    return spec


def vision_spec(model_or_config: Any) -> ArchSpec:
    """`get_spec` for code that handles image models only: a decoder gets a vision-specific error."""
    try:
        spec = get_spec(model_or_config)
    except UserError:
        spec = None
    if spec is None or spec.inputs != "image":
        name = model_or_config if isinstance(model_or_config, str) else type(model_or_config).__name__
        raise UserError(f"unsupported vision architecture '{name}'; supported model types: "
                        f"{', '.join(supported_model_types('image'))}")
    return spec
