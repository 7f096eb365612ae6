"""The ideal speed-up of a drop, from profiling the base model, and how much of it a drop delivers.

`profile_drop` generates with the base model as `lightning_drop.measure.speed` does and, in alternate runs, times
(per prefill/decode phase) the modules the drop would remove: each dropped sublayer and its norms
(`profile_drops`: several drops from the same runs).
The ideal speed-up is T_base / (T_base - T_removed parts); `realized_gain` compares it with the speed-up the
dropped model really shows (`speed.compare_speed`), and `speedup_warnings` says when a measured speed-up cannot
be trusted: far outside the ideal, or from repeats that disagree.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .clocks import resolve_clock, stopwatch
from ..errors import UserError
from .memory import model_device, random_prompt
from .speed import check_generation_args, generate_once


def dropped_part_modules(model: nn.Module, attn: Iterable[int] = (), mlp: Iterable[int] = ()) -> list[nn.Module]:
    """The base model's modules a drop removes: each dropped sublayer and its norms (from the ArchSpec)."""
    from lightning_drop.core.architectures import get_spec

    spec = get_spec(model)
    layers = spec.get_layers(model)
    mods: list[nn.Module] = []
    for kind, names, idx in (("attn", (spec.attn, *spec.attn_norms), attn), ("mlp", (spec.mlp, *spec.mlp_norms), mlp)):
        for i in idx:
            if not 0 <= i < len(layers):
                raise UserError(f"layer index {i} out of range (model has {len(layers)} layers)")
            if not spec.holds(layers[i], kind):  # gone by never having been there (Nemotron-H): removes nothing
                continue
            for n in names:
                mods.append(getattr(layers[i], n))
    return mods


@contextlib.contextmanager
def _time_modules(modules: Sequence[nn.Module], phase: dict[str, str], acc: dict[tuple[int, str], float],
                  clock: str = "wall") -> Iterator[None]:
    """Accumulate the time spent inside each of `modules` per phase, in `acc[(id(module), phase)]` (pre-hook to
    hook, each module on its own `clocks.stopwatch`: CUDA events on a GPU); hooks always removed."""
    watches = {id(m): stopwatch(clock, _device_of(m)) for m in modules}
    handles = []

    def pre(mod: nn.Module, *_: Any) -> None:
        watches[id(mod)].start()

    def post(mod: nn.Module, *_: Any) -> None:
        key = (id(mod), phase["name"])
        acc[key] = acc.get(key, 0.0) + watches[id(mod)].stop()

    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def _device_of(mod: nn.Module) -> torch.device:
    for p in mod.parameters():
        return p.device
    return torch.device("cpu")


def profile_drop(base_model: nn.Module, attn: Iterable[int] = (), mlp: Iterable[int] = (), batch_size: int = 1,
                 prompt_len: int = 128, gen_len: int = 128, repeats: int = 3, warmup: int = 1,
                 seed: int = 0, clock: str = "wall") -> dict[str, Any]:
    """Time the base model (no hooks) and, in alternate runs, the time it spends in the parts a drop removes.

    Returns per phase (prefill, decode, total): base seconds, seconds in dropped parts, and the ideal speedup
    T_base / (T_base - T_parts).
    """
    return profile_drops(base_model, {"drop": (attn, mlp)}, batch_size, prompt_len, gen_len, repeats, warmup,
                         seed, clock)["drop"]


def profile_drops(base_model: nn.Module, drops: Mapping[str, tuple[Iterable[int], Iterable[int]]],
                  batch_size: int = 1, prompt_len: int = 128, gen_len: int = 128, repeats: int = 3, warmup: int = 1,
                  seed: int = 0, clock: str = "wall") -> dict[str, dict[str, Any]]:
    """`profile_drop` of several drops {name: (attention indices, MLP indices)} from the same runs: each
    profiled run times every module any of them removes, and each drop sums its own modules, so comparing
    drops costs the base runs of one."""
    check_generation_args(batch_size, prompt_len, gen_len, repeats, warmup)
    resolve_clock(clock, model_device(base_model))
    drops = {name: (list(attn), list(mlp)) for name, (attn, mlp) in drops.items()}
    mods = {name: dropped_part_modules(base_model, attn, mlp) for name, (attn, mlp) in drops.items()}
    hooked = list({id(m): m for ms in mods.values() for m in ms}.values())
    ids = random_prompt(base_model, batch_size, prompt_len, seed)
    was_training = base_model.training
    base_model.eval()
    base_p, base_d, hook_p, hook_d = [], [], [], []
    part_p: dict[str, list[float]] = {name: [] for name in drops}
    part_d: dict[str, list[float]] = {name: [] for name in drops}
    phase = {"name": ""}
    try:
        for _ in range(warmup):
            generate_once(base_model, ids, gen_len)
        for _ in range(repeats):
            p, d, _ = generate_once(base_model, ids, gen_len, clock=clock)
            base_p.append(p)
            base_d.append(d)
            acc: dict[tuple[int, str], float] = {}
            with _time_modules(hooked, phase, acc, clock):
                p, d, _ = generate_once(base_model, ids, gen_len, phase=phase, clock=clock)
            hook_p.append(p)
            hook_d.append(d)
            for name, ms in mods.items():
                part_p[name].append(sum(acc.get((id(m), "prefill"), 0.0) for m in ms))
                part_d[name].append(sum(acc.get((id(m), "decode"), 0.0) for m in ms))
    finally:
        base_model.train(was_training)
    return {name: _ideal_from_runs(attn, mlp, base_p, base_d, hook_p, hook_d, part_p[name], part_d[name],
                                   dict(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len,
                                        repeats=repeats, clock=clock))
            for name, (attn, mlp) in drops.items()}


def _ideal_from_runs(attn: list[int], mlp: list[int], base_p: list[float], base_d: list[float], hook_p: list[float],
                     hook_d: list[float], part_p: list[float], part_d: list[float],
                     setup: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median
    out: dict[str, Any] = {"attn": attn, "mlp": mlp, "setup": setup}

    def ideal(total: float, parts: float) -> float:
        return total / (total - parts) if total > parts else float("inf")

    for name, b, h, q in (("prefill", base_p, hook_p, part_p), ("decode", base_d, hook_d, part_d),
                          ("total", [x + y for x, y in zip(base_p, base_d)], [x + y for x, y in zip(hook_p, hook_d)],
                           [x + y for x, y in zip(part_p, part_d)])):
        # The share of time in the dropped parts is read from one and the same (profiled) run, so load that
        # drifts between runs cancels; the unprofiled runs give the base time alone.
        out[name] = {"base_s": med(b), "profiled_s": med(h), "dropped_parts_s": med(q),
                     "dropped_share": med(tq / th for th, tq in zip(h, q)),
                     "ideal_speedup": med(ideal(th, tq) for th, tq in zip(h, q))}
        mh, mq = min(h), min(q)
        out[name]["ideal_speedup_min"] = ideal(mh, mq)
    return out


def ideal_speedup(base_model: nn.Module, attn_drop: Iterable[int] = (), mlp_drop: Iterable[int] = (),
                  batch_size: int = 1, prompt_len: int = 128, gen_len: int = 128, repeats: int = 3,
                  warmup: int = 1, phase: str = "total", clock: str = "wall") -> float:
    """T_base / (T_base - T_dropped_parts) over prefill + decode (or one `phase`), by profiling `base_model`."""
    if phase not in ("prefill", "decode", "total"):
        raise UserError(f"phase must be prefill, decode or total, got {phase!r}")
    prof = profile_drop(base_model, attn_drop, mlp_drop, batch_size, prompt_len, gen_len, repeats, warmup, clock=clock)
    return prof[phase]["ideal_speedup"]


def realized_gain(measured: float, ideal: float) -> float:
    """(measured - 1) / (ideal - 1): the share of the ideal gain the drop really delivers."""
    if ideal == 1:
        raise UserError("ideal speedup is 1: nothing to realize")
    return (measured - 1.0) / (ideal - 1.0)


#: A measured speed-up above the ideal by more than this factor is more than removing those parts can give,
#: and one below its inverse means the dropped model ran slower than the base: either way other load on the
#: machine (or too few threads for both) moved the timings.
IDEAL_TOLERANCE = 1.25
#: Per-repeat speed-ups whose range exceeds this share of their median make that median noise.
SPREAD_TOLERANCE = 0.25


def speedup_warnings(vs: Mapping[str, Any], label: str) -> list[str]:
    """Why the speed-ups of one comparison should not be trusted, one sentence each (none: nothing seen).

    `vs` is a `vs_base` entry of `speed.compare_speed` (its `speedup` and `speedup_runs`), with `ideal_speedup`
    {phase: x} where the base was profiled; `label` starts each sentence (which model, which length).
    """
    out = []
    ideal = vs.get("ideal_speedup") or {}
    for phase in ("prefill", "decode", "total"):
        measured = vs["speedup"][phase]
        x = ideal.get(phase)
        if x is not None and math.isfinite(x) and measured > x * IDEAL_TOLERANCE:
            out.append(f"{label}: {phase} speedup {measured:.2f}x is far above the ideal {x:.2f}x (the most removing "
                       f"those sublayers can give): other load on the machine moved the timings; rerun with "
                       f"--threads 1 --clock process or on an idle machine")
        elif measured < 1 / IDEAL_TOLERANCE:
            out.append(f"{label}: {phase} speedup {measured:.2f}x: the dropped model ran slower than the base, which "
                       f"removing sublayers cannot cause; other load on the machine moved the timings")
        runs = list((vs.get("speedup_runs") or {}).get(phase) or [])
        if len(runs) >= 2:
            mid = statistics.median(runs)
            if mid > 0 and (max(runs) - min(runs)) / mid > SPREAD_TOLERANCE:
                out.append(f"{label}: {phase} speedups of the {len(runs)} repeats range from {min(runs):.2f}x to "
                           f"{max(runs):.2f}x around {mid:.2f}x: the median is noise; use more --repeats or an idle "
                           f"machine")
    return out
