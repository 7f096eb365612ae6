"""Distillation step vs plain LoRA step: what the teacher costs per training step.

One Lightning fit of SmolLM2-135M with 8 attention layers dropped (`LayerDrop`, cosine) and LoRA adapters
trained by `Distillation`; its steps alternate between the distillation objective (student forward and
backward + one teacher forward under no_grad + the KL) and the plain LM loss on the same adapters (what
`LoRARecovery` trains), through `DropModule.set_training_objective`. Same model, optimizer, data and machine
load for both kinds; each step is timed from `on_train_batch_start` to `on_train_batch_end` (forward, backward,
optimizer step). The first `--warmup` steps of each kind are discarded; prints the ratio of the medians.
Target: <= 1.5x.

    python benchmarks/distill_step_cost.py [--steps 6] [--warmup 1] [--batch-size 4] [--seq-len 256]
        [--teacher-dtype bfloat16] [--hidden-weight 0] [--json out.json]
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
from lightning_drop.lightning_datamodule import TextDataModule  # noqa: E402
from lightning_drop.lightning_module import DropModule  # noqa: E402


class Alternate(pl.Callback):
    """Even steps train on the distillation objective, odd steps on the plain LM loss; times each step."""

    def __init__(self, distill: Distillation) -> None:
        self.distill = distill
        self.times: dict[str, list[float]] = {"distill": [], "lora": []}
        self._kind, self._t0 = "distill", 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._kind = "distill" if batch_idx % 2 == 0 else "lora"
        pl_module.set_training_objective(None)
        if self._kind == "distill":
            pl_module.set_training_objective(self.distill.objective)
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
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    source = str(C4) if C4.is_file() else "c4-sample"
    module = DropModule(a.model, lr=1e-4)
    data = TextDataModule(tokenizer=a.model, source=source, seq_len=a.seq_len, batch_size=a.batch_size,
                          calibration_samples=4)
    distill = Distillation(trainable="lora", r=a.r, lora_alpha=2 * a.r, teacher_dtype=a.teacher_dtype,
                           hidden_weight=a.hidden_weight)
    alternate = Alternate(distill)
    trainer = pl.Trainer(accelerator=a.accelerator, devices=1, max_steps=2 * (a.warmup + a.steps), logger=False,
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
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
