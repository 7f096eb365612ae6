"""A checkpoint directory as the streamed paths see it: its config, its CausalLM on the meta device (no
storage), and a check that its safetensors hold exactly that model's tensors. `streaming` scores with it,
`streamed_writer` writes with it; nothing here reads a weight.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.architectures import get_spec
from ..core.modeling_dropped import dropped_classes, normalize_drop_list, register_auto_classes
from ..io.dropped_checkpoint import is_llm_drop_config, read_config, require_weights
from ..io.checkpoint_names import CheckpointNames
from ..io.safetensors_io import SafetensorsShards


def load_config(model_dir: str | os.PathLike) -> Any:
    """The transformers config of a checkpoint directory (plain, dropped, or LLM-Drop reference format)."""
    from transformers import AutoConfig

    register_auto_classes()
    raw = read_config(model_dir)
    if is_llm_drop_config(raw):
        spec = get_spec(raw["model_type"])
        config_cls, _ = dropped_classes(spec)
        cfg = dict(raw)
        for key in ("auto_map", "architectures", "model_type"):
            cfg.pop(key, None)
        n = cfg.get("num_hidden_layers")
        cfg["drop_attn_list"] = normalize_drop_list(cfg.get("drop_attn_list"), n)
        cfg["drop_mlp_list"] = normalize_drop_list(cfg.get("drop_mlp_list"), n)
        cfg["base_model_type"] = raw["model_type"]
        return config_cls(**cfg)
    get_spec(str(raw.get("model_type", "")))  # one-line error for an unsupported architecture
    return AutoConfig.from_pretrained(str(model_dir))


def meta_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The CausalLM of `config` with its parameters on the meta device (no storage), dropped stand-ins in
    place. Buffers are real: the ones no checkpoint holds (rotary tables, sinusoidal positions) are computed
    by the family's own constructor, the others are small and read like the weights."""
    import transformers
    from accelerate import init_empty_weights

    spec = get_spec(config)
    config_cls, model_cls = dropped_classes(spec)
    cls = model_cls if isinstance(config, config_cls) else getattr(transformers, spec.causal_lm_class)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    model.tie_weights()  # the empty-weights context re-registers each parameter, which undoes the tying
    return model.to(dtype).eval()


def check_weights(model_dir: str | os.PathLike, model: nn.Module) -> CheckpointNames:
    """Refuse, before any layer runs, a checkpoint whose tensors are not exactly the (meta) model's, under
    the names transformers gives them (`CheckpointNames`); returns that translation for the readers.

    What `dropped_checkpoint.load_complete` refuses for a loaded model, read from the safetensors headers:
    a missing tensor would otherwise end the run late, an unexpected one be silently skipped.
    """
    import re

    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in remove_tied_weights_from_state_dict(state, model).items()}
    with SafetensorsShards(model_dir) as tensors:
        names = CheckpointNames(model, tensors.keys())
        found = names.shapes(tensors)

    def ignored(key: str, patterns: Any) -> bool:
        return any(re.search(p, key) for p in patterns or ())

    missing = [k for k in expected if k not in found and not ignored(k, model._keys_to_ignore_on_load_missing)]
    unexpected = [k for k in names.unexpected if not ignored(k, model._keys_to_ignore_on_load_unexpected)]
    mismatched = [(k, found[k], expected[k]) for k in expected if k in found and found[k] != expected[k]]
    require_weights(model_dir, missing, unexpected, mismatched)
    return names


def load_generation_config(model_dir: Path, config: Any) -> Any:
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(model_dir))
    return GenerationConfig.from_model_config(config)
