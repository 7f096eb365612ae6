"""The `loss` metric: a module's score is how much the calibration LM loss rises when that module alone is
dropped (SLEB's greedy over blocks, BlockPruner's over sublayers when re-scored after every drop).

Every candidate is evaluated on the model itself, with stand-ins swapped in for it and out again
(`standins_swapped`): no copy of the model. Candidates share the hidden states before their layer, so each
batch runs the model once capturing every layer's output, and a candidate at layer i then runs only layers
i..n-1 (and the final norm, the LM head and the loss): layers before it replay their captured outputs.
Attention masks, position embeddings and anything else a family passes its layers are made by the family's
own forward, exactly as in a full pass. On average a round costs about half of one full forward per
candidate (plus one LM head per candidate); `reuse_prefix=False` runs the full forward instead (the
benchmark's reference).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.architectures import get_spec
from ..core.modeling_dropped import dropped_layers, replace_sublayers
from ..errors import UserError

KINDS = ("attn", "mlp", "block")


@contextmanager
def standins_swapped(model: nn.Module, index: int, attn: bool, mlp: bool) -> Iterator[None]:
    """Layer `index` of `model` with its attention and/or MLP replaced by stand-ins while inside, its own
    modules back afterwards: scoring a drop by running the model without it needs no copy of the model."""
    spec = get_spec(model)
    layer = spec.get_layers(model)[index]
    # every module either sublayer may replace, under the names this layer has (a hybrid's mixer, Falcon's
    # optional norms, a parallel layer's shared norm, which goes once both sublayers are stand-ins)
    saved = {name: getattr(layer, name) for name in (*spec.attn_modules(layer), *spec.mlp_modules(layer))}
    replace_sublayers(layer, spec, attn, mlp, index, spec.inputs == "text" and spec.is_parallel(model.config))
    try:
        yield
    finally:
        for name, module in saved.items():
            setattr(layer, name, module)


def require_lm_head(model: nn.Module, what: str = "metric 'loss'") -> None:
    """Refuse, before any pass, a model whose language-modelling loss cannot be computed."""
    spec = get_spec(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if spec.inputs != "text" or head is None:
        raise UserError(f"{what} needs a causal language model with an LM head: {type(model).__name__} has none "
                        "(use a hidden-state metric such as cosine)")


def token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(float64 sum of next-token cross-entropies, number of predicted tokens) over real tokens only."""
    labels = input_ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none")
    if mask is None:
        return losses.sum(dtype=torch.float64), losses.numel()
    real = (mask[:, 1:].bool() & mask[:, :-1].bool()).flatten()
    return torch.where(real, losses, 0.0).sum(dtype=torch.float64), int(real.sum())


@contextmanager
def _replayed(layers: Sequence[nn.Module], outputs: Sequence[Any]) -> Iterator[None]:
    """Layers that return their captured outputs instead of computing them (the shared prefix)."""
    try:
        for layer, out in zip(layers, outputs):
            layer.forward = lambda *args, _out=out, **kwargs: _out
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def loss_candidates(model: nn.Module, kinds: Sequence[str]) -> list[tuple[str, int, bool, bool]]:
    """(kind, layer, swap attention, swap MLP) for every module still in the model."""
    gone_attn, gone_mlp = (set(x) for x in dropped_layers(model))
    out = []
    for kind in kinds:
        for i in range(len(get_spec(model).get_layers(model))):
            attn = kind in ("attn", "block") and i not in gone_attn
            mlp = kind in ("mlp", "block") and i not in gone_mlp
            if (kind == "attn" and attn) or (kind == "mlp" and mlp) or (kind == "block" and (attn or mlp)):
                out.append((kind, i, attn, mlp))
    return out


def _check_kinds(model: nn.Module, kinds: Sequence[str]) -> None:
    require_lm_head(model)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")


def _result(model: nn.Module, todo: list[tuple[str, int, bool, bool]], totals: list[float], base: float,
            count: int, cost: dict[str, Any]) -> dict[str, Any]:
    """`loss_scores`'s answer from the summed losses: each candidate's rise of the mean loss."""
    if count == 0:
        raise UserError("metric 'loss' needs calibration text: the batches held no token to predict")
    n = len(get_spec(model).get_layers(model))
    rows: dict[str, list[float | None]] = {kind: [None] * n for kind in KINDS}
    for (kind, i, _, _), total in zip(todo, totals):
        rows[kind][i] = (total - base) / count
    dropped = dict(zip(("attn", "mlp"), dropped_layers(model)))
    return {"rows": rows, "base_loss": base / count, "num_tokens": count, "dropped": dropped, "cost": cost}


@torch.no_grad()
def loss_scores(model: nn.Module, inputs: Iterable[dict[str, torch.Tensor]], kinds: Sequence[str] = KINDS,
                reuse_prefix: bool = True) -> dict[str, Any]:
    """Per kind, the rise of the mean calibration loss when each module alone is dropped (None: already gone).

    `inputs` are forward keyword arguments (`input_ids`, optionally `attention_mask`). Returns the rows, the
    base loss, the number of predicted tokens and the cost: `forward_passes` counts layer forwards as a
    fraction of full passes over the calibration text, `head_passes` the LM head passes, `seconds` the time.
    """
    _check_kinds(model, kinds)
    start = time.perf_counter()
    layers = get_spec(model).get_layers(model)
    n, todo = len(layers), loss_candidates(model, kinds)
    base, totals, count, layer_runs, heads, batches = 0.0, [0.0] * len(todo), 0, 0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in inputs:
            outputs: list[Any] = [None] * n
            with ExitStack() as stack:
                for i, layer in enumerate(layers):
                    handle = layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
                    stack.callback(handle.remove)
                logits = model(**batch, use_cache=False).logits
            total, tokens = token_loss_sum(logits, batch["input_ids"], batch.get("attention_mask"))
            base, count, layer_runs, heads = base + float(total), count + tokens, layer_runs + n, heads + 1
            batches += 1
            for c, (kind, i, attn, mlp) in enumerate(todo):
                first = i if reuse_prefix else 0
                with standins_swapped(model, i, attn, mlp), _replayed(layers[:first], outputs[:first]):
                    logits = model(**batch, use_cache=False).logits
                totals[c] += float(token_loss_sum(logits, batch["input_ids"], batch.get("attention_mask"))[0])
                layer_runs += n - first - (kind == "block")
                heads += 1
    finally:
        model.train(was_training)
    cost = {"forward_passes": layer_runs / n / max(batches, 1), "head_passes": heads / max(batches, 1),
            "candidates": len(todo), "seconds": time.perf_counter() - start}
    return _result(model, todo, totals, base, count, cost)


class StreamedModel(Protocol):
    """What `streamed_loss_scores` needs of a model that is never built (`streaming.LayerStream`)."""

    model: nn.Module  # on the meta device: its layers hold weights only while `sweep` runs them
    batches: list[dict[str, torch.Tensor]]
    store: Any  # the base hidden states, one per batch (`items`)
    layer_loads: int

    def new_store(self) -> Any: ...
    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def start(self) -> list[int]: ...
    def sweep(self, each: Callable[..., None] | None = None, on_layer: Callable[[int, nn.Module], None] | None = None,
              progress: bool = False) -> None: ...
    def head(self) -> AbstractContextManager[Callable[[int, torch.Tensor], torch.Tensor]]: ...


@torch.no_grad()
def streamed_loss_scores(stream: StreamedModel, kinds: Sequence[str] = KINDS,
                         on_layer: Callable[[int, nn.Module], None] | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """`loss_scores` with one decoder layer in memory at a time, in one sweep over the layers.

    Layer j is read once and runs the base hidden states and, for every candidate that has reached it, that
    candidate's own: a candidate at layer i starts from the base input of layer i, run with its stand-ins
    swapped in (`standins_swapped`), and follows the unchanged layers after it. The final norm and LM head
    are then read once and give every state's loss. Same layer forwards as `loss_scores` (which reuses the
    prefix the same way), one read of each layer per round; memory holds one copy of the calibration hidden
    states per candidate, plus the base's.
    """
    model = stream.model
    _check_kinds(model, kinds)
    start = time.perf_counter()
    n, todo = len(get_spec(model).get_layers(model)), loss_candidates(model, kinds)
    stream.start()
    states: list[Any] = [None] * len(todo)
    starting = {i: [c for c, t in enumerate(todo) if t[1] == i] for i in range(n)}

    def each(j: int, layer: nn.Module, b: int, hidden: torch.Tensor, run: Callable) -> None:
        for c, state in enumerate(states):  # candidates past their own layer run this one unchanged
            if state is not None and todo[c][1] < j:
                state.set(b, run(state.items[b].to(hidden.device)))
        for c in starting[j]:
            _, _, attn, mlp = todo[c]
            with standins_swapped(model, j, attn, mlp):
                out = run(hidden)
            if states[c] is None:
                states[c] = stream.new_store()
            states[c].add(out.clone())  # a layer of two stand-ins may hand back `hidden` itself

    stream.sweep(each, on_layer, progress)
    base, totals, count = 0.0, [0.0] * len(todo), 0
    with stream.head() as logits_of:
        for b in range(len(stream.batches)):
            ids, mask = stream.batch(b)
            total, tokens = token_loss_sum(logits_of(b, stream.store.items[b]), ids, mask)
            base, count = base + float(total), count + tokens
            for c, state in enumerate(states):
                totals[c] += float(token_loss_sum(logits_of(b, state.items[b]), ids, mask)[0])
    layer_runs = n + sum(n - i - (kind == "block") for kind, i, _, _ in todo)
    stored = sum(s.nbytes() for s in (stream.store, *states) if s is not None)
    cost = {"forward_passes": layer_runs / n, "head_passes": 1 + len(todo), "candidates": len(todo),
            "hidden_bytes": stored, "seconds": time.perf_counter() - start}
    return _result(model, todo, totals, base, count, cost)
