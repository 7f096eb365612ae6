"""Dropped vision transformers: the names this module used to define, now served by the core
`lightning_drop.modeling_dropped` (one set of stand-ins, drop-list checks, `apply_drop` and dropped classes
for decoders and encoders alike)."""

from __future__ import annotations

from typing import Any

from .. import modeling_dropped as _core
from ..modeling_dropped import (  # noqa: F401  (re-exported under their old names)
    RESIDUAL_OUTPUTS,
    DroppedAttention,
    DroppedMLP,
    DroppedResidualOutput,
    DroppedWindowAttention,
    apply_drop,
    dropped_config_class,
    dropped_layers,
    dropped_model_class,
    is_standin,
    normalize_drop_list,
)
from ..modeling_dropped import register_auto_classes as register_vision_auto_classes  # noqa: F401

DroppedVisionAttention = DroppedAttention
DroppedVisionMLP = DroppedMLP


def __getattr__(name: str) -> Any:
    """`Dropped<Config>` / `Dropped<Model>` classes, as the core module builds them."""
    return getattr(_core, name)
