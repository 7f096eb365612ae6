"""Module importance from one calibration pass: blocks, attention and MLP sublayers together.

For every decoder layer three residual-stream states are captured with hooks: X (layer input), h (the
input of `spec.mlp_entry`, i.e. after the attention residual) and Y (layer output). Attention is scored
on (X, h), the MLP on (h, Y) and the block on (X, Y). Per-token scores are reduced immediately over
real tokens only, into torchmetrics states (float64), so DDP ranks end with identical scores.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric

from .architectures import ArchSpec, get_spec
from .errors import UserError
from .modeling_dropped import dropped_layers
from .options import METRICS

KINDS = ("attn", "mlp", "block")


def token_scores(metric: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token score of a module mapping x -> y (last dim is hidden). Lower = more redundant."""
    x, y = x.float(), y.float()
    if metric in ("cosine", "cosine_no_residual"):
        return 1.0 - F.cosine_similarity(x, y, dim=-1)
    if metric == "angular":
        return torch.arccos(F.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0)) / math.pi
    if metric == "relative_magnitude":  # ShortGPT: ||f(x)|| / ||x + f(x)||
        return (y - x).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)
    raise UserError(f"metric '{metric}' has no per-token form; choose from {', '.join(METRICS)}")


class LayerScoreMean(Metric):
    """Token-weighted mean score per layer; sums and counts reduce by `sum` across processes."""

    full_state_update = False

    def __init__(self, num_layers: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, layer: int, total: torch.Tensor, count: float) -> None:  # type: ignore[override]
        """Add a (float64) sum of per-token scores over `count` real tokens."""
        self.total[layer] += total.to(self.total.device, torch.float64)
        self.count[layer] += count

    def compute(self) -> torch.Tensor:
        return self.total / self.count


@dataclass
class ImportanceScores:
    """Scores per layer for each kind; `None` marks a module that is already dropped."""

    metric: str
    attn: list[float | None]
    mlp: list[float | None]
    block: list[float | None]
    num_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImportanceScores":
        """Back from `to_dict` (caches and reports; keys it does not know, such as timings, are ignored)."""
        return cls(data["metric"], data["attn"], data["mlp"], data["block"], data.get("num_tokens", 0),
                   dict(data.get("extra") or {}))

    def row(self, kind: str) -> list[float | None]:
        if kind not in KINDS:
            raise UserError(f"unknown kind '{kind}'; choose from {', '.join(KINDS)}")
        return getattr(self, kind)


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class ImportanceAccumulator:
    """Installs scoring hooks on a model while active (`with acc.hooks(): model(...)`)."""

    def __init__(self, model: nn.Module, metric: str = "cosine", spec: ArchSpec | None = None) -> None:
        if metric not in METRICS:
            raise UserError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
        self.model = model
        self.metric = metric
        self.spec = spec or get_spec(model)
        self.layers = self.spec.get_layers(model)
        n = len(self.layers)
        self.metrics = nn.ModuleDict({k: LayerScoreMean(n) for k in KINDS})
        # Real tokens seen, summed over processes like the scores (a rank may have seen none).
        self.tokens = SumMetric()
        self.set_mask(None)
        self.num_tokens = 0

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Real-token mask of the next batch (None = every token is real)."""
        self.mask = mask.bool() if mask is not None else None
        self._mask_count = float(mask.sum()) if mask is not None else None

    def count_tokens(self, num: int) -> None:
        """Record `num` real tokens of the batch being scored (local count and the synced total)."""
        self.num_tokens += num
        self.tokens.update(float(num))

    def to(self, device: torch.device) -> "ImportanceAccumulator":
        """Keep the metric states on the model's device (DDP syncs them there)."""
        self.metrics.to(device)
        self.tokens.to(device)
        return self

    def _accumulate(self, kind: str, layer: int, scores: torch.Tensor) -> None:
        # A masked sum instead of boolean indexing: no gather, one reduction. `where`, not a product, so
        # that NaN/inf at padding positions (e.g. all-zero pad embeddings) cannot leak into the sum.
        if self.mask is None:
            total, count = scores.sum(dtype=torch.float64), float(scores.numel())
        else:
            total, count = torch.where(self.mask, scores, 0.0).sum(dtype=torch.float64), self._mask_count
        self.metrics[kind].update(layer, total, count)

    def _reduce(self, kind: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self._accumulate(kind, layer, token_scores(self.metric, x, y))

    def _reduce_layer(self, layer: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
        """All three scores of one layer; cosine-based metrics share the three norms (the costly part)."""
        if self.metric not in ("cosine", "angular"):
            for kind, (a, b) in (("attn", (x, h)), ("mlp", (h, y)), ("block", (x, y))):
                self._reduce(kind, layer, a, b)
            return
        x, h, y = x.float(), h.float(), y.float()
        nx, nh, ny = (torch.linalg.vector_norm(t, dim=-1) for t in (x, h, y))
        for kind, (a, b, na, nb) in (("attn", (x, h, nx, nh)), ("mlp", (h, y, nh, ny)), ("block", (x, y, nx, ny))):
            cos = torch.linalg.vecdot(a, b) / (na * nb).clamp_min(1e-8)
            scores = 1.0 - cos if self.metric == "cosine" else torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
            self._accumulate(kind, layer, scores)

    @contextmanager
    def hooks(self) -> Iterator["ImportanceAccumulator"]:
        spec, handles = self.spec, []
        state: dict[int, dict[str, torch.Tensor]] = {}

        def layer_pre(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state[i] = {"x": _hidden_arg(args, kwargs)}
            return fn

        def entry_pre(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state[i]["h"] = _hidden_arg(args, kwargs)
            return fn

        def layer_post(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                s = state.pop(i)
                y = _hidden(output)
                if self.metric == "cosine_no_residual":
                    self._reduce("block", i, s["x"], y - s["x"])
                    return
                self._reduce_layer(i, s["x"], s["h"], y)
            return fn

        def sub_pre(i: int, kind: str) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state.setdefault(i, {})[f"{kind}_in"] = _hidden_arg(args, kwargs)
            return fn

        def sub_post(i: int, kind: str) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                x = state[i].pop(f"{kind}_in")
                out = _hidden(output)
                if out.dim() == 0:  # a dropped stand-in: nothing to score
                    return
                self._reduce(kind, i, x, out)
            return fn

        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
                if self.metric == "cosine_no_residual":
                    for kind, name in (("attn", spec.attn), ("mlp", spec.mlp)):
                        sub = getattr(layer, name)
                        handles.append(sub.register_forward_pre_hook(sub_pre(i, kind), with_kwargs=True))
                        handles.append(sub.register_forward_hook(sub_post(i, kind), with_kwargs=True))
                else:
                    entry = getattr(layer, spec.mlp_entry)
                    handles.append(entry.register_forward_pre_hook(entry_pre(i), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def scores(self) -> ImportanceScores:
        """Synchronized (DDP) per-layer means; dropped modules become None; NaN is refused."""
        attn_dropped, mlp_dropped = dropped_layers(self.model) if _has_drops(self.model) else ([], [])
        # compute() is the DDP sync point: every rank calls it, whatever it saw locally (0/0 -> NaN).
        with warnings.catch_warnings():  # a rank (or a call) with no batch at all is legitimate here
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            rows: dict[str, list[float | None]] = {kind: self.metrics[kind].compute().tolist() for kind in KINDS}
            num_tokens = int(self.tokens.compute().item())
        if num_tokens == 0:
            raise UserError("no calibration data: the batches held no real tokens")
        gone = {"attn": set(attn_dropped), "mlp": set(mlp_dropped),
                "block": set(attn_dropped) & set(mlp_dropped)}
        for kind in KINDS:
            rows[kind] = [None if i in gone[kind] else v for i, v in enumerate(rows[kind])]
            bad = [i for i, v in enumerate(rows[kind]) if v is not None and not math.isfinite(v)]
            if bad:
                raise UserError(
                    f"non-finite {kind} importance scores for layers {bad}: the model produced NaN/inf hidden "
                    "states (try float32) or the calibration data had no real tokens"
                )
        return ImportanceScores(self.metric, rows["attn"], rows["mlp"], rows["block"], num_tokens)


def _has_drops(model: nn.Module) -> bool:
    try:
        attn, mlp = dropped_layers(model)
    except (ValueError, AttributeError):
        return False
    return bool(attn or mlp)


def _as_batch(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if "input_ids" not in batch:
        raise UserError("calibration batches need 'input_ids'")
    out = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"].to(device)
    return out


def _positional_scores(metric: str, n: int, seed: int) -> list[float]:
    if metric == "reverse":  # deepest first: the last layer gets the lowest score
        return [float(n - 1 - i) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64).tolist()


def _decoder(model: nn.Module) -> nn.Module:
    """The model without its LM head: scores need hidden states, not logits."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else model


@torch.no_grad()
def compute_importance(model: nn.Module, batches: Iterable[Any], metric: str = "cosine", seed: int = 0,
                       progress: bool = False) -> ImportanceScores:
    """Score every block, attention and MLP sublayer of `model` over `batches` in one pass."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    spec = get_spec(model)
    n = len(spec.get_layers(model))
    if metric in ("reverse", "random"):
        rows = {k: _positional_scores(metric, n, seed + j) for j, k in enumerate(KINDS)}
        scores = ImportanceScores(metric, rows["attn"], rows["mlp"], rows["block"], 0)
        attn_d, mlp_d = dropped_layers(model) if _has_drops(model) else ([], [])
        scores.attn = [None if i in attn_d else v for i, v in enumerate(scores.attn)]
        scores.mlp = [None if i in mlp_d else v for i, v in enumerate(scores.mlp)]
        scores.block = [None if (i in attn_d and i in mlp_d) else v for i, v in enumerate(scores.block)]
        return scores
    acc = ImportanceAccumulator(model, metric, spec)
    device = next(model.parameters()).device
    acc.to(device)
    was_training = model.training
    model.eval()
    runner = _decoder(model)
    batches = list(batches) if progress else batches
    iterator: Iterable[Any] = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibration", unit="batch")
    try:
        with acc.hooks():
            for batch in iterator:
                inputs = _as_batch(batch, device)
                mask = inputs.get("attention_mask")
                acc.set_mask(mask)
                acc.count_tokens(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
                runner(**inputs, use_cache=False)
    finally:
        model.train(was_training)
    # No early exit for a rank that saw no batch: scores() syncs, and the other ranks wait for it there.
    return acc.scores()
