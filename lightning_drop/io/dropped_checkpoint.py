"""Writing dropped models (decoders and vision encoders) as checkpoints that any transformers user can load.

Three shapes, chosen from what was dropped:
- nothing dropped: the model's own `save_pretrained` output;
- only whole blocks: a plain checkpoint of the original architecture with fewer (renumbered) layers, with
  `config.json["lightning_drop"] = {"dropped_blocks": [...], "original_num_hidden_layers": N}` (staged
  families: per-stage `depths` shrink, plus `original_depths`); per-layer lists are cut and lists of layer
  indices renumbered. The dropped format is kept when the renumbered config would not rebuild the same
  modules (DeepSeek's dense first layers, Jamba's kinds by period and offset, a SwinV2 block whose window
  shift would change, an emptied stage), the dropped block is no identity (GPT-1's post-norms stay), or the cut
  would not leave a working cache (a Nemotron-H model whose first layer would be an MLP, a hybrid left without
  attention layers);
- attention/MLP sublayers: `model_type: dropped_<base>` with `drop_attn_list`/`drop_mlp_list`, plus this
  package's self-contained `modeling_dropped.py` (and the architecture files it imports) referenced from
  `auto_map` (for `trust_remote_code=True`).
Every write goes to a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..core.architectures import ATTENTION_LAYER_TYPES, DROPPED_PREFIX, ArchSpec, get_spec
from .atomic_io import atomic_dir, atomic_write_text
from .output_targets import check_output
from ..errors import UserError, param
from ..core.modeling_dropped import base_class_name, drop_lists, dropped_layers

# Copied next to a dropped checkpoint: modeling_dropped.py and every file it imports relatively.
_REMOTE_FILES = ("modeling_dropped.py", "standins.py", "architectures.py", "decoder_families.py", "vision_families.py")
#: the remote-code files live together in core/ and keep their names inside a checkpoint
_PACKAGE_DIR = Path(__file__).resolve().parent.parent / "core"
# Config fields that describe the drop or the old layer count, not the plain renumbered model.
_NOT_PLAIN = ("drop_attn_list", "drop_mlp_list", "base_model_type", "auto_map", "architectures", "model_type",
              "transformers_version", "stage_names", "out_features", "out_indices", "_out_features", "_out_indices")


def compact_blocks(model: nn.Module, spec: ArchSpec, blocks: list[int]) -> nn.Module | None:
    """A plain base-architecture model without the dropped blocks, sharing tensors with `model`.

    Returns None when the renumbered config would not rebuild the same modules, in which case the caller
    keeps the dropped format.
    """
    if spec.residual_norms:  # a dropped block still normalizes the residual stream (post-norm): no layer to cut
        return None
    import transformers

    config = model.config
    gone = set(blocks)
    layers = spec.get_layers(model)
    keep = [i for i in range(len(layers)) if i not in gone]
    if spec.layer_kind(layers[keep[0]]) == "mlp":  # transformers reads the cache's length from the first layer:
        return None  # a first layer that mixes no tokens (Nemotron-H's MLP) has no cache slot to read it from
    types = list(getattr(config, "layer_types", None) or ())
    if any(t in ATTENTION_LAYER_TYPES for t in types) and not any(types[i] in ATTENTION_LAYER_TYPES for i in keep):
        return None  # a hybrid cut to no attention layer: its masks are still sized from an attention cache slot
    cfg = config.to_dict()
    for key in _NOT_PLAIN:
        cfg.pop(key, None)
    info: dict[str, Any] = {"dropped_blocks": sorted(gone), "original_num_hidden_layers": len(layers)}
    if spec.staged:
        depths, start = [], 0
        for d in config.depths:
            depths.append(sum(1 for i in range(start, start + d) if i not in gone))
            start += d
        if 0 in depths:
            return None
        info["original_depths"] = list(config.depths)
        cfg["depths"] = depths
    elif not isinstance(cfg.get(spec.num_layers_key), list):  # a per-layer type list is cut below, as the others
        cfg[spec.num_layers_key] = len(keep)
    for key, value in list(cfg.items()):  # per-layer lists (layer_types, mlp_layer_types, no_rope_layers, ...)
        if _is_layer_index_list(key, value, len(layers)):  # Bamba's attn_layer_indices: kept ones, renumbered
            cfg[key] = [keep.index(i) for i in value if i in keep]
        elif "layer" in key and isinstance(value, list) and len(value) == len(layers):
            cfg[key] = [value[i] for i in keep]
    cfg["lightning_drop"] = info
    new_config = getattr(transformers, spec.config_class)(**cfg)
    if getattr(new_config, "layer_types", None) is not None and getattr(config, "layer_types", None) is not None:
        if list(new_config.layer_types) != [config.layer_types[i] for i in keep]:
            return None
    cls = getattr(transformers, base_class_name(model))
    with torch.device("meta"):
        plain = cls(new_config)
    new_layers = spec.get_layers(plain)
    # each kept layer must be rebuilt with its own settings: SwinV2's shifts alternate by position inside a stage,
    # MiniCPM3 scales every residual branch by 1 / sqrt(number of layers)
    if any(_layer_settings(new_layers[new_i]) != _layer_settings(layers[old_i]) for new_i, old_i in enumerate(keep)):
        return None
    old_prefixes, new_prefixes = spec.layer_prefixes(model), spec.layer_prefixes(plain)
    remap = {old_prefixes[old]: new_prefixes[new] for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        for old, new in remap.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    expected = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state.items()}:
        return None
    plain.load_state_dict(state, assign=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.eval()


# attributes that give a layer's position (renumbered with it), not its settings
_POSITION = ("idx", "_id", "_number", "_index")


def _layer_settings(layer: nn.Module) -> dict[str, Any]:
    """A layer's own scalar settings (window shift, residual scale, kind), not its position in the list."""
    return {k: v for k, v in vars(layer).items() if isinstance(v, (bool, int, float, str))
            and not k.endswith(_POSITION) and not k.startswith("_") and k != "training"}


def _is_layer_index_list(key: str, value: Any, num_layers: int) -> bool:
    """A config field listing layers by index (`attn_layer_indices`, Llama 4's `moe_layers`): the layers of one kind."""
    return (key.endswith(("layer_indices", "layer_ids", "moe_layers")) and isinstance(value, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in value))


def checkpoint_kind(model: nn.Module) -> str:
    """'plain', 'blocks' or 'dropped': the shape `save_dropped` will write."""
    attn, mlp = dropped_layers(model)
    real_attn, real_mlp = drop_lists(model)  # gone, less what a single-sublayer layer never had
    if not real_attn and not real_mlp:
        return "plain"
    return "blocks" if set(real_attn) | set(real_mlp) <= set(attn) & set(mlp) else "dropped"


def save_dropped(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None,
                 max_shard_size: str = "2GB", extra: Callable[[Path], None] | None = None,
                 overwrite: bool = False) -> Path:
    """Save `model` (dropped or not, any family) to `out_dir` atomically in safetensors; returns the path.

    `tokenizer` is anything with `save_pretrained` (a tokenizer, an image processor). A non-empty `out_dir`
    is replaced only with `overwrite=True`. `extra(tmp_dir)` may add files (reports) that must appear together
    with the checkpoint.
    """
    spec = get_spec(model)
    attn, mlp = dropped_layers(model)
    kind = checkpoint_kind(model)
    out_dir = check_output(out_dir, overwrite=overwrite, option="save_dropped: out_dir",
                           sources=[getattr(model.config, "_name_or_path", None) or None],
                           hint=f"pass {param('overwrite', 'True')} to replace it")
    with atomic_dir(out_dir) as tmp:
        target = model
        if kind == "blocks":
            target = compact_blocks(model, spec, sorted(set(attn) & set(mlp))) or model
            if target is model:
                kind = "dropped"
        target.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if kind == "dropped":
            add_remote_code(tmp, model, spec)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return out_dir


def add_remote_code(directory: Path, model: nn.Module, spec: ArchSpec | None = None) -> None:
    spec = spec or get_spec(model)
    for name in _REMOTE_FILES:
        shutil.copyfile(_PACKAGE_DIR / name, directory / name)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {
        "AutoConfig": f"modeling_dropped.{type(model.config).__name__}",
        spec.auto_class(type(model).__name__): f"modeling_dropped.{type(model).__name__}",
    }
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(directory: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, with a one-line error when absent."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def is_llm_drop_config(config: dict) -> bool:
    """A config with drop lists but a base model_type (as the LLM-Drop reference code writes)."""
    has_lists = any(config.get(k) for k in ("drop_attn_list", "drop_mlp_list"))
    return has_lists and not str(config.get("model_type", "")).startswith("dropped_")


def require_weights(where: str | os.PathLike, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                    mismatched: Iterable[tuple[str, Sequence[int], Sequence[int]]] = ()) -> None:
    """One line naming the weights a checkpoint lacks, has in excess, or has in another shape than its config.

    Every loader goes through this: transformers would fill a missing weight with random values (and drop
    an unexpected one) with only a log message, and the result would look like a model that works.
    """
    missing, unexpected, mismatched = sorted(set(missing)), sorted(set(unexpected)), sorted(mismatched)
    if not (missing or unexpected or mismatched):
        return

    def few(names: list[str]) -> str:
        shown = ", ".join(names[:3])
        return f"{shown} and {len(names) - 3} more" if len(names) > 3 else shown

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if mismatched:
        shapes = [f"{k} {list(a)} vs config {list(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} of another shape than config.json gives ({few(shapes)})")
    raise UserError(f"{where}: the weights do not match config.json: {'; '.join(parts)}; check config.json "
                    "(layer count, sizes, drop lists) against the safetensors files")


@contextlib.contextmanager
def _no_load_report() -> Iterator[None]:
    """transformers logs a many-line table of the weights it did not load; `require_weights` says it in one."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_complete(load: Callable[..., Any], ref: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`load(ref, **kwargs)` (any transformers model `from_pretrained`), refused unless every weight of the
    model came from the checkpoint in its shape and every weight of the checkpoint was used."""
    with _no_load_report():
        model, info = load(str(ref), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    require_weights(ref, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                    info.get("mismatched_keys", ()))
    return model


def load_dropped(directory: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Load any checkpoint this package writes (any family), or one written by the LLM-Drop reference code."""
    import transformers

    from ..core.modeling_dropped import (
        dropped_config_class,
        dropped_model_class,
        normalize_drop_list,
        register_auto_classes,
    )

    register_auto_classes()
    config = read_config(directory)
    model_type = str(config.get("model_type", ""))
    spec = get_spec(model_type)  # one-line error for unsupported architectures
    kwargs = {"dtype": dtype, **kwargs} if dtype is not None else kwargs
    archs = config.get("architectures") or []
    base_name = archs[0][len("Dropped"):] if archs and archs[0].startswith("Dropped") else (archs or [None])[0]
    if spec.inputs != "text" and not base_name:
        raise UserError(f"{directory}/config.json names no 'architectures': cannot tell which model class to load")
    if is_llm_drop_config(config):
        cfg = dict(config)
        for key in ("auto_map", "architectures", "model_type"):
            cfg.pop(key, None)
        n = spec.num_layers(cfg)
        cfg["drop_attn_list"] = normalize_drop_list(cfg.get("drop_attn_list"), n)
        cfg["drop_mlp_list"] = normalize_drop_list(cfg.get("drop_mlp_list"), n)
        cfg["base_model_type"] = model_type
        cls = dropped_model_class(spec, base_name if base_name in spec.model_classes else spec.model_classes[0])
        config = dropped_config_class(spec)(**cfg)
        return load_complete(cls.from_pretrained, directory, config=config, **kwargs).eval()
    if spec.inputs == "text":  # the Auto class also serves remote-code families and their own configs
        return load_complete(transformers.AutoModelForCausalLM.from_pretrained, directory, **kwargs).eval()
    if model_type.startswith(DROPPED_PREFIX):
        cls = dropped_model_class(spec, base_name)
    else:
        cls = getattr(transformers, base_name)
    return load_complete(cls.from_pretrained, directory, **kwargs).eval()
