"""Anonymous memory of layer-streamed scoring (`drop --stream`) per layer: it must not grow with depth.

For each case — a float32 and a bfloat16 checkpoint, each in many shards and in one file — a random-init
Llama is written tensor by tensor, then a subprocess whose address space is capped (`RLIMIT_AS`) scores it
with `lightning_drop.scoring.streaming.stream_importance` (float32 compute) and writes the dropped checkpoint with
`write_dropped_streaming`, while a thread samples `RssAnon` in /proc/self/status every few milliseconds.
Per case it prints:

- the peak anonymous memory while each layer is scored, its growth per layer (least-squares slope over
  layers 1..N-1, in MiB and in float32 layers' worth) and the peak at the last layer minus that at layer N/2;
- the peak anonymous memory of the whole run and of the checkpoint write, against the model size and the
  bound (one float32 layer + hidden states + float32 embedding, above the runtime);
- peak RSS (`VmHWM`, what `/usr/bin/time` reports as maximum resident set size) and peak virtual size
  (`VmPeak`) against the cap.

It exits non-zero, naming the case, when the per-layer growth of any case exceeds `--tolerance` layers per
layer (and `--floor-mib` MiB per layer), or when a case fails under the address-space cap.

    .venv/bin/python benchmarks/streaming_memory.py [--layers 40] [--hidden 1024] [--limit-gib 2.5] [--json f]
    # the earlier single-file case (4.0 GiB of bf16 weights in one file; earlier untied, 4.26 GiB):
    .venv/bin/python benchmarks/streaming_memory.py --hidden 4096 --intermediate 11008 --heads 32 \\
        --vocab 32000 --layers 10 --dtypes bfloat16 --shards one --limit-gib 3

Defaults: 40 layers, hidden 1024, MLP 4096, vocabulary 49152, tied embedding (2.7 GB in float32, 1.4 GB
in bfloat16), shards of 500 MB; 4 windows x 128 tokens; about 2 minutes on 2 CPU cores.

Measured 2026-12-02 (2-core CPU VM, torch 2.13, transformers 5.24, glibc 2.36; defaults):

    checkpoint            model  layer    anon  growth per layer last-N/2        peak anon  write        max RSS virtual
                            GiB    MiB runtime      MiB (layers)      MiB    GiB (x model)    GiB  GiB (x model)     GiB
    float32, 6 x 500MB     2.69     64   0.320    +0.34 (+0.005)    +16.3    0.512 (0.19x)  0.523  0.730 (0.27x)   1.491
    float32, one file      2.69     64   0.320    -0.05 (-0.001)     -2.6    0.510 (0.19x)  0.522  0.728 (0.27x)   1.473
    bfloat16, 3 x 500MB    1.34     64   0.320    +0.04 (+0.001)    +10.3    0.528 (0.39x)  0.429  0.723 (0.54x)   1.368
    bfloat16, one file     1.34     64   0.320    +0.10 (+0.002)     +2.1    0.523 (0.39x)  0.428  0.723 (0.54x)   1.368

Before every layer was read into one reused buffer (with `--limit-gib 3`, as the default cap failed three
of the four cases): float32, 6 x 500MB grew +46.4 MiB per layer (0.725 layers), peak anonymous 2.08 GiB,
max RSS 2.29 GiB = 0.85x the model; float32 in one file ran out of the 3 GiB address space; the bfloat16
files did not grow while scoring (a different allocation pattern: each read is cast to a new float32 tensor)
but writing held a whole output shard: 1.62 GiB of anonymous memory for the one-file case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GiB, MiB = 2**30, 2**20
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


# ---------------------------------------------------------------------------------------------- checkpoint
def _tensor_specs(hidden: int, inter: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, random) of a tied-embedding LlamaForCausalLM; norms (random False) are ones."""
    specs = [("model.embed_tokens.weight", (vocab, hidden), True)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden), True) for n in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", (inter, hidden), True),
                  (p + "mlp.up_proj.weight", (inter, hidden), True),
                  (p + "mlp.down_proj.weight", (hidden, inter), True),
                  (p + "input_layernorm.weight", (hidden,), False),
                  (p + "post_attention_layernorm.weight", (hidden,), False)]
    return specs + [("model.norm.weight", (hidden,), False)]


def write_checkpoint(out: Path, hidden: int, inter: int, layers: int, vocab: int, heads: int, dtype: str,
                     shard_bytes: int) -> tuple[int, int]:
    """Random-init checkpoint in safetensors shards of up to `shard_bytes` (one shard: `model.safetensors`,
    no index), written one tensor at a time so the writer never holds more than a tensor.
    Returns (bytes of the weights, number of files)."""
    import torch
    from transformers import LlamaConfig

    torch_dtype = getattr(torch, dtype)
    itemsize = torch_dtype.itemsize
    specs = _tensor_specs(hidden, inter, layers, vocab)
    shards: list[list[int]] = [[]]
    size = 0
    for j, (_, shape, _) in enumerate(specs):
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    out.mkdir(parents=True, exist_ok=True)
    total, weight_map = 0, {}
    for file_name, members in zip(names, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for j in members:
            name, shape, _ = specs[j]
            nbytes = math.prod(shape) * itemsize
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(out / file_name, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for j in members:
                _, shape, random = specs[j]
                if random:  # the same values for every dtype: seeded by the tensor's position
                    t = torch.randn(shape, generator=torch.Generator().manual_seed(j)).mul_(0.02).to(torch_dtype)
                else:
                    t = torch.ones(shape, dtype=torch_dtype)
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        total += offset
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                tie_word_embeddings=True, dtype=dtype).save_pretrained(out)
    return total, len(shards)


# ---------------------------------------------------------------------------------- the capped subprocess
def _status() -> dict[str, int]:
    """Bytes of the memory fields of /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS", "VmHWM", "VmPeak"):
            out[key] = int(value.split()[0]) * 1024
    return out


class _AnonSampler(threading.Thread):
    """Peak RssAnon since the last `take()`, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.overall = interval, 0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> int:
        anon = _status()["RssAnon"]
        self.peak, self.overall = max(self.peak, anon), max(self.overall, anon)
        return anon

    def take(self) -> int:
        """The peak since the previous call (including now), and start a new window."""
        peak = max(self.peak, self.sample())
        self.peak = 0
        return peak

    def stop(self) -> None:
        self._done.set()
        self.join()


def _worker(model_dir: str, out_dir: str, samples: int, seq_len: int, batch_size: int, shard_size: str) -> None:
    """Score and write the dropped checkpoint; print the memory figures as one JSON line."""
    import torch

    from lightning_drop.scoring.streaming import stream_importance
    from lightning_drop.scoring.streamed_writer import write_dropped_streaming

    torch.set_num_threads(2)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    windows = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    sampler = _AnonSampler()
    sampler.start()
    runtime = sampler.take()
    per_layer: list[int] = []
    stats: dict = {}
    t0 = time.perf_counter()
    scores = stream_importance(model_dir, windows, batch_size=batch_size, dtype=torch.float32, stats=stats,
                               on_layer=lambda i, layer: per_layer.append(sampler.take()))
    scoring = time.perf_counter() - t0
    score_peak = max(sampler.overall, sampler.take())
    n = len(scores.attn)
    attn = sorted(range(n), key=lambda i: scores.attn[i])[:max(1, n // 5)]
    t0 = time.perf_counter()
    write_dropped_streaming(model_dir, out_dir, attn=attn, max_shard_size=shard_size)
    writing = time.perf_counter() - t0
    write_peak = sampler.take()
    sampler.stop()
    status = _status()
    print(json.dumps({"runtime_anon": runtime, "per_layer_anon": per_layer, "score_peak_anon": score_peak,
                      "write_peak_anon": write_peak, "peak_rss": status["VmHWM"], "peak_virtual": status["VmPeak"],
                      "scoring_s": scoring, "writing_s": writing, "attn": scores.attn, **stats}))


# -------------------------------------------------------------------------------------------------- report
def growth(per_layer: list[int]) -> tuple[float, int]:
    """(least-squares slope in bytes per layer over layers 1..N-1, peak at the last layer - peak at N/2).
    Layer 0 is left out of the fit: it carries the first forward's one-time allocations."""
    ys = per_layer[1:]
    if len(ys) < 2:
        return 0.0, 0
    xs = range(len(ys))
    mx, my = sum(xs) / len(ys), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, per_layer[-1] - per_layer[len(per_layer) // 2]


def run_case(root: Path, a: argparse.Namespace, dtype: str, shards: str, limit: int) -> dict[str, Any]:
    model_dir, out_dir = root / f"llama-{dtype}-{shards}", root / f"dropped-{dtype}-{shards}"
    shard_bytes = int(a.shard_mb * 1e6) if shards == "many" else 2**62
    try:
        t0 = time.perf_counter()
        size, files = write_checkpoint(model_dir, a.hidden, a.intermediate, a.layers, a.vocab, a.heads, dtype,
                                       shard_bytes)
        made = time.perf_counter() - t0

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
        shard_size = f"{a.shard_mb}MB" if shards == "many" else "1000GB"
        cmd = [sys.executable, __file__, "--_worker", str(model_dir), str(out_dir), str(a.samples), str(a.seq_len),
               str(a.batch_size), shard_size]
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return {"dtype": dtype, "shards": shards, "files": files, "model_bytes": size,
                    "error": f"failed under RLIMIT_AS = {limit / GiB:.2f} GiB (exit {proc.returncode})"}
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        slope, half = growth(r["per_layer_anon"])
        return {"dtype": dtype, "shards": shards, "files": files, "model_bytes": size, "write_checkpoint_s": made,
                "slope_bytes_per_layer": slope, "last_minus_half_bytes": half,
                "slope_layers_per_layer": slope / r["layer_bytes"], **r}
    finally:
        if not a.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)


def _label(r: dict[str, Any], shard_mb: int) -> str:
    return f"{r['dtype']}, " + (f"{r['files']} x {shard_mb}MB" if r["shards"] == "many" else "one file")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="checkpoint dtypes (comma-separated)")
    ap.add_argument("--shards", default="many,one", help="many (--shard-mb each) and/or one file")
    ap.add_argument("--shard-mb", type=int, default=500, help="shard size of the 'many' case, also the written one")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--limit-gib", type=float, default=2.5,
                    help="RLIMIT_AS of the scoring process (default: below the default float32 model's size)")
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="largest allowed growth of the per-layer peak, in float32 layers per layer "
                         "(the fit is noisy below ~20 layers)")
    ap.add_argument("--floor-mib", type=float, default=1.0,
                    help="growth below this many MiB per layer passes whatever the layer size (sampling noise)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="do not delete the checkpoints")
    ap.add_argument("--json", default=None, help="write the measured figures here")
    ap.add_argument("--_worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        d, o, s, q, b, shard = a._worker
        _worker(d, o, int(s), int(q), int(b), shard)
        return
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    shard_kinds = [s.strip() for s in a.shards.split(",") if s.strip()]
    bad = [d for d in dtypes if d not in ST_DTYPES] + [s for s in shard_kinds if s not in ("many", "one")]
    if bad:
        raise SystemExit(f"unknown --dtypes/--shards value(s): {', '.join(bad)}")

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="ld-stream-bench-"))
    limit = int(a.limit_gib * GiB)
    print(f"{a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, vocabulary {a.vocab}; {a.samples} windows x "
          f"{a.seq_len} tokens, batch {a.batch_size}; float32 scoring under RLIMIT_AS = {a.limit_gib:.2f} GiB")
    results = []
    try:
        for dtype in dtypes:
            for shards in shard_kinds:
                results.append(run_case(root, a, dtype, shards, limit))
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)

    print(f"{'checkpoint':<20} {'model':>6} {'layer':>6} {'anon':>7} {'growth per layer':>17} {'last-N/2':>8} "
          f"{'peak anon':>16} {'write':>6} {'max RSS':>14} {'virtual':>7} {'s':>4}")
    print(f"{'':<20} {'GiB':>6} {'MiB':>6} {'runtime':>7} {'MiB (layers)':>17} {'MiB':>8} "
          f"{'GiB (x model)':>16} {'GiB':>6} {'GiB (x model)':>14} {'GiB':>7}")
    failures = []
    for r in results:
        label = _label(r, a.shard_mb)
        if "error" in r:
            print(f"{label:<20} {r['model_bytes'] / GiB:>6.2f}  {r['error']}")
            failures.append(f"{label}: {r['error']}")
            continue
        size = r["model_bytes"]
        grow = f"{r['slope_bytes_per_layer'] / MiB:+.2f} ({r['slope_layers_per_layer']:+.3f})"
        peak = f"{r['score_peak_anon'] / GiB:.3f} ({r['score_peak_anon'] / size:.2f}x)"
        rss = f"{r['peak_rss'] / GiB:.3f} ({r['peak_rss'] / size:.2f}x)"
        print(f"{label:<20} {size / GiB:>6.2f} {r['layer_bytes'] / MiB:>6.0f} {r['runtime_anon'] / GiB:>7.3f} "
              f"{grow:>17} {r['last_minus_half_bytes'] / MiB:>+8.1f} {peak:>16} {r['write_peak_anon'] / GiB:>6.3f} "
              f"{rss:>14} {r['peak_virtual'] / GiB:>7.3f} {r['scoring_s'] + r['writing_s']:>4.0f}")
        if r["slope_layers_per_layer"] > a.tolerance and r["slope_bytes_per_layer"] > a.floor_mib * MiB:
            failures.append(f"{label}: anonymous memory grows {r['slope_bytes_per_layer'] / MiB:.1f} MiB per layer "
                            f"= {r['slope_layers_per_layer']:.3f} float32 layers per layer (tolerance {a.tolerance})")
    ok = [r for r in results if "error" not in r]
    if ok:
        r = ok[0]
        bound = r["layer_bytes"] + r["hidden_bytes"] + r["embedding_bytes"]
        print(f"bound above the runtime: one float32 layer {r['layer_bytes'] / GiB:.3f} + hidden states "
              f"{r['hidden_bytes'] / GiB:.4f} + float32 embedding {r['embedding_bytes'] / GiB:.3f} = "
              f"{bound / GiB:.3f} GiB")
        for r in ok:
            above = max(r["score_peak_anon"], r["write_peak_anon"]) - r["runtime_anon"]
            capped = "below" if limit < r["model_bytes"] else "above"
            print(f"  {_label(r, a.shard_mb)}: peak anon above the runtime {above / GiB:.3f} GiB = "
                  f"{above / bound:.2f} x the bound; cap {a.limit_gib:.2f} GiB is {capped} the "
                  f"{r['model_bytes'] / GiB:.2f} GiB model")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2) + "\n")
    if failures:
        raise SystemExit("FAIL: memory grows with the number of layers or the run failed:\n  " + "\n  ".join(failures))
    print(f"OK: per-layer growth within {a.tolerance} float32 layers (or {a.floor_mib} MiB) per layer in every case")


if __name__ == "__main__":
    main()
