"""Speed of vision models: images/s and FLOPs per image (baseline vs dropped). The run-time check that
dropped sublayers are really skipped is the core's (`lightning_drop.measure.sublayer_check`, any family).

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
from ..core.modeling_dropped import dropped_layers
from ..core.architectures import vision_spec


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


def compare_image_throughput(base: nn.Module, dropped: nn.Module, batch_size: int = 32, image_size: int | None = None,
                  iters: int = 10, rounds: int = 3) -> dict[str, Any]:
    """Images/s, FLOPs per image and parameters of a baseline and a dropped vision model in one run: timings
    alternate (best of `rounds`) so machine load hits both alike. (Not `lightning_drop.measure.speed.compare_speed`,
    which measures token generation of decoders.)"""
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
        vision_spec(model)
        return True
    except ValueError:
        return False
