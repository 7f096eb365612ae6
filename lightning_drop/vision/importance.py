"""Importance of every block, attention and MLP sublayer of a vision transformer, from one calibration pass.

Same definitions and reductions as `lightning_drop.importance` (it reuses its per-token metrics, float64
torchmetrics accumulators and `ImportanceScores`), with hooks placed by a `VisionSpec`:
attention X = block input, Y = h (input of `spec.mlp_entry`); MLP X = h, Y = block output; block X/Y = block
input/output. Every token counts (CLS, registers and all patch tokens; images have no padding). LayerScale
(DINOv2/v3) and SwinV2's post-norms are inside Y because h and the block output are taken after them.
"without residual" (`cosine_no_residual`): X = input of `spec.attn_in`/`spec.mlp_in`, Y = output of
`spec.attn_out`/`spec.mlp_out` (the sublayer's own contribution to the residual stream).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..importance import (
    KINDS,
    METRICS,
    ImportanceScores,
    LayerScoreMean,
    _positional_scores,
    token_scores,
)
from ..selection import SCHEDULES, TARGETS, DropResult, select_modules
from .architectures import VisionSpec, get_vision_spec
from .modeling_dropped import apply_drop, dropped_layers


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class VisionImportanceAccumulator:
    """Installs scoring hooks while active: `with acc.hooks(): model(pixel_values=...)`."""

    def __init__(self, model: nn.Module, metric: str = "cosine", spec: VisionSpec | None = None) -> None:
        if metric not in METRICS:
            raise UserError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
        self.model, self.metric = model, metric
        self.spec = spec or get_vision_spec(model)
        self.layers = self.spec.get_layers(model)
        self.metrics = nn.ModuleDict({k: LayerScoreMean(len(self.layers)) for k in KINDS})
        self.num_tokens = 0

    def _reduce(self, kind: str, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if y.dim() == 0:  # a dropped stand-in contributes nothing: no score
            return
        scores = token_scores(self.metric, x, y.expand_as(x) if y.shape != x.shape else y)
        self.metrics[kind].update(i, scores.sum(dtype=torch.float64), float(scores.numel()))

    @contextmanager
    def hooks(self) -> Iterator["VisionImportanceAccumulator"]:
        spec, handles = self.spec, []
        state: dict[int, dict[str, torch.Tensor]] = {}

        def pre(i: int, key: str) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state.setdefault(i, {})[key] = _arg(args, kwargs)
            return fn

        def block_post(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                s, y = state.pop(i), _first(output)
                if i == 0:
                    self.num_tokens += s["x"].shape[0] * s["x"].shape[1]
                if self.metric == "cosine_no_residual":
                    self._reduce("block", i, s["x"], y - s["x"])
                    return
                self._reduce("attn", i, s["x"], s["h"])
                self._reduce("mlp", i, s["h"], y)
                self._reduce("block", i, s["x"], y)
            return fn

        def sub_post(i: int, kind: str) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                x = state[i].pop(f"{kind}_in", None)
                if x is not None:
                    self._reduce(kind, i, x, _first(output))
            return fn

        try:
            for i, block in enumerate(self.layers):
                handles.append(block.register_forward_pre_hook(pre(i, "x"), with_kwargs=True))
                handles.append(block.register_forward_hook(block_post(i), with_kwargs=True))
                if self.metric == "cosine_no_residual":
                    for kind, src, dst in (("attn", spec.attn_in, spec.attn_out), ("mlp", spec.mlp_in, spec.mlp_out)):
                        if _is_gone(block, spec, kind):
                            continue
                        start = block if not src else getattr(block, src)
                        handles.append(start.register_forward_pre_hook(pre(i, f"{kind}_in"), with_kwargs=True))
                        handles.append(getattr(block, dst).register_forward_hook(sub_post(i, kind), with_kwargs=True))
                else:
                    entry = getattr(block, spec.mlp_entry)
                    handles.append(entry.register_forward_pre_hook(pre(i, "h"), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def scores(self) -> ImportanceScores:
        attn_d, mlp_d = dropped_layers(self.model)
        gone = {"attn": set(attn_d), "mlp": set(mlp_d), "block": set(attn_d) & set(mlp_d)}
        rows: dict[str, list[float | None]] = {}
        n = len(self.layers)
        for kind in KINDS:
            m = self.metrics[kind]
            values = (m.total / m.count.clamp_min(1)).tolist() if m.count.sum() > 0 else [math.nan] * n
            counts = m.count.tolist()
            rows[kind] = [None if i in gone[kind] else (v if counts[i] > 0 else math.nan) for i, v in enumerate(values)]
        for kind in KINDS:
            bad = [i for i, v in enumerate(rows[kind]) if v is not None and not math.isfinite(v)]
            if bad and not (self.metric == "cosine_no_residual" and kind == "block"):
                raise UserError(f"non-finite {kind} importance scores for blocks {bad}: NaN/inf hidden states "
                                 "(try float32) or no calibration images")
        return ImportanceScores(self.metric, rows["attn"], rows["mlp"], rows["block"], self.num_tokens,
                                extra={"block_names": self.spec.block_names(self.model), "family": self.spec.family})


def _is_gone(block: nn.Module, spec: VisionSpec, kind: str) -> bool:
    from .modeling_dropped import is_standin

    return is_standin(getattr(block, spec.attn if kind == "attn" else spec.mlp[0]))


def _pixels(batch: Any, device: torch.device) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, dict):
        if "pixel_values" not in batch:
            raise UserError("calibration batches need 'pixel_values'")
        x = batch["pixel_values"]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        x = batch[0]  # (images, labels) from ImageDataModule
    else:
        raise UserError(f"calibration batches must be image tensors, (images, labels) or dicts, got {type(batch).__name__}")
    if x.dim() != 4:
        raise UserError(f"images must be (batch, channels, height, width), got shape {tuple(x.shape)}")
    return x.to(device)


@torch.no_grad()
def compute_vision_importance(model: nn.Module, batches: Iterable[Any], metric: str = "cosine",
                              seed: int = 0) -> ImportanceScores:
    """Score every block, attention and MLP sublayer (flat block index) of a vision model over `batches`."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    spec = get_vision_spec(model)
    n = len(spec.get_layers(model))
    attn_d, mlp_d = dropped_layers(model)
    if metric in ("reverse", "random"):
        rows = {k: _positional_scores(metric, n, seed + j) for j, k in enumerate(KINDS)}
        gone = {"attn": set(attn_d), "mlp": set(mlp_d), "block": set(attn_d) & set(mlp_d)}
        return ImportanceScores(metric, *[[None if i in gone[k] else v for i, v in enumerate(rows[k])] for k in KINDS],
                                extra={"block_names": spec.block_names(model), "family": spec.family})
    acc = VisionImportanceAccumulator(model, metric, spec)
    device = next(model.parameters()).device
    acc.metrics.to(device)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with acc.hooks():
            for batch in batches:
                model(pixel_values=_pixels(batch, device))
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise UserError("no calibration data: the batches were empty")
    return acc.scores()


def vision_drop_by_importance(model: nn.Module, batches: Iterable[Any] | Callable[[], Iterable[Any]], target: str,
                              num: int, metric: str = "cosine", schedule: str = "one-shot", step: int = 1,
                              keep: Sequence[int] = (), seed: int = 0) -> DropResult:
    """Score, select (lowest first, `lightning_drop.selection.select_modules`) and drop `num` modules in place."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule '{schedule}'; choose from {', '.join(SCHEDULES)}")
    if step < 1 or num < 1:
        raise UserError(f"num and step must be at least 1, got num={num}, step={step}")
    get_batches = batches if callable(batches) else (lambda data=list(batches): data)
    result = DropResult([], [])
    remaining = num
    while remaining > 0:
        scores = compute_vision_importance(model, get_batches(), metric=metric, seed=seed + len(result.rounds))
        k = remaining if schedule == "one-shot" else min(step, remaining)
        attn, mlp = select_modules(scores, target, k, keep)
        apply_drop(model, attn=attn, mlp=mlp)
        result.rounds.append(scores)
        result.round_drops.append({"drop_attn": attn, "drop_mlp": mlp})
        remaining -= k
    result.attn, result.mlp = dropped_layers(model)
    return result
