"""Run-time check that dropped sublayers never run, for any family (decoders and vision encoders).

One forward with hooks on every sublayer slot (the attention or MLP modules, their norms, LayerScales,
post-norms: `spec.attn_modules()` / `spec.mlp_modules()`), whatever module sits there, stand-ins included.
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` while a slot's forward runs, so a stand-in
that secretly runs the original module is caught even when that module is not one of its children. The
drop list trusted is the one the config *declares* (what a saved checkpoint promises), not the one read
from the modules, so an original module put back into a dropped slot is caught too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.architectures import get_spec
from ..scoring.forward_pass import model_inputs
from ..core.modeling_dropped import dropped_layers, normalize_drop_list

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def _is_compute_module(m: nn.Module) -> bool:
    """A module whose call means real sublayer work: it holds parameters, or it is a normalization."""
    return isinstance(m, _NORMS) or "Norm" in type(m).__name__ or any(True for _ in m.parameters())


def declared_drops(model: nn.Module) -> tuple[list[int], list[int]]:
    """(attention, MLP) indices the model *declares* dropped: its config's `drop_attn_list` / `drop_mlp_list`
    (range-checked against the config's layer count). Models without drop lists declare what their
    stand-ins say."""
    config = model.config
    if hasattr(config, "drop_attn_list") or hasattr(config, "drop_mlp_list"):
        n = get_spec(model).num_layers(config)
        return (normalize_drop_list(getattr(config, "drop_attn_list", None), n),
                normalize_drop_list(getattr(config, "drop_mlp_list", None), n))
    return dropped_layers(model)


@torch.no_grad()
def sublayer_call_counts(model: nn.Module, batch: Any) -> list[dict[str, Any]]:
    """One forward of `batch` (ids or pixel values, as `compute_importance` takes them) with hooks on every
    sublayer slot; what ran inside each layer's attention and MLP.

    Per layer and kind (`attn`, `mlp`) a row holds:
    - `{kind}_calls`: forward calls of the slot modules themselves (a dropped sublayer still calls its stand-in);
    - `{kind}_compute_calls`: calls of modules with parameters or of norms, at or under those slots;
    - `{kind}_flops`: FLOPs (matmuls, convolutions, attention) done while any slot's forward was running;
    plus `block`, `name` ("stage.block" for staged families) and `{kind}_dropped` (from `declared_drops`).
    """
    spec = get_spec(model)
    layers = spec.get_layers(model)
    names = spec.block_names(model)
    attn_d, mlp_d = declared_drops(model)
    counts = [{f"{k}_{c}": 0 for k in ("attn", "mlp") for c in ("calls", "compute_calls", "flops")} for _ in layers]
    counter = FlopCounterMode(display=False)
    entered: dict[int, int] = {}
    handles = []

    def pre(i: int, kind: str):
        def fn(module: nn.Module, args: Any) -> None:
            counts[i][f"{kind}_calls"] += 1
            entered[id(module)] = counter.get_total_flops()
        return fn

    def post(i: int, kind: str):
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            counts[i][f"{kind}_flops"] += counter.get_total_flops() - entered.pop(id(module))
        return fn

    def compute(i: int, kind: str):
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            counts[i][f"{kind}_compute_calls"] += 1
        return fn

    inputs = model_inputs(spec, batch, next(model.parameters()).device)
    if spec.inputs == "text":
        inputs["use_cache"] = False
    was = model.training
    parallel = spec.is_parallel(model.config) if spec.inputs == "text" else False
    try:
        for i, layer in enumerate(layers):
            # a parallel layer's shared norm belongs to neither sublayer (it runs while either is kept)
            for kind, group in (("attn", spec.attn_modules(layer, parallel)), ("mlp", spec.mlp_modules(layer))):
                for name in group:
                    slot = getattr(layer, name)
                    handles.append(slot.register_forward_pre_hook(pre(i, kind)))
                    handles.append(slot.register_forward_hook(post(i, kind)))
                    handles += [m.register_forward_hook(compute(i, kind)) for m in slot.modules()
                                if _is_compute_module(m)]
        model.eval()
        with counter:
            model(**inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [{"block": i, "name": names[i], **c, "attn_dropped": i in attn_d, "mlp_dropped": i in mlp_d}
            for i, c in enumerate(counts)]


def check_really_skipped(model: nn.Module, batch: Any) -> list[dict[str, Any]]:
    """`sublayer_call_counts`, raising RuntimeError if a declared-dropped sublayer did real work (any FLOP or
    any parameterized/norm module call in its slots) or a kept one did no FLOPs."""
    rows = sublayer_call_counts(model, batch)
    for r in rows:
        for kind in ("attn", "mlp"):
            flops, compute = r[f"{kind}_flops"], r[f"{kind}_compute_calls"]
            if r[f"{kind}_dropped"] and (flops or compute):
                raise RuntimeError(f"block {r['name']}: dropped {kind} ran ({flops} FLOPs, {compute} calls of "
                                   "parameterized or norm modules); the drop list and the modules disagree")
            if not r[f"{kind}_dropped"] and not flops:
                raise RuntimeError(f"block {r['name']}: kept {kind} did no FLOPs (never ran, or it is a stand-in "
                                   "the drop list does not declare)")
    return rows
