"""Peak memory per rank of a 2-process fit under DDP and under FSDP2, and rank zero's peak while it writes the
dropped checkpoint from sharded weights.

A random-init Llama (default about 1.3B parameters: hidden 2048, MLP 5632, 22 layers, vocabulary 49152
with SmolLM2's tokenizer) is
written as safetensors, then trained for `--steps` steps on 2 CPU processes (gloo) twice, each time through
`lightning-drop fit`:

- DDP: `DropModule(model=DIR)` loads the whole model on every rank;
- FSDP2: `DropModule(model=DIR, load_sharded=true)` builds it on the meta device, shards every decoder layer
  and the root, and each rank reads only its rows from the safetensors files; at fit end
  `save_dir` gathers one layer at a time to rank zero, which writes the dropped checkpoint (attention of the
  last `--drop` layers dropped beforehand in the config) with the streamed writer.

Each rank reports its peak RSS (`VmHWM`) at the end of training and, on rank zero under FSDP2, the peak of the
checkpoint write (the peak is reset just before it through /proc/self/clear_refs), twice in the same run:
with every tensor gathered and written whole (as before row slices) and as `save_dir` writes it (tensors
larger than a slice in row slices). Ratios are to the weight bytes of the model and to DDP's peak. Both runs
train plain weights with AdamW (weights, gradients and optimizer state are what FSDP2 divides).

    python benchmarks/fsdp_memory.py [--hidden 2048 --intermediate 5632 --layers 22 --vocab 49152] [--steps 2]
        [--strategies ddp fsdp2] [--compare-drops] [--json out.json]

With `--compare-drops` the FSDP2 fit also drops one attention sublayer mid-fit the whole-model way and one
layer by layer (`DropPaths`), and prints each one's seconds and peak RSS side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]


def _vm(field: str) -> int:
    """A field of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (the next peak read is that of what follows); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory(pl.Callback):
    """Writes this rank's peak RSS after training, and the peak of what follows (the checkpoint write).

    Under FSDP2 with `compare_whole`, the dropped checkpoint is first written once more, to a directory of its
    own, with every tensor whole (`slice_bytes=None`: how it was written before tensors left the ranks in row
    slices), and that write's peak is recorded too (`whole_peak`, from `whole_before`); the module then writes
    its own, sliced, as in any fit. Callbacks' `on_train_end` runs before the module's.
    """

    def __init__(self, output: str, compare_whole: bool = False) -> None:
        self.output = output
        self.compare_whole = compare_whole
        self.record: dict[str, Any] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record = {"rank": trainer.global_rank, "train_peak": _vm("VmHWM"), "after_train": _vm("VmRSS")}
        if self.compare_whole and getattr(pl_module, "save_path", None):
            from lightning_drop.lightning.distributed import drop_gathered, save_sharded

            self.record["whole_before"] = _vm("VmRSS")
            _reset_peak()
            save_sharded(pl_module, pl_module.save_path + "_whole", slice_bytes=None)
            drop_gathered(pl_module)  # the module's own write gathers again, in slices
            self.record["whole_peak"] = _vm("VmHWM")
            self.record["after_train"] = _vm("VmRSS")
        self.record["reset"] = _reset_peak()  # the next peak is the (sliced) write's

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.record:
            self.record["end_peak"] = _vm("VmHWM")
            Path(f"{self.output}.rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class DropPaths(pl.Callback):
    """Under FSDP2, drops one attention sublayer after step 1 the whole-model way (every rank gathers the whole
    model, drops, shards it again) and one after step 2 layer by layer (only the changed layer is gathered,
    rebuilt and sharded again), each followed by the optimizers' rebuild; records each one's seconds and peak
    RSS above the RSS before it, in one run on the same model."""

    def __init__(self, output: str, layers: list[int]) -> None:
        self.output = output
        self.layers = layers
        self.record: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        from lightning_drop.callbacks._common import rebuild_optimizers
        from lightning_drop.core.modeling_dropped import apply_drop

        step = trainer.global_step
        if step not in (1, 2):
            return
        path, layer = ("whole", self.layers[0]) if step == 1 else ("layer", self.layers[1])
        before, start = _vm("VmRSS"), time.perf_counter()
        _reset_peak()
        if path == "whole":
            pl_module.unshard()
            apply_drop(pl_module.hf_model, attn=[layer])
        else:
            pl_module.apply_drop([layer], [])
        rebuild_optimizers(trainer, pl_module)
        trainer.strategy.barrier("drop_paths")
        self.record[path] = {"seconds": time.perf_counter() - start, "rise": _vm("VmHWM") - before, "layer": layer}
        if step == 2:
            Path(f"{self.output}.rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def write_model(directory: Path, args: argparse.Namespace) -> int:
    """A random-init Llama saved as safetensors; returns its weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="500MB")
    from lightning_drop.io.model_loading import load_tokenizer

    load_tokenizer("smollm2-135m").save_pretrained(directory)  # a real tokenizer of that vocabulary
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return size


def run_fit(work: Path, model_dir: Path, strategy: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    sharded = strategy == "fsdp2"
    steps = max(args.steps, 3) if sharded and args.compare_drops else args.steps  # drops after steps 1 and 2
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.lightning.module.DropModule",
                  "init_args": {"model": str(model_dir), "load_sharded": sharded,
                                "optimizer": "adamw", "lr": 1.0e-5,
                                **({"save_dir": str(work / "dropped")} if sharded else {})}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
                 "init_args": {"tokenizer": str(model_dir), "source": args.data, "seq_len": args.seq_len,
                               "batch_size": 1, "limit_documents": 20, "calibration_samples": 2}},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": strategy, "max_steps": steps,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "fsdp_memory.PeakMemory",
                                   "init_args": {"output": str(work / "peak"), "compare_whole": sharded}},
                                  *([{"class_path": "fsdp_memory.DropPaths",
                                      "init_args": {"output": str(work / "drops"), "layers": [1, 2]}}]
                                    if sharded and args.compare_drops else [])]},
    }
    path = work / "config.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lightning_drop.cli", "fit", "--config", str(path)], cwd=work,
                          env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} fit failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    records = [json.loads((work / f"peak.rank{r}.json").read_text()) for r in (0, 1)]
    for r, rec in enumerate(records):
        drops = work / f"drops.rank{r}.json"
        if drops.is_file():
            rec["drops"] = json.loads(drops.read_text())
    return records, seconds


def drop_last_attention(model_dir: Path, count: int) -> None:
    """Mark the attention of the last `count` layers dropped in config.json, as `lightning-drop drop` would."""
    from lightning_drop.core.modeling_dropped import apply_drop
    from lightning_drop.lightning.sharded_weights import empty_model

    import torch

    model = empty_model(model_dir, torch.float32)
    n = model.config.num_hidden_layers
    apply_drop(model, attn=list(range(n - count, n)))
    model.config.save_pretrained(model_dir)  # the weights of the dropped attention stay (unused) in the files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)  # SmolLM2's tokenizer, saved with the model
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--drop", type=int, default=2, help="attention sublayers dropped before the fit")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "c4_demo.jsonl"))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--strategies", nargs="+", choices=("ddp", "fsdp2"), default=["ddp", "fsdp2"],
                        help="fsdp2 alone for the write's peak where two DDP ranks do not fit in memory")
    parser.add_argument("--compare-drops", action="store_true",
                        help="FSDP2: a mid-fit drop the whole-model way, then one layer by layer (3 steps at least)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fsdp_memory_") as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        weights = write_model(model_dir, args)
        drop_last_attention(model_dir, args.drop)
        results: dict[str, Any] = {"weight_bytes": weights, "args": vars(args)}
        for strategy in args.strategies:
            work = root / strategy
            work.mkdir()
            records, seconds = run_fit(work, model_dir, strategy, args)
            results[strategy] = {"ranks": records, "seconds": seconds}
    gib = 2 ** 30
    from _common import machine_label  # benchmarks/_common.py, next to this script

    print(f"model: {weights / gib:.2f} GiB of float32 weights "
          f"({weights // 4 / 1e9:.2f}B parameters), {args.steps} AdamW steps on 2 CPU processes"
          f"{' (FSDP2: 3, with drops after steps 1 and 2)' if args.compare_drops else ''}; {machine_label()}")
    print(f"{'strategy':8} {'rank':>4} {'peak RSS GiB':>12} {'x weights':>9} {'x DDP':>6}")
    for strategy in args.strategies:
        for rank, rec in enumerate(results[strategy]["ranks"]):
            ddp = results["ddp"]["ranks"][rank]["train_peak"] if "ddp" in results else None
            print(f"{strategy:8} {rank:>4} {rec['train_peak'] / gib:12.2f} {rec['train_peak'] / weights:9.2f} "
                  f"{rec['train_peak'] / ddp if ddp else float('nan'):6.2f}")
    writer = results["fsdp2"]["ranks"][0] if "fsdp2" in results else {}
    if writer.get("reset"):
        print("FSDP2 rank 0 writing the dropped checkpoint (peak above the RSS before the write, x the weight bytes):")
        if "whole_peak" in writer:
            rise = writer["whole_peak"] - writer["whole_before"]
            print(f"  tensors whole (before):  +{rise / gib:.3f} GiB = {rise / weights:.3f}x  "
                  f"(peak {writer['whole_peak'] / gib:.2f} GiB)")
        rise = writer["end_peak"] - writer["after_train"]
        print(f"  row slices (now):        +{rise / gib:.3f} GiB = {rise / weights:.3f}x  "
              f"(peak {writer['end_peak'] / gib:.2f} GiB; {writer['after_train'] / gib:.2f} GiB before the write: "
              "its shards, optimizer state and runtime)")
    for rank, rec in enumerate(results.get("fsdp2", {}).get("ranks", [])):
        for path, label in (("whole", "whole model gathered"), ("layer", "changed layer only  ")):
            if path in rec.get("drops", {}):
                d = rec["drops"][path]
                print(f"FSDP2 rank {rank} drop, {label}: {d['seconds']:6.2f} s, peak RSS +{d['rise'] / gib:.3f} GiB "
                      f"= {d['rise'] / weights:.3f}x the weights")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
