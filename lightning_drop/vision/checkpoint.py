"""Dropped vision checkpoints, in the same three shapes as decoders (see `lightning_drop.checkpoint`).

- nothing dropped: the model's own `save_pretrained` output;
- only whole blocks: a plain checkpoint of the base architecture with fewer (renumbered) blocks, with
  `config.json["lightning_drop"] = {"dropped_blocks": [...], "original_num_hidden_layers": N}` (SwinV2: per-stage
  `depths` shrink, plus `original_depths`). SwinV2 falls back to the dropped format when the renumbered stage
  would change a kept block's window shift (shifts alternate by position) or empty a stage;
- attention/MLP sublayers: `model_type: dropped_<base>` with flat `drop_attn_list`/`drop_mlp_list`, and the
  self-contained `modeling_dropped.py` + `architectures.py` of `lightning_drop.vision` referenced from
  `auto_map` (`AutoModelForImageClassification`, or `AutoModel` for backbones such as DINOv3 ViT).
After `import lightning_drop.vision` the dropped classes are registered with transformers' Auto classes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_dir, atomic_write_text, read_config
from ..errors import UserError
from .architectures import DROPPED_PREFIX, VisionSpec, get_vision_spec
from .modeling_dropped import dropped_layers, register_vision_auto_classes

_REMOTE_FILES = ("modeling_dropped.py", "architectures.py")
_DIR = Path(__file__).resolve().parent


def checkpoint_kind(model: nn.Module) -> str:
    """'plain', 'blocks' or 'dropped': the shape `save_vision_dropped` will write."""
    attn, mlp = dropped_layers(model)
    if not attn and not mlp:
        return "plain"
    return "blocks" if attn == mlp else "dropped"


def _base_class_name(model: nn.Module) -> str:
    name = type(model).__name__
    return name[len("Dropped"):] if name.startswith("Dropped") else name


def _compact_blocks(model: nn.Module, spec: VisionSpec, blocks: list[int]) -> nn.Module | None:
    """A plain model of the base class without `blocks`, sharing tensors with `model`; None if impossible."""
    import transformers

    config = model.config
    gone = set(blocks)
    layers = spec.get_layers(model)
    keep = [i for i in range(len(layers)) if i not in gone]
    cfg = config.to_dict()
    for key in ("drop_attn_list", "drop_mlp_list", "base_model_type", "auto_map", "architectures", "model_type",
                "transformers_version", "stage_names", "out_features", "out_indices", "_out_features",
                "_out_indices"):  # backbone stage names follow the (new) number of blocks
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
    else:
        cfg["num_hidden_layers"] = len(keep)
    cfg["lightning_drop"] = info
    new_config = getattr(transformers, spec.config_class)(**cfg)
    with torch.device("meta"):
        plain = getattr(transformers, _base_class_name(model))(new_config)
    new_layers = spec.get_layers(plain)
    for new_i, old_i in enumerate(keep):  # SwinV2: shifts alternate by position inside a stage
        if getattr(new_layers[new_i], "shift_size", None) != getattr(layers[old_i], "shift_size", None):
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
    plain.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (e.g. SwinV2 relative-position tables) were built on meta: rebuild them on CPU.
    if any(b.is_meta for b in plain.buffers()):
        with torch.device("cpu"):
            fresh = getattr(transformers, _base_class_name(model))(new_config)
        fresh.load_state_dict(state, strict=True)
        plain = fresh
    return plain.eval()


def save_vision_dropped(model: nn.Module, out_dir: str | os.PathLike, image_processor: Any = None,
                        max_shard_size: str = "2GB") -> Path:
    """Save a (dropped or not) vision model to `out_dir` atomically in safetensors; returns the path."""
    spec = get_vision_spec(model)
    attn, _ = dropped_layers(model)
    kind = checkpoint_kind(model)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        target = model
        if kind == "blocks":
            target = _compact_blocks(model, spec, attn) or model
            if target is model:
                kind = "dropped"
        target.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if kind == "dropped":
            _add_remote_code(tmp, model, spec)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
    return out_dir


def _add_remote_code(directory: Path, model: nn.Module, spec: VisionSpec) -> None:
    for name in _REMOTE_FILES:
        shutil.copyfile(_DIR / name, directory / name)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    auto = ("AutoModelForImageClassification" if _base_class_name(model) == spec.classification_class
            else "AutoModel")
    config["auto_map"] = {"AutoConfig": f"modeling_dropped.{type(model.config).__name__}",
                          auto: f"modeling_dropped.{type(model).__name__}"}
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_vision_dropped(directory: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Load a vision checkpoint written by `save_vision_dropped` (any of the three shapes) or a plain HF one."""
    import transformers

    from . import modeling_dropped

    register_vision_auto_classes()
    config = read_config(directory)
    model_type = str(config.get("model_type", ""))
    get_vision_spec(model_type)  # one-line error for unsupported architectures
    archs = config.get("architectures") or []
    if not archs:
        raise UserError(f"{directory}/config.json names no 'architectures': cannot tell which model class to load")
    name = archs[0]
    if model_type.startswith(DROPPED_PREFIX):
        cls = getattr(modeling_dropped, name if name.startswith("Dropped") else f"Dropped{name}")
    else:
        cls = getattr(transformers, name)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return cls.from_pretrained(directory, **kwargs).eval()
