"""Speed of vision models: images/s and FLOPs per image (baseline vs dropped), and a run-time check that
dropped sublayers are really skipped (hooks on every sublayer slot, FLOPs counted inside each).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one real forward, so they follow exactly
what runs: a dropped sublayer's stand-in does no matmul and counts zero.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError
from .architectures import get_vision_spec
from .modeling_dropped import dropped_layers, normalize_drop_list


def _image_shape(model: nn.Module, image_size: int | None) -> tuple[int, int, int]:
    cfg = model.config
    size = image_size or cfg.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return (getattr(cfg, "num_channels", 3), int(size), int(size))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def flops_per_image(model: nn.Module, image_size: int | None = None) -> int:
    """Floating-point operations of one forward pass on one image (counted, not estimated)."""
    x = torch.randn(1, *_image_shape(model, image_size), device=_device(model))
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(pixel_values=x)
    model.train(was)
    return int(counter.get_total_flops())


@torch.no_grad()
def images_per_second(model: nn.Module, batch_size: int = 32, image_size: int | None = None, iters: int = 10,
                      warmup: int = 2) -> float:
    """Throughput of full forward passes (eval mode) on random images; warms up the model itself."""
    if batch_size < 1 or iters < 1:
        raise UserError(f"batch_size and iters must be at least 1, got {batch_size}, {iters}")
    x = torch.randn(batch_size, *_image_shape(model, image_size), device=_device(model))
    was = model.training
    model.eval()
    for _ in range(warmup):
        model(pixel_values=x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        model(pixel_values=x)
    sync()
    elapsed = time.perf_counter() - start
    model.train(was)
    return batch_size * iters / elapsed


def compare_speed(base: nn.Module, dropped: nn.Module, batch_size: int = 32, image_size: int | None = None,
                  iters: int = 10, rounds: int = 3) -> dict[str, Any]:
    """Baseline vs dropped in one run: timings alternate (best of `rounds`) so machine load hits both alike."""
    if rounds < 1:
        raise UserError(f"rounds must be at least 1, got {rounds}")
    base_ips, drop_ips = [], []
    for _ in range(rounds):
        base_ips.append(images_per_second(base, batch_size, image_size, iters))
        drop_ips.append(images_per_second(dropped, batch_size, image_size, iters))
    f_base, f_drop = flops_per_image(base, image_size), flops_per_image(dropped, image_size)
    p_base = sum(p.numel() for p in base.parameters())
    p_drop = sum(p.numel() for p in dropped.parameters())
    return {
        "batch_size": batch_size,
        "base_images_per_s": max(base_ips), "dropped_images_per_s": max(drop_ips),
        "speedup": max(drop_ips) / max(base_ips),
        "base_flops_per_image": f_base, "dropped_flops_per_image": f_drop, "flops_ratio": f_drop / f_base,
        "base_params": p_base, "dropped_params": p_drop,
        "dropped": dict(zip(("attn", "mlp"), dropped_layers(dropped))) if _is_vision(dropped) else {},
    }


def _is_vision(model: nn.Module) -> bool:
    try:
        get_vision_spec(model)
        return True
    except ValueError:
        return False


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def _is_compute_module(m: nn.Module) -> bool:
    """A module whose call means real sublayer work: it holds parameters, or it is a normalization."""
    return isinstance(m, _NORMS) or "Norm" in type(m).__name__ or any(True for _ in m.parameters())


def declared_drops(model: nn.Module) -> tuple[list[int], list[int]]:
    """(attention, MLP) indices the model *declares* dropped: its config's `drop_attn_list` / `drop_mlp_list`.

    This is what a saved checkpoint promises, independently of which modules sit in the slots, so a slot whose
    original module came back (or whose stand-in runs real work) is caught. Models without drop lists in their
    config (plain families) declare what their stand-ins say.
    """
    config = model.config
    if hasattr(config, "drop_attn_list") or hasattr(config, "drop_mlp_list"):
        return (normalize_drop_list(getattr(config, "drop_attn_list", None)),
                normalize_drop_list(getattr(config, "drop_mlp_list", None)))
    return dropped_layers(model)


@torch.no_grad()
def sublayer_call_counts(model: nn.Module, pixel_values: torch.Tensor) -> list[dict[str, Any]]:
    """One forward with hooks on every sublayer slot; what ran inside each block's attention and MLP.

    The slots are the modules a sublayer consists of (`spec.attn_modules()` / `spec.mlp_modules()`: the
    attention or MLP parts, their norms, LayerScales, SwinV2 post-norms), hooked *whatever module sits there*,
    stand-ins included. Per block and kind (`attn`, `mlp`) a row holds:
    - `{kind}_calls`: forward calls of the slot modules themselves (a dropped block still calls its stand-in);
    - `{kind}_compute_calls`: calls of modules with parameters or of norms, at or under those slots;
    - `{kind}_flops`: FLOPs (`FlopCounterMode`: matmuls, convolutions, attention) done while any slot's forward
      was running, whichever module or function did them: a stand-in that secretly runs the original module
      counts here even when that module is not one of its children.
    plus `block`, `name` ("stage.block" for SwinV2) and `{kind}_dropped` (from `declared_drops`).
    """
    spec = get_vision_spec(model)
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

    was = model.training
    try:
        for i, block in enumerate(layers):
            for kind, group in (("attn", spec.attn_modules()), ("mlp", spec.mlp_modules())):
                for name in group:
                    slot = getattr(block, name)
                    handles.append(slot.register_forward_pre_hook(pre(i, kind)))
                    handles.append(slot.register_forward_hook(post(i, kind)))
                    handles += [m.register_forward_hook(compute(i, kind)) for m in slot.modules()
                                if _is_compute_module(m)]
        model.eval()
        with counter:
            model(pixel_values=pixel_values.to(_device(model)))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [{"block": i, "name": names[i], **c, "attn_dropped": i in attn_d, "mlp_dropped": i in mlp_d}
            for i, c in enumerate(counts)]


def check_really_skipped(model: nn.Module, pixel_values: torch.Tensor) -> list[dict[str, Any]]:
    """`sublayer_call_counts`, raising RuntimeError if a declared-dropped sublayer did real work (any FLOP or
    any parameterized/norm module call in its slots) or a kept one did no FLOPs."""
    rows = sublayer_call_counts(model, pixel_values)
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
