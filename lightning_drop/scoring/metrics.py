"""Importance metrics: how redundant a module mapping x -> y is. Shipped ones by name, a user's own by
`register_metric` or as a callable / importable name wherever a metric is asked for.

A *token* metric scores every token from the module's input and output hidden states (`fn(x, y)`, last
dimension hidden, lower = more redundant); a *positional* metric scores layers without looking at data
(`fn(num_layers, seed)`, one score per layer; no calibration pass runs); a *model* metric runs the model
itself (`fn(model, inputs, kinds)`, the shipped `loss`: the calibration loss's rise when a module is dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..core.options import METRICS
from .loss_metric import loss_scores
from .registry import Registry, check_arity

TokenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PositionalFn = Callable[[int, int], Sequence[float]]
#: (model, forward inputs per batch, kinds to score) -> {"rows": {kind: scores}, "num_tokens": ..., "cost": ...}
ModelFn = Callable[[Any, Sequence[dict[str, torch.Tensor]], Sequence[str]], dict[str, Any]]


@dataclass(frozen=True)
class ImportanceMetric:
    """One metric; exactly one of `token`, `positional` and `model` is set."""

    name: str
    token: TokenFn | None = None
    positional: PositionalFn | None = None
    model: ModelFn | None = None
    #: False: attention and MLP are scored on their own input/output instead of the residual stream
    residual: bool = True
    #: the score as a function of cos(x, y): lets the three scores of a layer share their norms (faster)
    from_cosine: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if sum(fn is not None for fn in (self.token, self.positional, self.model)) != 1:
            raise UserError(f"metric '{self.name}': give exactly one of a token, a positional and a model function")
        check_arity(self.token or self.positional or self.model, 3 if self.model else 2, f"metric '{self.name}'")


def _make(name: str, value: Any) -> ImportanceMetric:
    if isinstance(value, ImportanceMetric):
        return value
    return ImportanceMetric(name, token=value)


METRIC_REGISTRY: Registry[ImportanceMetric] = Registry("metric", _make)


def register_metric(name: str, fn: TokenFn | PositionalFn | ImportanceMetric, *, positional: bool = False,
                    residual: bool = True) -> ImportanceMetric:
    """Make `fn` a metric under `name` (`--metric name` / `metric: name` in the same process).

    `fn(x, y)` returns per-token scores of shape `x.shape[:-1]`; with `positional=True` it is
    `fn(num_layers, seed)` and returns one score per layer; an `ImportanceMetric` is registered as it is.
    """
    if isinstance(fn, ImportanceMetric):
        metric = replace(fn, name=name)
    else:
        metric = ImportanceMetric(name, positional=fn) if positional else \
            ImportanceMetric(name, token=fn, residual=residual)
    return METRIC_REGISTRY.register(name, metric)


def resolve_metric(metric: str | TokenFn | ImportanceMetric) -> ImportanceMetric:
    """A registered name, an `ImportanceMetric`, a token callable or an importable name of either."""
    return METRIC_REGISTRY.resolve(metric)


def token_scores(metric: str | TokenFn | ImportanceMetric, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token score of a module mapping x -> y (last dim is hidden). Lower = more redundant."""
    m = resolve_metric(metric)
    if m.token is None:
        raise UserError(f"metric '{m.name}' has no per-token form")
    scores = m.token(x.float(), y.float())
    if not isinstance(scores, torch.Tensor) or scores.shape != x.shape[:-1]:
        raise UserError(f"metric '{m.name}' must return one score per token (shape {tuple(x.shape[:-1])}), "
                        f"got {getattr(scores, 'shape', type(scores).__name__)}")
    return scores


def positional_scores(metric: ImportanceMetric, num_layers: int, seed: int) -> list[float]:
    """A positional metric's scores, checked to be one number per layer."""
    assert metric.positional is not None
    scores = [float(s) for s in metric.positional(num_layers, seed)]
    if len(scores) != num_layers:
        raise UserError(f"metric '{metric.name}' gave {len(scores)} scores for {num_layers} layers")
    return scores


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(x, y, dim=-1)


def _angular_of(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _angular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _angular_of(F.cosine_similarity(x, y, dim=-1))


def _relative_magnitude(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ShortGPT: ||f(x)|| / ||x + f(x)||."""
    return (y - x).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)


def _reverse(num_layers: int, seed: int) -> list[float]:
    """Deepest first: the last layer gets the lowest score."""
    return [float(num_layers - 1 - i) for i in range(num_layers)]


def _random(num_layers: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_layers, generator=g, dtype=torch.float64).tolist()


for _metric in (
    ImportanceMetric("cosine", token=_cosine, from_cosine=lambda cos: 1.0 - cos),
    ImportanceMetric("cosine_no_residual", token=_cosine, residual=False),
    ImportanceMetric("angular", token=_angular, from_cosine=_angular_of),
    ImportanceMetric("relative_magnitude", token=_relative_magnitude),
    ImportanceMetric("reverse", positional=_reverse),
    ImportanceMetric("random", positional=_random),
    ImportanceMetric("loss", model=loss_scores),
):
    METRIC_REGISTRY.register(_metric.name, _metric)
assert METRIC_REGISTRY.names() == METRICS, "options.METRICS lists the shipped metrics for the command line"
