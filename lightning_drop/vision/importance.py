"""Importance of every block, attention and MLP sublayer of a vision transformer: the core
`lightning_drop.importance` (one accumulator for every family) under the names vision code used.

attention X = block input, Y = h (input of `spec.mlp_entry`); MLP X = h, Y = block output; block X/Y = block
input/output. Every token counts (CLS, registers and all patch tokens; images have no padding). LayerScale
(DINOv2/v3) and SwinV2's post-norms are inside Y because h and the block output are taken after them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ..importance import ImportanceAccumulator, ImportanceScores, compute_importance
from ..selection import DropResult, drop_by_importance
from .architectures import get_vision_spec

VisionImportanceAccumulator = ImportanceAccumulator


def compute_vision_importance(model: nn.Module, batches: Iterable[Any], metric: str = "cosine",
                              seed: int = 0) -> ImportanceScores:
    """Score every block, attention and MLP sublayer (flat block index) of a vision model over `batches`."""
    get_vision_spec(model)
    return compute_importance(model, batches, metric=metric, seed=seed)


def vision_drop_by_importance(model: nn.Module, batches: Iterable[Any] | Callable[[], Iterable[Any]], target: str,
                              num: int, metric: str = "cosine", schedule: str = "one-shot", step: int = 1,
                              keep: Sequence[int] = (), seed: int = 0) -> DropResult:
    """Score, select (lowest first) and drop `num` modules of a vision model in place: the core
    `lightning_drop.selection.drop_by_importance`."""
    get_vision_spec(model)
    return drop_by_importance(model, batches, target, num, metric=metric, schedule=schedule, step=step, keep=keep,
                              seed=seed)
