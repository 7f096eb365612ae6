"""What a dropped sublayer still costs: one decoder layer at decode (batch 1, one token), side by side.

Times (a) the full layer, (b) the same layer with its attention dropped (stand-in + Identity norm + the
layer's own `residual + 0`), and (c) the bare surviving path `x + mlp(norm(x))`. (b) - (c) is the overhead
the drop leaves behind; (a) - (c) is what the drop saves. Realized fraction = saved_actual / saved_ideal.

    python benchmarks/dropped_layer_overhead.py [--model smollm2-135m] [--layer 5] [--iters 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lightning_drop import apply_drop
from lightning_drop.io.model_loading import load_model


def _time(fn, iters: int) -> float:
    for _ in range(iters // 10):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base, _ = load_model(a.model)
    dropped, _ = load_model(a.model)
    apply_drop(dropped, attn=[a.layer])
    lb, ld = base.model.layers[a.layer], dropped.model.layers[a.layer]
    x = torch.randn(1, 1, base.config.hidden_size)
    pe = base.model.rotary_emb(x, position_ids=torch.zeros(1, 1, dtype=torch.long))
    rows: dict[str, list[float]] = {"full": [], "dropped": [], "bare": []}
    with torch.no_grad():
        for _ in range(a.rounds):  # alternate the three so drift hits all of them
            rows["full"].append(_time(lambda: lb(x, position_embeddings=pe, attention_mask=None), a.iters))
            rows["dropped"].append(_time(lambda: ld(x, position_embeddings=pe, attention_mask=None), a.iters))
            rows["bare"].append(_time(lambda: x + ld.mlp(ld.post_attention_layernorm(x)), a.iters))
    full, drop, bare = (statistics.median(rows[k]) for k in ("full", "dropped", "bare"))
    print(f"{a.model} layer {a.layer}, decode step (1 token), median of {a.rounds} x {a.iters} calls, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  full layer              {full:8.1f} us")
    print(f"  attention dropped       {drop:8.1f} us")
    print(f"  bare MLP path           {bare:8.1f} us")
    print(f"  overhead left by drop   {drop - bare:8.1f} us  ({100 * (drop - bare) / (full - bare):.1f}% of the ideal saving)")
    print(f"  realized fraction       {(full - drop) / (full - bare):8.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
