"""Distillation step vs plain LoRA step: what the teacher costs per training step.

One Lightning fit of SmolLM2-135M with 8 attention layers dropped (`LayerDrop`, cosine) and LoRA adapters
trained by `Distillation`; its steps alternate between the distillation objective (student forward and
backward + one teacher forward under no_grad + the KL) and the plain LM loss on the same adapters (what
`LoRARecovery` trains), through `DropModule.set_training_objective`. Same model, optimizer, data and machine
load for both kinds; each step is timed from `on_train_batch_start` to `on_train_batch_end` (forward, backward,
optimizer step). The first `--warmup` steps of each kind are discarded; prints the ratio of the medians.
Target: <= 1.5x.

With `--teacher-logits DIR --k K` a third kind joins the rotation: distillation from the teacher's stored
top-K (`Distillation(teacher_logits=DIR)`: batch rows read from the memory-mapped store, the top-K KL plus
its tail bucket; no teacher forward). The store is written from the same teacher when the fit starts (its
time is printed) over the training windows the fit uses, or reused when DIR holds it; the three medians and
their ratios are printed side by side.

    python benchmarks/distill_step_cost.py [--steps 6] [--warmup 1] [--batch-size 4] [--seq-len 256]
        [--teacher-dtype bfloat16] [--hidden-weight 0] [--teacher-logits DIR --k 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import C4, machine_label, write_json  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

from lightning_drop.callbacks import Distillation, LayerDrop  # noqa: E402
from lightning_drop.lightning.datamodule import TextDataModule  # noqa: E402
from lightning_drop.lightning.module import DropModule  # noqa: E402


class Alternate(pl.Callback):
    """Steps rotate through the kinds (live-teacher distillation, plain LM loss, and with `stored` the stored
    top-k teacher); times each step."""

    def __init__(self, distill: Distillation, stored: Distillation | None = None) -> None:
        self.distill, self.stored = distill, stored
        self.kinds = ["distill", "lora"] + (["stored"] if stored is not None else [])
        self.times: dict[str, list[float]] = {kind: [] for kind in self.kinds}
        self._kind, self._t0 = "distill", 0.0
        self.store_s: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.stored is not None:  # the store from the live teacher (written, or reused when DIR holds it)
            t0 = time.perf_counter()
            self.stored.teacher = self.distill.teacher
            self.stored._open_store(trainer, pl_module)  # drops only its own reference to the teacher
            self.store_s = time.perf_counter() - t0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._kind = self.kinds[batch_idx % len(self.kinds)]
        pl_module.set_training_objective(None)
        if self._kind != "lora":
            pl_module.set_training_objective((self.distill if self._kind == "distill" else self.stored).objective)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times[self._kind].append(time.perf_counter() - self._t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--drop", type=int, default=8, help="attention layers to drop")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps of each kind")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--teacher-dtype", default=None)
    p.add_argument("--hidden-weight", type=float, default=0.0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--teacher-logits", default=None, metavar="DIR",
                   help="also time distillation from the teacher's top-k stored in DIR (written when absent)")
    p.add_argument("--k", type=int, default=64, help="tokens per position in the store")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    source = str(C4) if C4.is_file() else "c4-sample"
    module = DropModule(a.model, lr=1e-4)
    kinds = 3 if a.teacher_logits else 2
    steps = kinds * (a.warmup + a.steps)
    data = TextDataModule(tokenizer=a.model, source=source, seq_len=a.seq_len, batch_size=a.batch_size,
                          calibration_samples=4, max_train_windows=steps * a.batch_size if a.teacher_logits else None)
    distill = Distillation(trainable="lora", r=a.r, lora_alpha=2 * a.r, teacher_dtype=a.teacher_dtype,
                           hidden_weight=a.hidden_weight)
    stored = None if not a.teacher_logits else Distillation(teacher_logits=a.teacher_logits, teacher_logits_k=a.k)
    alternate = Alternate(distill, stored)
    trainer = pl.Trainer(accelerator=a.accelerator, devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[LayerDrop(target="attn", num=a.drop, calibration_batch_size=2, verbose=False),
                                    distill, alternate])
    trainer.fit(module, data)
    lora, kd = alternate.times["lora"][a.warmup:], alternate.times["distill"][a.warmup:]
    m_lora, m_kd = statistics.median(lora), statistics.median(kd)
    device = str(trainer.strategy.root_device)
    res = {"date": date.today().isoformat(), "machine": machine_label(f"device {device}"),
           "model": a.model, "dropped_attention": module.drop_plan()[0], "tokens_per_step": a.batch_size * a.seq_len,
           "lora_r": a.r, "teacher_dtype": a.teacher_dtype or "as the student", "hidden_weight": a.hidden_weight,
           "lora_step_s": m_lora, "distill_step_s": m_kd, "ratio": m_kd / m_lora,
           "lora_steps_s": lora, "distill_steps_s": kd}
    print(f"distillation step cost on {a.model} with {a.drop} attention layers dropped, LoRA r={a.r}, "
          f"{a.batch_size} x {a.seq_len} tokens per step, median of {len(kd)} alternating steps of each kind "
          f"({res['date']}, {res['machine']})")
    print(f"  plain LoRA step (LM loss)            {m_lora:8.3f} s")
    print(f"  distillation step (+ teacher, KL)    {m_kd:8.3f} s")
    print(f"  ratio                                {m_kd / m_lora:8.3f}x  (target <= 1.5x)")
    if stored is not None:
        top = alternate.times["stored"][a.warmup:]
        m_top = statistics.median(top)
        res.update({"teacher_logits_k": a.k, "stored_step_s": m_top, "stored_steps_s": top,
                    "stored_vs_lora": m_top / m_lora, "stored_vs_live": m_top / m_kd, "store_s": alternate.store_s,
                    "store_windows": len(stored._store)})
        print(f"  stored top-{a.k} step (no teacher)      {m_top:8.3f} s   {m_top / m_lora:6.3f}x plain LoRA, "
              f"{m_top / m_kd:6.3f}x live teacher")
        print(f"  store for {len(stored._store)} windows written or opened in {alternate.store_s:.1f} s")
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
