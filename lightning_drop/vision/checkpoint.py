"""Dropped vision checkpoints: the core `lightning_drop.dropped_checkpoint` under the names vision code used.

The three shapes (plain, renumbered blocks with `lightning_drop.original_depths` for SwinV2, dropped with
self-contained remote code and `auto_map` for AutoModelForImageClassification or AutoModel) are written
and read by `save_dropped` / `load_dropped` for every family.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dropped_checkpoint import _compact_blocks, checkpoint_kind, load_dropped, save_dropped  # noqa: F401
from .architectures import get_vision_spec


def save_vision_dropped(model: nn.Module, out_dir: str | os.PathLike, image_processor: Any = None,
                        max_shard_size: str = "2GB", overwrite: bool = True) -> Path:
    """`save_dropped` for a vision model; replaces an existing `out_dir` unless `overwrite=False`, as it
    always did (the model's own source directory is refused either way)."""
    get_vision_spec(model)
    return save_dropped(model, out_dir, tokenizer=image_processor, max_shard_size=max_shard_size, overwrite=overwrite)


def load_vision_dropped(directory: str | os.PathLike, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """`load_dropped` for a vision checkpoint (any of the three shapes, or a plain Hugging Face one)."""
    from ..dropped_checkpoint import read_config

    get_vision_spec(str(read_config(directory).get("model_type", "")))  # a decoder gets a vision-specific error
    return load_dropped(directory, dtype=dtype, **kwargs)
