"""Does an attention drop gain more as the context grows? Base vs attention-, MLP- and block-dropped SmolLM2-135M
at several prompt lengths, all four timed in lock step in one run.

The same number of modules of each kind is dropped (lowest cosine importance on C4, one scoring pass). At each
prompt length (`lightning_drop.measure.context_speed.speed_by_context`): prefill + greedy decode of --gen-len tokens
with the KV cache, the four models taking turns at every step; speedups are medians of per-repeat ratios;
KV = the dropped model's cache at the end of the run over the base's; realized = (measured total speedup - 1)
/ (ideal - 1), the ideal profiled on the base (time in the modules the drop removes). With a short prompt a
small model's time is mostly MLP and embedding; as the context grows the KV cache and attention take over.

The default (prompts 128, 512, 2048 + 32 generated tokens, 2 repeats) takes minutes on 2 CPU cores:

    .venv/bin/python benchmarks/context_sweep.py [--prompt-lens 128,512,2048] [--gen-len 32] [--repeats 2]
    .venv/bin/python benchmarks/context_sweep.py --model tiny-llama --prompt-lens 16,64 --gen-len 4   # smoke

The paper's workload (2048 prompt + 2048 generated tokens, batch 1) is `--preset paper`; on 2 CPU cores it takes
the better part of an hour (4 models x 3 runs x 2048 decode steps, and the ideal profiling), on a GPU minutes:

    .venv/bin/python benchmarks/context_sweep.py --preset paper [--device cuda --dtype bfloat16] [--no-ideal]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import _common  # noqa: F401  (offline environment)
import torch

from lightning_drop import apply_drop
from lightning_drop.measure.context_speed import (
    check_context,
    format_context_table,
    max_positions,
    parse_lengths,
    positions_before_loading,
    preset,
    speed_by_context,
)
from lightning_drop.errors import UserError
from lightning_drop.io.model_loading import load_model

LABELS = {"attn": "attention", "mlp": "MLP", "block": "block"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="catalogue name or checkpoint (tiny-llama: a smoke run)")
    ap.add_argument("--num-drop", type=int, default=None,
                    help="modules of each kind dropped (default: 8, at most half the layers)")
    ap.add_argument("--prompt-lens", default="128,512,2048", help="comma-separated prompt lengths")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--preset", default=None, help="a named workload (paper: 2048 + 2048 tokens, batch 1); "
                                                   "replaces --prompt-lens, --gen-len and --batch-size")
    ap.add_argument("--no-ideal", action="store_true", help="skip profiling the ideal speedups (faster)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    t0 = time.time()
    try:
        if args.preset:
            work = preset(args.preset)
            lengths, gen_len, batch_size = work["prompt_lens"], work["gen_len"], work["batch_size"]
        else:
            lengths, gen_len, batch_size = parse_lengths(args.prompt_lens), args.gen_len, args.batch_size
        for name, value, low in (("--gen-len", gen_len, 2), ("--batch-size", batch_size, 1),
                                 ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
            if value < low:
                raise UserError(f"{name} must be >= {low}, got {value}")
        if args.threads:
            torch.set_num_threads(args.threads)
        option = "--preset" if args.preset else "--prompt-lens"
        check_context(lengths, gen_len, positions_before_loading(args.model), args.model, option)
        base, tok = load_model(args.model, dtype=args.dtype)
        check_context(lengths, gen_len, max_positions(base.config), args.model, option)
        n = base.config.num_hidden_layers
        num = args.num_drop if args.num_drop is not None else min(8, n // 2)
        if not 1 <= num < n:
            raise UserError(f"--num-drop must be between 1 and {n - 1} ({args.model} has {n} layers), got {num}")
    except UserError as err:
        print(f"context_sweep.py: error: {err}", file=sys.stderr)
        return 2
    sets, how = _common.importance_drops(base, tok, num)
    models = {"base": base.to(args.device)}
    for target, (attn, mlp) in sets.items():
        models[target] = apply_drop(copy.deepcopy(base), attn=attn, mlp=mlp)
    labels = {t: f"{LABELS[t]}-{num}" for t in sets}
    print(f"{args.model}: {n} layers; dropping {num} of each kind ({how}): "
          + "; ".join(f"{labels[t]} {a or m}" for t, (a, m) in sets.items()), flush=True)
    print(f"workload: prompts {', '.join(map(str, lengths))} + {gen_len} generated tokens, batch {batch_size}, median "
          f"of {args.repeats} per-repeat ratios, {args.clock} clock, models in lock step; "
          f"{_common.machine_label(args.device)}", flush=True)
    per = speed_by_context(models, lengths, gen_len, batch_size, args.repeats, args.warmup, clock=args.clock,
                           ideal=not args.no_ideal)
    print(format_context_table(per, labels, kv_detail=False))
    first, last = per[0]["vs_base"], per[-1]["vs_base"]
    print("total speedup, shortest -> longest prompt: "
          + "; ".join(f"{labels[t]} {first[t]['speedup']['total']:.3f}x -> {last[t]['speedup']['total']:.3f}x"
                      for t in sets) + f"   [{time.time() - t0:.0f} s]")
    _common.write_json(args.json, {"model": args.model, "num_drop": num, "selection": how,
                                   "drops": {t: {"attn": a, "mlp": m} for t, (a, m) in sets.items()},
                                   "per_length": per, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
