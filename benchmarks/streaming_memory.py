"""Layer-streamed scoring of a model larger than the memory the process may use.

1. Writes a random-init Llama checkpoint (default: hidden 4096, MLP 11008, 10 layers, vocab 32000, bf16,
   ~4.6 GB) shard by shard, one decoder layer per shard, never holding more than one layer.
2. Scores it with `lightning_drop.streaming.stream_importance` (float32 compute) in a subprocess whose
   address space is capped with `resource.setrlimit(RLIMIT_AS)` below the model size.
3. Prints the measured peak RSS against the model size and the bound
   (one float32 layer + hidden states + embedding), then deletes the checkpoint.

    .venv/bin/python benchmarks/streaming_memory.py [--layers 10] [--limit-gib 3.0] [--dir /tmp/x]

Measured 2026-12-01 (2-core CPU VM, torch 2.13, transformers 5.24; defaults, quiet machine):

    wrote .../llama-random: 10 layers, hidden 4096, bf16, 4.26 GiB on disk in 1 shard(s), largest 4.26 GiB
    scored 10 layers x 4 windows x 128 tokens in 16 s under RLIMIT_AS = 3.00 GiB (model on disk: 4.26 GiB bf16, 8.52 GiB as float32)
      bound: one float32 layer 0.754 + hidden states 0.0078 + float32 embedding 0.488 = 1.250 GiB (+ the Python/torch runtime)
      measured peak RSS 1.498 GiB, peak virtual 2.057 GiB
      peak RSS above the runtime (RSS 0.498 GiB before scoring): 1.000 GiB = 0.80 x the bound (within it)

The whole checkpoint is one file larger than the address-space cap: the tensors are read with positional
file reads, not memory-mapped (safetensors' own loader would map the whole file and fail under the cap).
Loading the same model in memory would need 8.5 GiB as float32 and fails under the cap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30


def write_checkpoint(out: Path, hidden: int, inter: int, layers: int, vocab: int, heads: int,
                     shard_bytes: int = 5 * 10**9) -> int:
    """Random-init LlamaForCausalLM in safetensors shards of up to `shard_bytes` (save_pretrained's 5GB
    default: the 4.26 GiB default model is ONE file, larger than the scoring process's address-space cap);
    returns bytes on disk."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    pending: dict = {}

    def flush() -> None:
        if pending:
            name = f"shard-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(out / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in pending})
            pending.clear()

    def write(tensors: dict) -> None:
        nonlocal total
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        if pending and sum(v.numel() * v.element_size() for v in pending.values()) + size > shard_bytes:
            flush()
        pending.update(tensors)
        total += size

    write({"model.embed_tokens.weight": rnd(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        write({
            p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(hidden, hidden),
            p + "self_attn.v_proj.weight": rnd(hidden, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        })
    write({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rnd(vocab, hidden)})
    flush()
    # HF's shard names: model-0000i-of-0000n.safetensors
    final = {name: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, name in enumerate(shards)}
    for name, new_name in final.items():
        os.replace(out / name, out / new_name)
    weight_map = {k: final[v] for k, v in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    return total


def _worker(model_dir: str, samples: int, seq_len: int, batch_size: int, limit: int) -> None:
    """Runs in the capped subprocess: score, then report peak RSS and the sizes that bound it."""
    import torch

    from lightning_drop.streaming import stream_importance

    torch.set_num_threads(2)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    windows = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    status = Path("/proc/self/status").read_text()
    runtime_rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS"))
    stats: dict = {}
    t0 = time.perf_counter()
    scores = stream_importance(model_dir, windows, batch_size=batch_size, dtype=torch.float32, stats=stats)
    status = Path("/proc/self/status").read_text()
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
              if line.startswith(("VmHWM", "VmPeak"))}
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": fields["VmHWM"], "runtime_rss": runtime_rss,
                      "peak_virtual": fields["VmPeak"], "rlimit_as": limit, **stats,
                      "attn": scores.attn, "block": scores.block}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--limit-gib", type=float, default=3.0, help="RLIMIT_AS of the scoring process")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="do not delete the checkpoint")
    ap.add_argument("--shard-gb", type=float, default=5.0,
                    help="largest shard in GB (default 5, as save_pretrained: the default model is one file)")
    ap.add_argument("--json", default=None, help="write the measured figures here")
    ap.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        d, s, q, b, lim = a._worker
        _worker(d, int(s), int(q), int(b), int(lim))
        return

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="ld-stream-bench-"))
    model_dir = root / "llama-random"
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(model_dir, a.hidden, a.intermediate, a.layers, a.vocab, a.heads,
                                int(a.shard_gb * 1e9))
        files = sorted(model_dir.glob("*.safetensors"))
        biggest = max(f.stat().st_size for f in files)
        print(f"wrote {model_dir}: {a.layers} layers, hidden {a.hidden}, bf16, {size / GiB:.2f} GiB on disk in "
              f"{len(files)} shard(s), largest {biggest / GiB:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s, writer peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
        limit = int(a.limit_gib * GiB)

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, __file__, "--_worker", str(model_dir), str(a.samples), str(a.seq_len),
               str(a.batch_size), str(limit)]
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"scoring under RLIMIT_AS={a.limit_gib} GiB failed (exit {proc.returncode})")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        bound = r["layer_bytes"] + r["hidden_bytes"] + r["embedding_bytes"]
        print(f"scored {a.layers} layers x {a.samples} windows x {a.seq_len} tokens in {r['seconds']:.0f} s "
              f"under RLIMIT_AS = {a.limit_gib:.2f} GiB (model on disk: {size / GiB:.2f} GiB bf16, "
              f"{2 * size / GiB:.2f} GiB as float32)")
        print(f"  bound: one float32 layer {r['layer_bytes'] / GiB:.3f} + hidden states {r['hidden_bytes'] / GiB:.4f} "
              f"+ float32 embedding {r['embedding_bytes'] / GiB:.3f} = {bound / GiB:.3f} GiB (+ the Python/torch runtime)")
        print(f"  measured peak RSS {r['peak_rss'] / GiB:.3f} GiB, peak virtual {r['peak_virtual'] / GiB:.3f} GiB")
        above = r["peak_rss"] - r["runtime_rss"]
        verdict = "within" if above <= bound else "ABOVE"
        print(f"  peak RSS above the runtime (RSS {r['runtime_rss'] / GiB:.3f} GiB before scoring): "
              f"{above / GiB:.3f} GiB = {above / bound:.2f} x the bound ({verdict} it)")
        print(f"  attn scores: {[round(x, 4) for x in r['attn']]}")
        if a.json:
            Path(a.json).write_text(json.dumps({**r, "model_bytes": size, "largest_shard_bytes": biggest,
                                                "shards": len(files), "bound_bytes": bound,
                                                "rlimit_as_gib": a.limit_gib}, indent=2) + "\n")
    finally:
        if not a.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            if not a.dir:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
