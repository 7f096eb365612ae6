"""Where decode time goes, base vs dropped, per kind of module: is the shortfall from ideal in the drop itself?

SmolLM2-135M with 8 attention layers dropped (cosine), base and dropped generating in lock step (turns at
every decode step, as `compare_speed` does), every decoder sublayer and norm timed with hooks in both models,
split into the layers whose attention is dropped and the kept ones. Prints seconds per group, base vs
dropped, and what the dropped model saved against what the removed modules cost in the base model.

    .venv/bin/python benchmarks/decode_breakdown.py [--batch-size 8] [--prompt-len 64] [--gen-len 32]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import _common  # noqa: F401  (offline environment)
import torch

from lightning_drop import apply_drop, get_spec
from lightning_drop.io.model_loading import load_model
from lightning_drop.measure.memory import random_prompt
from lightning_drop.measure.speed import generate_lockstep, place_weights_alike


def _hook_all(model: torch.nn.Module, dropped: set[int], acc: dict[tuple[str, str], float], now) -> list[Any]:
    spec = get_spec(model)
    start: dict[int, float] = {}
    handles = []
    for i, layer in enumerate(spec.get_layers(model)):
        for name in (*spec.attn_norms, spec.attn, *spec.mlp_norms, spec.mlp):
            key = (name, "attention-dropped layers" if i in dropped else "kept layers")

            def pre(mod, *_: Any) -> None:
                start[id(mod)] = now()

            def post(mod, *_: Any, key=key) -> None:
                acc[key] = acc.get(key, 0.0) + now() - start.pop(id(mod))

            mod = getattr(layer, name)
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-drop", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-place-alike", action="store_true",
                    help="time the base with its weights as loaded from the checkpoint (shows the placement effect)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    now = time.process_time
    base, tok = load_model(a.model)
    attn, how = _common.attention_drop(base, tok, a.num_drop)
    dropped = apply_drop(copy.deepcopy(base), attn=attn)
    models = {"base": base.eval(), "dropped": dropped.eval()}
    if not a.no_place_alike:  # as compare_speed does: a base mapped from its checkpoint vs a copied dropped model
        for m in models.values():
            place_weights_alike(m)
    ids = random_prompt(base, a.batch_size, a.prompt_len)
    generate_lockstep(models, ids, 4, clock="process")  # warm-up
    acc: dict[str, dict[tuple[str, str], float]] = {"base": {}, "dropped": {}}
    handles = [h for name, m in models.items() for h in _hook_all(m, set(attn), acc[name], now)]
    totals = {"base": 0.0, "dropped": 0.0}
    try:
        for r in range(a.repeats):
            for name, (p, d, _) in generate_lockstep(models, ids, a.gen_len, flip=r % 2 == 1, clock="process").items():
                totals[name] += p + d
    finally:
        for h in handles:
            h.remove()
    print(f"{a.model}: attention dropped in {attn} ({how}); batch {a.batch_size}, prompt {a.prompt_len} + "
          f"{a.gen_len} tokens, {a.repeats} lock-step repeats, 1 thread, process clock (prefill + decode)")
    print(f"{'module':<26} {'layers':<26} {'base s':>8} {'dropped s':>10} {'dropped/base':>13}")
    for key in sorted(set(acc["base"]) | set(acc["dropped"])):
        b, d = acc["base"].get(key, 0.0), acc["dropped"].get(key, 0.0)
        print(f"{key[0]:<26} {key[1]:<26} {b:>8.3f} {d:>10.3f} {d / b if b else float('nan'):>13.3f}")
    spec = get_spec(base)
    removed = [(n, "attention-dropped layers") for n in (spec.attn, *spec.attn_norms)]
    cost = sum(acc["base"].get(k, 0.0) for k in removed)
    left = sum(acc["dropped"].get(k, 0.0) for k in removed)
    saved = totals["base"] - totals["dropped"]
    others = sum(acc["dropped"].get(k, 0.0) - acc["base"].get(k, 0.0) for k in acc["base"] if k not in removed)
    print(f"whole model: base {totals['base']:.3f} s, dropped {totals['dropped']:.3f} s, speedup "
          f"{totals['base'] / totals['dropped']:.3f}x")
    print(f"removed modules cost the base {cost:.3f} s; their stand-ins cost {left:.3f} s "
          f"({100 * left / cost:.1f}%); the dropped model saved {saved:.3f} s = {saved / cost:.2f} of it; the "
          f"kept modules took {others:+.3f} s more in the dropped model")


if __name__ == "__main__":
    main()
