"""KV-cache bytes per token, measured from a real cache: SmolLM2-135M base vs attention-dropped.

    .venv/bin/python benchmarks/kv_cache.py [--num-drop 8] [--prompt-len 64]
"""

from __future__ import annotations

import argparse
import copy
import sys

import _common  # noqa: F401  (offline environment)

from lightning_drop import apply_drop
from lightning_drop.io.model_loading import load_model
from lightning_drop.measure.memory import count_params, kv_cache_bytes_per_token


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-drop", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    args = ap.parse_args(argv)

    base, tok = load_model(args.model)
    n = base.config.num_hidden_layers
    attn, how = _common.attention_drop(base, tok, args.num_drop)
    kv_base = kv_cache_bytes_per_token(base, prompt_len=args.prompt_len)
    print(f"{args.model}: {n} layers, prompt {args.prompt_len} tokens")
    print(f"{'model':<34}{'KV bytes/token':>15}{'ratio':>8}{'expected':>10}{'params':>10}")
    print(f"{'base':<34}{kv_base:>15.0f}{1.0:>8.3f}{1.0:>10.3f}{count_params(base) / 1e6:>9.1f}M")
    ok = True
    for label, drop in ((f"{len(attn)} attention dropped ({how.split(' (')[0]})", attn),
                        (f"{n // 2} attention dropped (every other)", list(range(0, n, 2))[: n // 2])):
        m = apply_drop(copy.deepcopy(base), attn=drop)
        kv = kv_cache_bytes_per_token(m, prompt_len=args.prompt_len)
        expected = (n - len(drop)) / n
        ok &= abs(kv / kv_base - expected) < 1e-9
        print(f"{label[:33]:<34}{kv:>15.0f}{kv / kv_base:>8.3f}{expected:>10.3f}{count_params(m) / 1e6:>9.1f}M")
    print("KV cache shrinks exactly with the dropped attention layers:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
