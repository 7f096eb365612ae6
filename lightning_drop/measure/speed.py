"""Speed and memory of a (dropped) model, measured the way the paper does.

- prefill: wall time of the forward over the prompt (batch x prompt_len tokens), filling a KV cache;
- decode: greedy generation of gen_len tokens, one token per step with the cache fed back;
- after warming up the model itself, median over repeats; `compare_speed` measures base and dropped
  alternately in one run so that drifting machine load hits both.

Beside the timings: parameters, weight bytes, KV-cache bytes and peak memory (measured by `memory`), and the
SDR (`gamma = dAvg% / dSpeedup%`). The ideal speedup of a drop, obtained by profiling the base model's
sublayers (and their norms) that the drop removes, is `lightning_drop.measure.ideal_speedup`'s.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any, get_args

import torch
from torch import nn

from . import clocks as _clocks
from ..errors import UserError
from ..core.options import Interleave
from .memory import (cache_bytes, cache_bytes_by_kind, cache_kw, count_params, kv_cache_bytes_per_token, model_device,
                     new_cache, peak_rss_bytes, random_prompt, weight_bytes)


@torch.no_grad()
def place_weights_alike(model: nn.Module) -> nn.Module:
    """Give every parameter and buffer of `model` freshly allocated memory (values unchanged), as a deep copy has.

    Models compared side by side must hold their weights in the same kind of memory: weights mapped from a
    checkpoint file and weights copied into new allocations run at measurably different speeds (measured on
    this project's CPU VM: 2-4% on SmolLM2's MLPs at batch 8, the whole size of the effect being measured).
    A dropped model is usually a copy of the base, so the base gets the same treatment. Tied weights stay tied
    (one Parameter object). Cost: one transient copy of each tensor.
    """
    for p in model.parameters():
        p.data = p.data.clone()
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.clone()
    return model


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
# The clocks live in `clocks`; these names stay importable from here.
CLOCKS = _clocks.CLOCKS
_clock = _clocks.check_clock
_sync = _clocks.sync


def generate_once(model: nn.Module, ids: torch.Tensor, gen_len: int, phase: dict[str, str] | None = None,
                   clock: str = "wall", kv_bytes: dict[str, int] | None = None) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, generated tokens [B, gen_len]) for one greedy run with a KV cache;
    `kv_bytes["model"]` receives the bytes of its cache at the end, when given."""
    return generate_lockstep({"model": model}, ids, gen_len, phase=phase, clock=clock, kv_bytes=kv_bytes)["model"]


@torch.inference_mode()
def generate_lockstep(models: Mapping[str, nn.Module], ids: torch.Tensor, gen_len: int, flip: bool = False,
                       phase: dict[str, str] | None = None, clock: str = "wall",
                       kv_bytes: dict[str, int] | None = None) -> dict[str, tuple[float, float, torch.Tensor]]:
    """Greedy generation with a KV cache fed back, for one or several models, alternating at every step.

    Each model's prefill and each of its decode steps is timed on its own (`clocks.stopwatch`: a host clock
    on a CPU, CUDA events on a GPU), and the models take turns, swapping who goes first every step: load that
    drifts over seconds on a shared machine then falls on all of them alike, which alternating whole runs
    cannot promise. `phase["name"]` says, while it runs, whether the models are in "prefill" or "decode" (for
    `profile_drop`'s hooks). `kv_bytes`, when given, receives each model's cache bytes at the end (prompt_len +
    gen_len - 1 tokens per sequence: the last token is never fed back). Returns {name: (prefill seconds,
    decode seconds, generated tokens [B, gen_len])}.
    """
    phase = {} if phase is None else phase
    names = list(models)[::-1] if flip else list(models)
    state: dict[str, dict[str, Any]] = {}
    phase["name"] = "prefill"
    for name in names:
        m = models[name]
        x = ids.to(model_device(m))
        kw = cache_kw(m)  # looked up once, outside the timed region
        cache = new_cache(m)
        watch = _clocks.stopwatch(clock, x.device)
        watch.start()
        out = m(input_ids=x, **{kw: cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        state[name] = {"cache": cache, "nxt": nxt, "tokens": [nxt], "prefill": watch.stop(), "decode": 0.0,
                       "device": x.device, "kw": kw, "watch": watch}
    phase["name"] = "decode"
    pos = ids.shape[1]
    for step in range(gen_len - 1):
        for name in (names if step % 2 else names[::-1]):
            st, m = state[name], models[name]
            cache_position = torch.tensor([pos], device=st["device"])
            st["watch"].start()
            out = m(input_ids=st["nxt"], **{st["kw"]: st["cache"]}, use_cache=True, cache_position=cache_position,
                    position_ids=cache_position.expand(ids.shape[0], 1))
            st["nxt"] = out.logits[:, -1].argmax(-1, keepdim=True)
            st["decode"] += st["watch"].stop()
            st["tokens"].append(st["nxt"])
        pos += 1
    phase["name"] = ""
    if kv_bytes is not None:
        kv_bytes.update({name: cache_bytes(st["cache"]) for name, st in state.items()})
    return {name: (st["prefill"], st["decode"], torch.cat(st["tokens"], dim=1)) for name, st in state.items()}


def check_generation_args(batch_size: int, prompt_len: int, gen_len: int, repeats: int, warmup: int) -> None:
    for name, v, lo in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1), ("gen_len", gen_len, 2),
                        ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {v!r}")


def _summary(prefill: list[float], decode: list[float], batch_size: int, prompt_len: int, gen_len: int) -> dict[str, Any]:
    p, d = statistics.median(prefill), statistics.median(decode)
    return {
        "prefill_s": p, "decode_s": d, "total_s": statistics.median([a + b for a, b in zip(prefill, decode)]),
        "prefill_tokens": batch_size * prompt_len, "decode_tokens": batch_size * gen_len,
        "prefill_tokens_per_s": batch_size * prompt_len / p,
        # gen_len tokens: the first comes out of the prefill forward, the other gen_len - 1 from decode steps.
        "decode_tokens_per_s": batch_size * (gen_len - 1) / d,
        "prefill_runs_s": list(prefill), "decode_runs_s": list(decode),
        # Interference from other processes only ever adds time: the minimum is the steadier statistic
        # on a shared machine (as timeit reports), the median the one the paper's protocol names.
        "prefill_min_s": min(prefill), "decode_min_s": min(decode),
        "total_min_s": min(a + b for a, b in zip(prefill, decode)),
    }


def measure_generation(model: nn.Module, batch_size: int = 1, prompt_len: int = 128, gen_len: int = 128,
                       repeats: int = 3, warmup: int = 1, seed: int = 0, clock: str = "wall") -> dict[str, Any]:
    """Prefill and greedy decode timings (median of `repeats`, after `warmup` runs of the model itself)."""
    return compare_speed({"model": model}, batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len,
                         repeats=repeats, warmup=warmup, seed=seed, clock=clock)["model"]


INTERLEAVE: tuple[str, ...] = get_args(Interleave)


def compare_speed(base: nn.Module | Mapping[str, nn.Module], dropped: nn.Module | None = None, batch_size: int = 1,
                  prompt_len: int = 128, gen_len: int = 128, repeats: int = 3, warmup: int = 1,
                  seed: int = 0, clock: str = "wall", interleave: str = "step",
                  place_alike: bool = True) -> dict[str, Any]:
    """Measure models ALTERNATELY in one run (same prompt).

    interleave="step" (default): the models generate in lock step, taking turns at every prefill and every
    decode step (see `generate_lockstep`); "run": whole generations alternate (base, dropped, dropped,
    base, ...). Returns {"base": stats, "dropped": stats, "speedup": {"prefill", "decode", "total"}, ...}
    where a speedup is the median over repeats of the per-repeat ratio base time / dropped time (both
    measured side by side in that repeat). `base` may also be a {name: model} mapping: with a "base" among
    them, `result["vs_base"][name]` holds each other model's ratios (also there for the base/dropped pair,
    whose ratios stay at the top level too). Each model's stats include `kv_cache_bytes`, its real cache at
    the end (prompt_len + gen_len - 1 tokens per sequence), and on CUDA `peak_cuda_bytes` (the device's peak
    during a run of that model alone, everything resident included) and `peak_cuda_extra_bytes` (that peak
    less what was allocated before the run: its cache and activations).
    `place_alike`: first give all models' weights fresh memory (`place_weights_alike`), so that a base
    mapped from its checkpoint and a dropped deep copy of it are timed on equal terms.
    """
    check_generation_args(batch_size, prompt_len, gen_len, repeats, warmup)
    if interleave not in INTERLEAVE:
        raise UserError(f"interleave must be one of {', '.join(INTERLEAVE)}, got {interleave!r}")
    models = dict(base) if isinstance(base, Mapping) else {"base": base, "dropped": dropped}
    if any(m is None for m in models.values()):
        raise UserError("compare_speed needs both a base and a dropped model")
    first = next(iter(models.values()))
    timed_by = {_clocks.resolve_clock(clock, model_device(m)) for m in models.values()}  # refuses a bad clock first
    if place_alike and len(models) > 1:
        for m in models.values():
            place_weights_alike(m)
    ids = random_prompt(first, batch_size, prompt_len, seed)
    states = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in models}
    peaks: dict[str, tuple[int, int]] = {}
    kv_end: dict[str, int] = {}
    try:
        for i in range(warmup):
            for name, m in models.items():
                if i == warmup - 1 and model_device(m).type == "cuda":
                    peaks[name] = _cuda_peak(m, ids, gen_len)  # the last warm-up run: each model on its own
                else:
                    generate_once(m, ids.to(model_device(m)), gen_len)
        order = list(models)
        for r in range(repeats):
            if interleave == "step":
                runs = generate_lockstep(models, ids, gen_len, flip=r % 2 == 1, clock=clock, kv_bytes=kv_end)
            else:
                runs = {}
                for name in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                    one: dict[str, int] = {}
                    runs[name] = generate_once(models[name], ids.to(model_device(models[name])), gen_len, clock=clock,
                                                kv_bytes=one)
                    kv_end[name] = one["model"]
            for name, (p, d, toks) in runs.items():
                assert toks.shape == (batch_size, gen_len)
                times[name][0].append(p)
                times[name][1].append(d)
        for name, m in models.items():
            if model_device(m).type == "cuda" and name not in peaks:  # no warm-up: one untimed run after the timed ones
                peaks[name] = _cuda_peak(m, ids, gen_len)
    finally:
        for name, m in models.items():
            m.train(states[name])
    result: dict[str, Any] = {}
    for name, m in models.items():
        stats = _summary(*times[name], batch_size, prompt_len, gen_len)
        stats.update(params=count_params(m), weight_bytes=weight_bytes(m),
                     kv_bytes_per_token=kv_cache_bytes_per_token(m, prompt_len=min(prompt_len, 32)),
                     kv_cache_bytes=kv_end[name], kv_cache_tokens=batch_size * (prompt_len + gen_len - 1),
                     cache_by_mixer_kind=cache_bytes_by_kind(m, prompt_len=min(prompt_len, 32)))
        if name in peaks:
            stats["peak_cuda_bytes"], stats["peak_cuda_extra_bytes"] = peaks[name]
        result[name] = stats
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["setup"] = dict(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats,
                           warmup=warmup, device=str(model_device(first)), threads=torch.get_num_threads(),
                           clock=clock if timed_by == {clock} else ",".join(sorted(timed_by)), interleave=interleave)
    if "base" in models and len(models) > 1:
        result["vs_base"] = {name: _vs_base(result, times, name) for name in models if name != "base"}
        if set(models) == {"base", "dropped"}:
            result.update(result["vs_base"]["dropped"])
    return result


def _vs_base(result: Mapping[str, Any], times: Mapping[str, tuple[list[float], list[float]]],
             name: str) -> dict[str, Any]:
    """Speedups of model `name` over "base" (median of per-repeat ratios, and of the fastest runs) and its
    KV-cache and parameter ratios."""
    b, d = result["base"], result[name]
    (bp, bd), (dp, dd) = times["base"], times[name]
    per_run = {"prefill": (bp, dp), "decode": (bd, dd),
               "total": ([x + y for x, y in zip(bp, bd)], [x + y for x, y in zip(dp, dd)])}
    runs = {k: [tb / td for tb, td in zip(*per_run[k])] for k in per_run}
    return {"speedup_runs": runs, "speedup": {k: statistics.median(v) for k, v in runs.items()},
            "speedup_min": {k: b[f"{k}_min_s"] / d[f"{k}_min_s"] for k in ("prefill", "decode", "total")},
            "kv_ratio": d["kv_bytes_per_token"] / b["kv_bytes_per_token"] if b["kv_bytes_per_token"] else None,
            "kv_cache_ratio": d["kv_cache_bytes"] / b["kv_cache_bytes"] if b["kv_cache_bytes"] else None,
            "param_ratio": d["params"] / b["params"]}


def _cuda_peak(model: nn.Module, ids: torch.Tensor, gen_len: int) -> tuple[int, int]:
    """One untimed generation of `model` alone on its CUDA device: (the device's peak allocated bytes during
    it, that peak less what was allocated before it). The peak statistics are reset first, so each model of a
    comparison gets its own peak even when all share the device."""
    dev = model_device(model)
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    generate_once(model, ids.to(dev), gen_len)
    torch.cuda.synchronize(dev)
    peak = int(torch.cuda.max_memory_allocated(dev))
    return peak, peak - int(before)


def sdr(base_avg: float, dropped_avg: float, speedup: float) -> float | None:
    """Speed-degradation ratio `gamma = dAvg% / dSpeedup%` (lower is better; None without a speedup).

    dAvg% = 100 (base_avg - dropped_avg) / base_avg; dSpeedup% = 100 (speedup - 1).
    """
    if base_avg <= 0:
        raise UserError(f"base_avg must be > 0, got {base_avg}")
    d_speed = 100.0 * (speedup - 1.0)
    if d_speed == 0:
        return None
    return (100.0 * (base_avg - dropped_avg) / base_avg) / d_speed


def print_speed(res: Mapping[str, Any]) -> None:
    for name in ("base", "dropped"):
        if name in res:
            s = res[name]
            print(f"{name:<8} prefill {s['prefill_s'] * 1e3:8.1f} ms ({s['prefill_tokens_per_s']:9.1f} tok/s)  "
                  f"decode {s['decode_s'] * 1e3:8.1f} ms ({s['decode_tokens_per_s']:8.1f} tok/s)  "
                  f"params {s['params'] / 1e6:7.2f}M  weights {s['weight_bytes'] / 2**20:7.1f} MiB  "
                  f"KV {s['kv_bytes_per_token'] / 1024:6.1f} KiB/token"
                  + (f" ({s['kv_cache_bytes'] / 2**20:.1f} MiB at {s['kv_cache_tokens']} tokens)"
                     if "kv_cache_bytes" in s else "")
                  + (f"  peak CUDA {s['peak_cuda_bytes'] / 2**20:.0f} MiB (+{s['peak_cuda_extra_bytes'] / 2**20:.0f}"
                     " MiB generating)" if "peak_cuda_bytes" in s else ""))
            kinds = s.get("cache_by_mixer_kind") or {}
            if len(kinds.get("kv_bytes_per_token", {})) > 1:  # hybrids, sliding windows: the cache per mixer kind
                print("         by mixer kind: " + "; ".join(
                    f"{k} KV {kv / 1024:.2f} KiB/token, state {kinds['state_bytes_per_sequence'][k] / 1024:.1f}"
                    " KiB/sequence" for k, kv in kinds["kv_bytes_per_token"].items()))
    if "speedup" in res:
        sp = res["speedup"]
        print(f"speedup  prefill {sp['prefill']:.3f}x  decode {sp['decode']:.3f}x  total {sp['total']:.3f}x  "
              f"KV ratio {res['kv_ratio']:.3f}")
    for k in ("ideal_speedup", "realized_gain", "sdr"):
        if res.get(k) is not None:
            print(f"{k} {res[k]:.3f}")
    print(f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
