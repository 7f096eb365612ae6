"""Scoring pass vs plain forward: what importance scoring costs on top of the forward it needs anyway.

Times `importance.compute_importance(model, batches)` (the hooked pass over the decoder, scores for blocks,
attention and MLP at once) against a plain `torch.no_grad()` forward of the same decoder (no LM head, no
hooks) over the same tokens, alternately in one run (plain, scored, plain, scored, ... after a warm-up of
each), and prints the ratio of the medians. Target: <= 1.15x. It also times the hooks' own work (the per-token
score reduction) to show where any overhead goes.

    python benchmarks/scoring_overhead.py [--model smollm2-135m] [--num-samples 4] [--seq-len 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_drop import importance  # noqa: E402
from lightning_drop.data import calibration_windows, CalibrationConfig  # noqa: E402
from lightning_drop.importance import _decoder, compute_importance  # noqa: E402
from lightning_drop.models import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="c4-sample")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--metric", default="cosine")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tok = load_model(a.model)
    windows = calibration_windows(tok, CalibrationConfig(source=a.calibration, num_samples=a.num_samples,
                                                         seq_len=a.seq_len))
    batches = [windows[i:i + a.batch_size] for i in range(0, len(windows), a.batch_size)]
    runner = _decoder(model)

    @torch.no_grad()
    def plain() -> None:
        for b in batches:
            runner(input_ids=b, use_cache=False)

    hook_time = {"s": 0.0}
    original = importance.ImportanceAccumulator._reduce

    def timed_reduce(self, kind, layer, x, y):  # the hooks' per-token work, timed
        t = time.perf_counter()
        original(self, kind, layer, x, y)
        hook_time["s"] += time.perf_counter() - t

    def scored() -> None:
        compute_importance(model, batches, metric=a.metric)

    norms: dict[int, torch.Tensor] = {}

    def fused_reduce(self, kind, layer, x, y):
        """Proposed importance.py change (cosine only): each state's norm once per layer, vecdot, no Metric.update."""
        if kind == "attn":
            norms.clear()
        nx = norms.get(id(x))
        if nx is None:
            nx = norms[id(x)] = torch.linalg.vector_norm(x, dim=-1)
        ny = norms.get(id(y))
        if ny is None:
            ny = norms[id(y)] = torch.linalg.vector_norm(y, dim=-1)
        s = 1.0 - torch.linalg.vecdot(x, y) / (nx * ny).clamp_min(1e-8)
        m = self.metrics[kind]
        if self.mask is not None:
            m.total[layer] += (s * self.mask).sum(dtype=torch.float64)
            m.count[layer] += self.mask.sum()
        else:
            m.total[layer] += s.sum(dtype=torch.float64)
            m.count[layer] += s.numel()

    def fused() -> None:
        importance.ImportanceAccumulator._reduce = fused_reduce
        try:
            compute_importance(model, batches, metric=a.metric)
        finally:
            importance.ImportanceAccumulator._reduce = original

    if a.metric == "cosine":  # the proposed reduction must give the same scores
        ref = compute_importance(model, batches[:1], metric=a.metric)
        importance.ImportanceAccumulator._reduce = fused_reduce
        try:
            new = compute_importance(model, batches[:1], metric=a.metric)
        finally:
            importance.ImportanceAccumulator._reduce = original
        for k in ("attn", "mlp", "block"):
            assert all(abs(u - v) <= 1e-5 * max(1.0, abs(u)) for u, v in zip(ref.row(k), new.row(k))), k
    variants = [("plain", plain), ("scored", scored)] + ([("fused", fused)] if a.metric == "cosine" else [])
    for _, fn in variants:
        fn()  # warm-up of each
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(a.repeats):
        for name, fn in (variants if r % 2 == 0 else variants[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_plain, t_scored, t_hooks = times["plain"], times["scored"], []
    # hooks' share, in separate runs (the timer itself perturbs the pass a little)
    importance.ImportanceAccumulator._reduce = timed_reduce
    try:
        for _ in range(max(1, a.repeats // 2)):
            hook_time["s"] = 0.0
            scored()
            t_hooks.append(hook_time["s"])
    finally:
        importance.ImportanceAccumulator._reduce = original
    mp, ms, mh = statistics.median(t_plain), statistics.median(t_scored), statistics.median(t_hooks)
    res = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
           f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}",
           "model": a.model, "tokens": int(windows.numel()), "repeats": a.repeats, "metric": a.metric,
           "plain_forward_s": mp, "scoring_pass_s": ms, "ratio": ms / mp, "hook_reduce_s": mh,
           "hook_share_of_plain": mh / mp, "plain_runs_s": t_plain, "scoring_runs_s": t_scored}
    print(f"scoring overhead on {a.model}: {windows.shape[0]} x {windows.shape[1]} tokens, median of {a.repeats} "
          f"alternate runs ({res['date']}, {res['machine']})")
    print(f"  plain no_grad decoder forward  {mp:8.3f} s")
    print(f"  compute_importance ({a.metric})  {ms:8.3f} s")
    print(f"  ratio                          {ms / mp:8.3f}x  (target <= 1.15x)")
    print(f"  inside the hooks' score reductions: {mh:.3f} s = {100 * mh / mp:.1f}% of the plain forward")
    if "fused" in times:
        mf = statistics.median(times["fused"])
        res.update(fused_pass_s=mf, fused_ratio=mf / mp)
        print(f"  proposed fused reduction (same scores): {mf:.3f} s = {mf / mp:.3f}x of the plain forward")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
