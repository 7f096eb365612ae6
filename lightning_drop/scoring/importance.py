"""Module importance from one calibration pass: blocks, attention and MLP sublayers together, any family.

For every layer three residual-stream states are captured with hooks: X (layer input), h (the input of
`spec.mlp_entry`, i.e. after the attention residual) and Y (layer output). Attention is scored on (X, h),
the MLP on (h, Y) and the block on (X, Y). In a parallel-residual layer both sublayers read X: each is scored
on (X, X + its output), the block on (X, Y). A layer of one sublayer (Nemotron-H) scores it, and the block, on
(X, Y); the sublayer it lacks is None, like a dropped one. Per-token scores are reduced immediately over real
tokens only, into torchmetrics states (float64) read through `compute()`, so DDP ranks end with identical
scores. Text and image batches become one forward pass through `forward_pass.model_inputs` and `run_forward`.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric

from ..core.architectures import MIXER_KINDS, ArchSpec, get_spec
from ..errors import UserError
from ..core.modeling_dropped import dropped_layers
from ..core.standins import is_standin
from .forward_pass import hidden_of, model_inputs, run_forward
from .metrics import ImportanceMetric, positional_scores, resolve_metric, token_scores

KINDS = ("attn", "mlp", "block")


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


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class ImportanceAccumulator:
    """Installs scoring hooks on a model of any family while active (`with acc.hooks(): model(...)`).

    For every layer three residual-stream states are captured: X (layer input), h (the input of
    `spec.mlp_entry`, after the attention residual, LayerScale and post-norm included) and Y (layer output).
    Attention is scored on (X, h), the MLP on (h, Y) and the block on (X, Y). "Without residual"
    (`cosine_no_residual`): X = input of `spec.attn_in`/`spec.mlp_in`, Y = output of `spec.attn_out`/
    `spec.mlp_out` (the sublayer's own contribution). Token counts are given by the caller (`count_tokens`)
    or, after `count_next_forward()`, taken from the first layer's input (images: every patch token).
    """

    def __init__(self, model: nn.Module, metric: str | ImportanceMetric | Callable = "cosine",
                 spec: ArchSpec | None = None, span: int | None = None) -> None:
        self.measure = resolve_metric(metric)
        if self.measure.token is None:
            raise UserError(f"metric '{self.measure.name}' does not score hidden states: it needs no hooks")
        #: blocks per span: the block row then scores the span starting at each layer (input of its first
        #: block against output of its last), and attention and MLP are not scored
        self.span = span
        self.model = model
        self.metric = self.measure.name
        self.spec = spec or get_spec(model)
        self.layers = self.spec.get_layers(model)
        n = len(self.layers)
        self.metrics = nn.ModuleDict({k: LayerScoreMean(n) for k in KINDS})
        self._span_inputs: dict[int, torch.Tensor] = {}
        # Real tokens seen, summed over processes like the scores (a rank may have seen none).
        self.tokens = SumMetric()
        self.set_mask(None)
        self.num_tokens = 0
        self._count_pending = False

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Real-token mask of the next batch (None = every token is real)."""
        self.mask = mask.bool() if mask is not None else None
        self._mask_count = float(mask.sum()) if mask is not None else None

    def count_tokens(self, num: int) -> None:
        """Record `num` real tokens of the batch being scored (local count and the synced total)."""
        self.num_tokens += num
        self.tokens.update(float(num))

    def count_next_forward(self) -> None:
        """Count the next forward's tokens at the first layer's input (their number is known only there)."""
        self._count_pending = True

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
        if y.dim() == 0:  # a dropped stand-in contributes nothing: no score
            return
        self._accumulate(kind, layer, token_scores(self.measure, x, y.expand_as(x) if y.shape != x.shape else y))

    def _reduce_layer(self, layer: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
        """All three scores of one layer; cosine-based metrics share the three norms (the costly part)."""
        from_cosine = self.measure.from_cosine
        if from_cosine is None:
            for kind, (a, b) in (("attn", (x, h)), ("mlp", (h, y)), ("block", (x, y))):
                self._reduce(kind, layer, a, b)
            return
        x, h, y = x.float(), h.float(), y.float()
        nx, nh, ny = (torch.linalg.vector_norm(t, dim=-1) for t in (x, h, y))
        for kind, (a, b, na, nb) in (("attn", (x, h, nx, nh)), ("mlp", (h, y, nh, ny)), ("block", (x, y, nx, ny))):
            cos = torch.linalg.vecdot(a, b) / (na * nb).clamp_min(1e-8)
            self._accumulate(kind, layer, from_cosine(cos))

    def _sublayer_ends(self, layer: nn.Module, kind: str) -> tuple[nn.Module, nn.Module] | None:
        """(module whose input is the sublayer's input, module whose output is its contribution), or None
        for a dropped sublayer (nothing to score). A hybrid layer's mixer stands where `attn` would."""
        spec = self.spec
        slot, src, dst = (spec.attn, spec.attn_in, spec.attn_out) if kind == "attn" else (spec.mlp, spec.mlp_in, spec.mlp_out)
        if kind == "attn":
            slot, (src, dst) = spec.mixer_name(layer), spec.mixer_ends(layer)
        if not spec.holds(layer, kind) or is_standin(getattr(layer, slot)):
            return None
        return (layer if not src else layer.get_submodule(src)), layer.get_submodule(dst)  # Bloom's `mlp.dense_4h_to_h`

    @contextmanager
    def hooks(self) -> Iterator["ImportanceAccumulator"]:
        spec, handles = self.spec, []
        state: dict[int, dict[str, torch.Tensor]] = {}
        parallel = spec.inputs == "text" and spec.is_parallel(self.model.config)
        # a single-sublayer layer's one sublayer runs from X to Y: h is X before an MLP, Y after a token mixer
        roles = [spec.layer_kind(layer) for layer in self.layers]

        def layer_pre(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                x = _hidden_arg(args, kwargs)
                state[i] = {"x": x}
                if self.span:
                    self._span_inputs[i] = x
                if i == 0 and self._count_pending:
                    self._count_pending = False
                    self.count_tokens(int(self._mask_count) if self.mask is not None else x.shape[:-1].numel())
            return fn

        def pre(i: int, key: str) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
                state.setdefault(i, {})[key] = _hidden_arg(args, kwargs)
            return fn

        def layer_post(i: int) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                s = state.pop(i)
                y = hidden_of(output)
                if self.span:
                    start = self._span_inputs.pop(i - self.span + 1, None)
                    if start is not None:
                        self._reduce("block", i - self.span + 1, start, y)
                    return
                if not self.measure.residual:
                    self._reduce("block", i, s["x"], y - s["x"])
                    return
                if parallel:  # both sublayers read X: each on (X, X + its output); a stand-in's 0-d zero is skipped
                    for kind in ("attn", "mlp"):
                        if s[kind].dim():
                            self._reduce(kind, i, s["x"], s["x"] + s[kind])
                    self._reduce("block", i, s["x"], y)
                    return
                h = s["h"] if roles[i] is None else s["x"] if roles[i] == "mlp" else y
                self._reduce_layer(i, s["x"], h, y)
            return fn

        def out(i: int, key: str) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                state.setdefault(i, {})[key] = hidden_of(output).clone()  # Falcon adds into its MLP output in place
            return fn

        def sub_post(i: int, kind: str) -> Callable:
            def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                x = state[i].pop(f"{kind}_in", None)
                if x is not None:
                    self._reduce(kind, i, x, hidden_of(output))
            return fn

        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
                if not self.measure.residual:
                    for kind in ("attn", "mlp"):
                        ends = self._sublayer_ends(layer, kind)
                        if ends is None:
                            continue
                        handles.append(ends[0].register_forward_pre_hook(pre(i, f"{kind}_in"), with_kwargs=True))
                        handles.append(ends[1].register_forward_hook(sub_post(i, kind), with_kwargs=True))
                elif self.span:
                    continue  # a span's score needs only the layers' inputs and outputs
                elif parallel:
                    for kind, name in (("attn", spec.mixer_name(layer)), ("mlp", spec.mlp)):
                        handles.append(getattr(layer, name).register_forward_hook(out(i, kind), with_kwargs=True))
                elif roles[i] is None:
                    entry = getattr(layer, spec.mlp_entry)
                    handles.append(entry.register_forward_pre_hook(pre(i, "h"), with_kwargs=True))
            yield self
        finally:
            self._count_pending = False
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
        extra = _extra(self.spec, self.model)
        if self.span:  # a span may not start too late or hold a block that is already gone
            n, blocks = len(self.layers), gone["block"]
            gone = {"attn": set(range(n)), "mlp": set(range(n)),
                    "block": {i for i in range(n) if i + self.span > n or blocks & set(range(i, i + self.span))}}
            extra.update(span=self.span, dropped={"attn": sorted(attn_dropped), "mlp": sorted(mlp_dropped)})
        for kind in KINDS:
            rows[kind] = [None if i in gone[kind] else v for i, v in enumerate(rows[kind])]
            bad = [i for i, v in enumerate(rows[kind]) if v is not None and not math.isfinite(v)]
            if bad:
                raise UserError(
                    f"non-finite {kind} importance scores for layers {bad}: the model produced NaN/inf hidden "
                    "states (try float32) or the calibration data had no real tokens"
                )
        return ImportanceScores(self.metric, rows["attn"], rows["mlp"], rows["block"], num_tokens, extra=extra)


def _extra(spec: ArchSpec, model: nn.Module) -> dict[str, Any]:
    """Block names of staged families (flat index -> "stage.block"), so reports can show both; each layer's
    token-mixer kind where a model has any other than full attention (hybrids, sliding windows)."""
    extra: dict[str, Any] = {"block_names": spec.block_names(model)} if spec.staged else {}
    if spec.inputs == "text":
        kinds = spec.mixer_kinds(model)
        if set(kinds) != {"full_attention"}:
            extra["mixer_kinds"] = kinds
    return extra


def importance_by_kind(scores: ImportanceScores | Mapping[str, Any],
                       drop_attn: Sequence[int] = ()) -> dict[str, dict[str, Any]]:
    """Token-mixer importance per mixer kind, from each layer's kind (`extra["mixer_kinds"]`): the layers of each
    kind, the mean and the lowest attention-row score of those still there (None once all are gone), and which
    of `drop_attn` are of that kind. Empty where the scores name no kinds (every layer full attention); a layer
    that mixes no tokens (a single-sublayer MLP layer) is of no mixer kind."""
    data = scores.to_dict() if isinstance(scores, ImportanceScores) else scores
    kinds = (data.get("extra") or {}).get("mixer_kinds") or []
    out: dict[str, dict[str, Any]] = {}
    for kind in (k for k in dict.fromkeys(kinds) if k in MIXER_KINDS):
        layers = [i for i, k in enumerate(kinds) if k == kind]
        values = [data["attn"][i] for i in layers if data["attn"][i] is not None]
        out[kind] = {"layers": layers, "mean": sum(values) / len(values) if values else None,
                     "min": min(values, default=None), "dropped": [i for i in drop_attn if kinds[i] == kind]}
    return out


def model_metric_scores(measure: ImportanceMetric, model: nn.Module, out: dict[str, Any]) -> ImportanceScores:
    """The scores a model metric returned (`rows`, `num_tokens`, anything else kept as extra), with the block
    names and token-mixer kinds every score carries; in memory and streamed alike."""
    rows = out["rows"]
    extra = {**_extra(get_spec(model), model), **{k: v for k, v in out.items() if k not in ("rows", "num_tokens")}}
    return ImportanceScores(measure.name, rows["attn"], rows["mlp"], rows["block"], out["num_tokens"], extra)


def _has_drops(model: nn.Module) -> bool:
    try:
        attn, mlp = dropped_layers(model)
    except (ValueError, AttributeError):
        return False
    return bool(attn or mlp)


def _feed(acc: ImportanceAccumulator, spec: ArchSpec, inputs: dict[str, torch.Tensor]) -> None:
    """Tell the accumulator which tokens of the next forward are real, and how many there are."""
    mask = inputs.get("attention_mask")
    acc.set_mask(mask)
    if "input_ids" in inputs:
        acc.count_tokens(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
    else:
        acc.count_next_forward()


@torch.no_grad()
def compute_importance(model: nn.Module, batches: Iterable[Any], metric: str | ImportanceMetric | Callable = "cosine",
                       seed: int = 0, progress: bool = False, kinds: Sequence[str] = KINDS,
                       span: int | None = None) -> ImportanceScores:
    """Score every block, attention and MLP sublayer of `model` (any family) over `batches` in one pass.

    Text batches: ids or dicts with `input_ids` / `attention_mask` (padding is not scored); image batches:
    pixel tensors, (images, labels) or dicts with `pixel_values` (every token counts: CLS, registers, patches).
    `kinds` are the rows the caller will rank: a model metric (`loss`), whose cost grows with the candidates,
    scores only those (the other rows are None). `span`: the block row scores spans of that many blocks.
    """
    measure = resolve_metric(metric)
    spec = get_spec(model)
    n = len(spec.get_layers(model))
    if measure.positional is not None:
        rows = {k: positional_scores(measure, n, seed + j) for j, k in enumerate(KINDS)}
        attn_d, mlp_d = dropped_layers(model) if _has_drops(model) else ([], [])
        gone = {"attn": set(attn_d), "mlp": set(mlp_d), "block": set(attn_d) & set(mlp_d)}
        return ImportanceScores(measure.name, *[[None if i in gone[k] else v for i, v in enumerate(rows[k])] for k in KINDS],
                                num_tokens=0, extra=_extra(spec, model))
    device = next(model.parameters()).device
    batches = list(batches) if progress else batches
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(batches, desc="calibration", unit="batch")
    iterator: Iterable[Any] = batches if bar is None else bar
    if measure.model is not None:
        try:
            out = measure.model(model, (model_inputs(spec, batch, device) for batch in iterator), tuple(kinds))
        finally:
            if bar is not None:
                bar.close()
        return model_metric_scores(measure, model, out)
    acc = ImportanceAccumulator(model, measure, spec, span=span)
    acc.to(device)
    was_training = model.training
    model.eval()
    try:
        with acc.hooks():
            for batch in iterator:
                inputs = model_inputs(spec, batch, device)
                _feed(acc, spec, inputs)
                run_forward(spec, model, inputs)
    finally:
        model.train(was_training)
        if bar is not None:  # an interrupted loop keeps its bar open (its line unfinished) until the frame dies
            bar.close()
    # No early exit for a rank that saw no batch: scores() syncs, and the other ranks wait for it there.
    return acc.scores()
