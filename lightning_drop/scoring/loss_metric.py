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
from contextlib import ExitStack, contextmanager
from typing import Any, Iterable, Iterator, Sequence

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


def _candidates(model: nn.Module, kinds: Sequence[str]) -> list[tuple[str, int, bool, bool]]:
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


@torch.no_grad()
def loss_scores(model: nn.Module, inputs: Iterable[dict[str, torch.Tensor]], kinds: Sequence[str] = KINDS,
                reuse_prefix: bool = True) -> dict[str, Any]:
    """Per kind, the rise of the mean calibration loss when each module alone is dropped (None: already gone).

    `inputs` are forward keyword arguments (`input_ids`, optionally `attention_mask`). Returns the rows, the
    base loss, the number of predicted tokens and the cost: `forward_passes` counts layer forwards as a
    fraction of full passes over the calibration text, `head_passes` the LM head passes, `seconds` the time.
    """
    require_lm_head(model)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    start = time.perf_counter()
    layers = get_spec(model).get_layers(model)
    n, todo = len(layers), _candidates(model, kinds)
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
    if count == 0:
        raise UserError("metric 'loss' needs calibration text: the batches held no token to predict")
    rows: dict[str, list[float | None]] = {kind: [None] * n for kind in KINDS}
    for (kind, i, _, _), total in zip(todo, totals):
        rows[kind][i] = (total - base) / count
    dropped = dict(zip(("attn", "mlp"), dropped_layers(model)))
    return {"rows": rows, "base_loss": base / count, "num_tokens": count, "dropped": dropped,
            "cost": {"forward_passes": layer_runs / n / batches, "head_passes": heads / batches,
                     "candidates": len(todo), "seconds": time.perf_counter() - start}}
