"""Writing dropped models as checkpoints that any transformers user can load.

Three shapes, chosen from what was dropped:
- nothing dropped: the model's own `save_pretrained` output;
- only whole blocks: a plain checkpoint of the original architecture with fewer (renumbered) layers;
- attention/MLP sublayers: `model_type: dropped_<base>` with `drop_attn_list`/`drop_mlp_list`, plus this
  package's self-contained `modeling_dropped.py` referenced from `auto_map` (for `trust_remote_code=True`).
Every write goes to a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .architectures import ArchSpec, get_spec
from .atomic_io import atomic_dir, atomic_write_text, check_output
from .errors import UserError
from .modeling_dropped import dropped_layers

_REMOTE_FILES = ("modeling_dropped.py", "architectures.py")
_PACKAGE_DIR = Path(__file__).resolve().parent


def _compact_blocks(model: nn.Module, spec: ArchSpec, blocks: list[int]) -> nn.Module | None:
    """A plain base-architecture model without the dropped blocks, sharing tensors with `model`.

    Returns None when the renumbered config would not rebuild the same modules (e.g. DeepSeek's dense
    first layers), in which case the caller keeps the dropped format.
    """
    import transformers

    config = model.config
    n = config.num_hidden_layers
    keep = [i for i in range(n) if i not in set(blocks)]
    base_cls = getattr(transformers, spec.config_class)
    cfg = config.to_dict()
    for key in ("drop_attn_list", "drop_mlp_list", "base_model_type", "auto_map", "architectures",
                "model_type", "transformers_version"):
        cfg.pop(key, None)
    cfg["num_hidden_layers"] = len(keep)
    if cfg.get("layer_types") is not None:
        cfg["layer_types"] = [config.layer_types[i] for i in keep]
    cfg["lightning_drop"] = {"dropped_blocks": list(blocks), "original_num_hidden_layers": n}
    new_config = base_cls(**cfg)
    if getattr(new_config, "layer_types", None) is not None and getattr(config, "layer_types", None) is not None:
        if list(new_config.layer_types) != [config.layer_types[i] for i in keep]:
            return None
    remap = {old: new for new, old in enumerate(keep)}
    prefix = re.escape(spec.layer_prefix)
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    state = {}
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if m:
            key = f"{spec.layer_prefix}.{remap[int(m.group(1))]}." + key[m.end():]
        state[key] = value
    with torch.device("meta"):
        plain = getattr(transformers, spec.causal_lm_class)(new_config)
    expected = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state.items()}:
        return None
    plain.load_state_dict(state, assign=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def checkpoint_kind(model: nn.Module) -> str:
    """'plain', 'blocks' or 'dropped': the shape `save_dropped` will write."""
    attn, mlp = dropped_layers(model)
    if not attn and not mlp:
        return "plain"
    return "blocks" if attn == mlp else "dropped"


def save_dropped(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None,
                 max_shard_size: str = "2GB", extra: Callable[[Path], None] | None = None,
                 overwrite: bool = False) -> Path:
    """Save `model` (dropped or not) to `out_dir` atomically in safetensors; returns the path.

    A non-empty `out_dir` is replaced only with `overwrite=True`. `extra(tmp_dir)` may add files (reports)
    that must appear together with the checkpoint.
    """
    spec = get_spec(model)
    attn, mlp = dropped_layers(model)
    kind = checkpoint_kind(model)
    out_dir = check_output(out_dir, overwrite=overwrite, option="save_dropped: out_dir",
                           sources=[getattr(model.config, "_name_or_path", None) or None],
                           hint="pass overwrite=True to replace it")
    with atomic_dir(out_dir) as tmp:
        target = model
        if kind == "blocks":
            target = _compact_blocks(model, spec, attn) or model
            if target is model:
                kind = "dropped"
        target.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if kind == "dropped":
            _add_remote_code(tmp, model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return out_dir


def _add_remote_code(directory: Path, model: nn.Module) -> None:
    for name in _REMOTE_FILES:
        shutil.copyfile(_PACKAGE_DIR / name, directory / name)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config_cls, model_cls = type(model.config).__name__, type(model).__name__
    config["auto_map"] = {
        "AutoConfig": f"modeling_dropped.{config_cls}",
        "AutoModelForCausalLM": f"modeling_dropped.{model_cls}",
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


def load_dropped(directory: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Load any checkpoint this package writes, or one written by the LLM-Drop reference code."""
    from transformers import AutoModelForCausalLM

    from .modeling_dropped import dropped_classes, normalize_drop_list, register_auto_classes

    register_auto_classes()
    config = read_config(directory)
    kwargs = {"dtype": dtype, **kwargs} if dtype is not None else kwargs
    if is_llm_drop_config(config):
        spec = get_spec(config["model_type"])
        config_cls, model_cls = dropped_classes(spec)
        cfg = dict(config)
        for key in ("auto_map", "architectures", "model_type"):
            cfg.pop(key, None)
        n = cfg.get("num_hidden_layers")
        cfg["drop_attn_list"] = normalize_drop_list(cfg.get("drop_attn_list"), n)
        cfg["drop_mlp_list"] = normalize_drop_list(cfg.get("drop_mlp_list"), n)
        cfg["base_model_type"] = config["model_type"]
        return model_cls.from_pretrained(directory, config=config_cls(**cfg), **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
