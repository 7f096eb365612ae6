"""Vision models for training: a saved (plain or dropped) checkpoint, or a family at random init.

The decoder catalogue (`model_loading`) resolves names and tokenizers; an image model needs neither, only the
family's classification class (or its backbone, for DINOv3 ViT, which transformers ships without a head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.architectures import VISION_SPECS, get_spec, vision_spec
from ..errors import UserError
from .dropped_checkpoint import load_dropped, read_config

VISION_FAMILIES = tuple(spec.family for spec in VISION_SPECS)


def is_vision_checkpoint(path: str) -> bool:
    """Whether the checkpoint directory `path` holds a vision family (by its config's `model_type`)."""
    try:
        return get_spec(str(read_config(path).get("model_type", ""))).inputs != "text"
    except (OSError, ValueError, UserError):
        return False


def build_vision_model(family: str = "vit", init_config: dict[str, Any] | None = None, model_path: str | None = None,
                       num_labels: int = 10, seed: int | None = None) -> nn.Module:
    """A vision model: loaded from `model_path` (plain or dropped checkpoint), or `family` at random init with
    the family's tiny defaults overridden by `init_config` (e.g. hidden_size, num_hidden_layers, image_size)."""
    import transformers

    if model_path:
        vision_spec(str(read_config(model_path).get("model_type", "")))
        return load_dropped(model_path)
    if family not in VISION_FAMILIES:
        raise UserError(f"unknown vision family '{family}'; choose from {', '.join(VISION_FAMILIES)}")
    spec = vision_spec(family)
    kwargs = {**spec.tiny_overrides, **(init_config or {})}
    if spec.classification_class:
        kwargs["num_labels"] = num_labels
    config = getattr(transformers, spec.config_class)(**kwargs)
    cls = getattr(transformers, spec.classification_class or spec.model_classes[0])
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config)


def tiny_vision_model(family: str, seed: int = 0, num_labels: int = 10, **overrides: Any) -> nn.Module:
    """Random-init tiny model of `family` in eval mode (tests)."""
    return build_vision_model(family, overrides, num_labels=num_labels, seed=seed).eval()


def hidden_size(config: Any) -> int:
    """Width of the pooled output a classification head reads."""
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    return int(config.embed_dim * 2 ** (len(config.depths) - 1))  # SwinV2 final stage width
