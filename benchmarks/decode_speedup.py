"""Does an attention drop leave overhead behind? Measured vs ideal speedup, SmolLM2-135M, 8 attention layers.

ideal = T_base / (T_base - time the base model spends in the dropped sublayers and their norms), from
profiling the base model with forward hooks; measured = T_base / T_dropped, base and dropped timed
alternately in one run; realized gain = (measured - 1) / (ideal - 1), target >= 0.9. Times are prefill
(prompt_len tokens) + greedy decode (gen_len tokens with the KV cache); by default the two models generate in
lock step (turns at every decode step), and each ratio is the median over repeats of per-repeat ratios.

    .venv/bin/python benchmarks/decode_speedup.py [--batch-sizes 1 8] [--prompt-len 128] [--gen-len 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import _common  # noqa: F401  (offline environment)
import torch

from lightning_drop import apply_drop
from lightning_drop.measure.ideal_speedup import profile_drop, realized_gain
from lightning_drop.io.model_loading import load_model
from lightning_drop.measure.speed import compare_speed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-drop", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a realized gain is below --target")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own); on an oversubscribed machine 1 is far steadier")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process = CPU time of this process: with --threads 1 it equals wall time on an idle "
                         "machine and is barely disturbed by other processes on a shared one")
    ap.add_argument("--interleave", choices=["step", "run"], default="step",
                    help="step: base and dropped take turns at every decode step (drift cancels); run: whole "
                         "generations alternate")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load_model(args.model)
    attn, how = _common.attention_drop(base, tok, args.num_drop)
    dropped = apply_drop(copy.deepcopy(base), attn=attn)
    print(f"{args.model}: dropping attention layers {attn} ({how}); torch threads {torch.get_num_threads()}", flush=True)
    print(f"workload: prompt {args.prompt_len} + decode {args.gen_len} tokens, median of {args.repeats} per-repeat "
          f"ratios, {args.clock} clock, models interleaved per {args.interleave}", flush=True)
    print(f"{'batch':>5} {'phase':>8} {'base ms':>9} {'dropped ms':>10} {'measured':>9} {'ideal':>7} {'gain':>6}   | same from the fastest run")
    rows, ok = [], True
    for bs in args.batch_sizes:
        kw = dict(batch_size=bs, prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
                  warmup=args.warmup, clock=args.clock)
        cmp = compare_speed(base, dropped, interleave=args.interleave, **kw)
        prof = profile_drop(base, attn, [], **kw)
        for phase in ("prefill", "decode", "total"):
            measured, ideal = cmp["speedup"][phase], prof[phase]["ideal_speedup"]
            gain = realized_gain(measured, ideal)
            m_min, i_min = cmp["speedup_min"][phase], prof[phase]["ideal_speedup_min"]
            gain_min = realized_gain(m_min, i_min)
            rows.append(dict(batch_size=bs, phase=phase, base_s=cmp["base"][f"{phase}_s"],
                             dropped_s=cmp["dropped"][f"{phase}_s"], measured=measured, ideal=ideal, gain=gain,
                             profiled_base_s=prof[phase]["base_s"], dropped_parts_s=prof[phase]["dropped_parts_s"],
                             measured_min=m_min, ideal_min=i_min, gain_min=gain_min,
                             measured_runs=cmp["speedup_runs"][phase]))
            print(f"{bs:>5} {phase:>8} {cmp['base'][f'{phase}_s'] * 1e3:>9.1f} {cmp['dropped'][f'{phase}_s'] * 1e3:>10.1f} "
                  f"{measured:>8.3f}x {ideal:>6.3f}x {gain:>6.2f}   | min: {m_min:.3f}x {i_min:.3f}x {gain_min:6.2f}",
                  flush=True)
            if phase == "total":
                ok &= gain >= args.target
    verdict = "PASS" if ok else "BELOW TARGET"
    print(f"realized gain (total) target >= {args.target}: {verdict}   [{time.time() - t0:.0f} s]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"attn": attn, "selection": how, "rows": rows, "args": vars(args)}, fh, indent=2)
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
