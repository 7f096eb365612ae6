"""Speed and memory at fit end (`SpeedBenchmark`): prefill / decode timing, KV bytes, sizes, SDR.

Runs in `on_train_end` on `trainer.strategy.root_device`; logs through `trainer.loggers`; rank zero only.
It joins the fit's record as the `speed` measure (see `fit_end`) and times the final model
(`FitEnd.final_model`: fit-end drops done, LoRA merged; a merged copy when the adapters stay attached),
wherever it stands in the callback list; the SDR takes the `lm_eval` result of the same fit (measured first
if its callback comes later in the list). Under FSDP2 it measures the model gathered on rank zero.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_drop.callbacks._common import log_to_loggers
from lightning_drop.callbacks.evaluation import to_root_device
from lightning_drop.callbacks.fit_end import FitEnd, FitEndMeasurement, final_model

from ..errors import UserError


class SpeedBenchmark(FitEndMeasurement):
    """Time the trained (dropped) model, alternately with a baseline when one is named.

    Args:
        baseline: model reference for `lightning_drop.io.model_loading.load_model` (dir, catalogue name, hub id); with
            it the speedup, KV and parameter ratios are reported, and the SDR when `baseline_avg` is given and
            an `LMEvalCallback` of the same fit (anywhere in the callback list) measures the dropped model's
            average.
        batch_size, prompt_len, gen_len, repeats, warmup: the workload (median of `repeats` after `warmup`).
        ideal: also profile the baseline for the ideal speedup of this model's drop and the realized gain.
        baseline_avg: the baseline's average quality (same tasks as the LMEvalCallback), for the SDR.
        output: JSON file (atomic, rank zero).
    """

    result_key = "speed"

    def __init__(self, baseline: str | None = None, batch_size: int = 1, prompt_len: int = 128, gen_len: int = 128,
                 repeats: int = 3, warmup: int = 1, ideal: bool = False, baseline_avg: float | None = None,
                 output: str | None = None, prefix: str = "speed/") -> None:
        for arg, v, lo in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1), ("gen_len", gen_len, 2),
                           ("repeats", repeats, 1), ("warmup", warmup, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UserError(f"SpeedBenchmark: {arg} must be an integer >= {lo}, got {v!r}")
        if ideal and not baseline:
            raise UserError("SpeedBenchmark: ideal=True needs a `baseline` to profile")
        if baseline_avg is not None and not baseline_avg > 0:
            raise UserError(f"SpeedBenchmark: baseline_avg must be > 0, got {baseline_avg!r}")
        self.baseline, self.batch_size, self.prompt_len, self.gen_len = baseline, batch_size, prompt_len, gen_len
        self.repeats, self.warmup, self.ideal, self.baseline_avg = repeats, warmup, ideal, baseline_avg
        self.output, self.prefix = output, prefix
        self.results: dict[str, Any] | None = None

    def measure(self, model: Any, base: Any = None, dropped_avg: float | None = None) -> dict[str, Any]:
        from lightning_drop.measure import ideal_speedup, speed

        args = (self.batch_size, self.prompt_len, self.gen_len, self.repeats, self.warmup)
        if base is None:
            res = {"dropped": speed.measure_generation(model, *args), "peak_rss_bytes": speed.peak_rss_bytes()}
            return res
        res = speed.compare_speed(base, model, *args)
        if self.ideal:
            from lightning_drop.core.modeling_dropped import dropped_layers

            attn, mlp = dropped_layers(model)
            prof = ideal_speedup.profile_drop(base, attn, mlp, *args)
            res["ideal_speedup"] = prof["total"]["ideal_speedup"]
            if res["ideal_speedup"] != 1:
                res["realized_gain"] = ideal_speedup.realized_gain(res["speedup"]["total"], res["ideal_speedup"])
        if self.baseline_avg is not None and dropped_avg is not None:
            res["sdr"] = speed.sdr(self.baseline_avg, dropped_avg, res["speedup"]["total"])
        return res

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        record = FitEnd.of(trainer)
        lm_eval = record.result(trainer, pl_module, "lm_eval") if self.baseline_avg is not None else None
        model = final_model(trainer, pl_module, merged_copy=trainer.is_global_zero)  # every rank: a drop is collective
        if trainer.is_global_zero:
            from lightning_drop.io.model_loading import load_model

            to_root_device(trainer, model)
            base = None
            if self.baseline:
                base, _ = load_model(self.baseline, dtype=next(model.parameters()).dtype)
                base.to(trainer.strategy.root_device)
            dropped_avg = lm_eval.get("average") if lm_eval else None
            res = self.measure(model, base, dropped_avg)
            res["global_step"] = trainer.global_step
            self.results = res
            d = res["dropped"]
            metrics = {"prefill_s": d["prefill_s"], "decode_s": d["decode_s"],
                       "decode_tokens_per_s": d["decode_tokens_per_s"], "kv_bytes_per_token": d["kv_bytes_per_token"],
                       "params": d["params"], "weight_bytes": d["weight_bytes"], "peak_rss_bytes": res["peak_rss_bytes"]}
            for k, v in (res.get("speedup") or {}).items():
                metrics[f"speedup_{k}"] = v
            for k in ("kv_ratio", "ideal_speedup", "realized_gain", "sdr"):
                if res.get(k) is not None:
                    metrics[k] = res[k]
            log_to_loggers(trainer, {f"{self.prefix}{k}": v for k, v in metrics.items()})
            if self.output:
                from lightning_drop.io.atomic_io import write_json

                write_json(self.output, res)
            from lightning_drop.measure.speed import print_speed

            print_speed(res)
            del base
        trainer.strategy.barrier("SpeedBenchmark")
        return self.results if trainer.is_global_zero else None
