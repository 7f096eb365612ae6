"""Quantize the trained (dropped) model at the end of fit: `QuantizeCallback`.

Runs in `on_train_end` on global rank zero: the model is saved to a temporary checkpoint (gptqmodel must
read a dropped model from disk, see `lightning_drop.measure.quantize`), quantized on CPU into `output`, and the
sizes, the time and, given held-out text, the perplexity before and after quantization (the shape of the
paper's Table 10) go to `trainer.loggers` (`self.log` is not allowed in this hook) and to
`output/lightning_drop_quant.json`. The other ranks wait at a barrier. It joins the fit's record as the
`quantize` measure (see `fit_end`) and quantizes the final model (`FitEnd.final_model`: fit-end drops done,
LoRA merged; a merged copy when the adapters stay attached), wherever it stands in the callback list;
under FSDP2 the model gathered on rank zero.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_drop.measure.quantize import QUANT_REPORT, check_args, require_backend

from ..errors import UserError
from ._common import log_to_loggers
from .fit_end import FitEndMeasurement


class QuantizeCallback(FitEndMeasurement):
    """GPTQ or AWQ of the trained model at fit end, saved so that `lightning_drop.io.model_loading.load_model` reloads it.

    Args:
        output: directory for the quantized checkpoint (replaced atomically if it exists).
        method: "gptq" or "awq".
        bits: 4 or 8.
        calibration: calibration text: a `.jsonl`/`.json`/`.txt`/`.parquet` file, an offline sample
            (`c4-sample`, the default) or a hub dataset spec (see `lightning_drop.io.text_data.load_documents`).
        num_samples, seq_len: calibration blocks (EOS after each document, concatenated, cut).
        group_size: None picks the largest of 128/64/32 dividing every quantized width.
        backend: "gptqmodel" (runs on CPU and GPU); "autoawq" and "auto-gptq" only explain why they cannot.
        eval_data: held-out text (same kinds of source as `calibration`); when given, perplexity of the dropped model and of its quantized copy.
        eval_windows, eval_seq_len, eval_skip_windows: held-out windows; `eval_skip_windows=None` skips as many
            tokens as calibration used (`num_samples * seq_len`), so the calibration text is not scored.
        dtype: calibration precision (None: see `lightning_drop.measure.quantize.quantize`).
        name: prefix of the logged metrics.
    """

    result_key, result_attr = "quantize", "result"

    def __init__(self, output: str, method: str = "gptq", bits: int = 4, calibration: str = "c4-sample",
                 num_samples: int = 64, seq_len: int = 512, group_size: int | None = None,
                 backend: str = "gptqmodel", eval_data: str | None = None, eval_windows: int = 16,
                 eval_seq_len: int = 512, eval_skip_windows: int | None = None, dtype: str | None = None,
                 name: str = "quant") -> None:
        method, bits, backend = check_args(method, bits, backend)
        if not isinstance(output, (str, os.PathLike)) or not str(output).strip():
            raise UserError("QuantizeCallback: output must be a directory path")
        if Path(output).exists() and not Path(output).is_dir():
            raise UserError(f"QuantizeCallback: output {output} exists and is not a directory")
        from lightning_drop.io.text_data import LOCAL_SUFFIXES

        for arg, src in (("calibration", calibration), ("eval_data", eval_data)):
            if arg == "calibration" and (not isinstance(src, str) or not src.strip()):
                raise UserError("QuantizeCallback: calibration must name a text file, a sample or a hub dataset")
            if src is not None and Path(src).suffix in LOCAL_SUFFIXES and not os.path.isfile(src):
                raise FileNotFoundError(f"QuantizeCallback: {arg} file not found: {src}")
        for arg, v, lo in (("num_samples", num_samples, 1), ("seq_len", seq_len, 2), ("eval_windows", eval_windows, 1),
                           ("eval_seq_len", eval_seq_len, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UserError(f"QuantizeCallback: {arg} must be an integer >= {lo}, got {v!r}")
        if eval_skip_windows is None:
            eval_skip_windows = -(-num_samples * seq_len // eval_seq_len)
        if isinstance(eval_skip_windows, bool) or not isinstance(eval_skip_windows, int) or eval_skip_windows < 0:
            raise UserError(f"QuantizeCallback: eval_skip_windows must be an integer >= 0, got {eval_skip_windows!r}")
        require_backend(backend)  # fail before training, not after it
        self.output, self.method, self.bits, self.backend = str(output), method, bits, backend
        self.calibration, self.num_samples, self.seq_len, self.group_size = calibration, num_samples, seq_len, group_size
        self.eval_data, self.eval_windows, self.eval_seq_len = eval_data, eval_windows, eval_seq_len
        self.eval_skip_windows, self.dtype, self.name = eval_skip_windows, dtype, name
        self.result: dict[str, Any] | None = None

    def quantize(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """Save `model`, quantize it into `self.output`, measure; returns the report (also written as JSON)."""
        from lightning_drop.io.dropped_checkpoint import atomic_write_text, save_dropped
        from lightning_drop.measure.quality_table import quality_report
        from lightning_drop.measure.quantize import quantize

        tmp = Path(tempfile.mkdtemp(prefix="ld-quantize-cb-"))
        try:
            src = save_dropped(model, tmp / "model", tokenizer=tokenizer)
            res = quantize(src, self.output, method=self.method, bits=self.bits, group_size=self.group_size,
                           calibration=self.calibration, num_samples=self.num_samples, seq_len=self.seq_len,
                           backend=self.backend, dtype=self.dtype).to_dict()
            if self.eval_data:
                res.update(quality_report(src, self.output, self.eval_data, seq_len=self.eval_seq_len,
                                          num_windows=self.eval_windows, skip_windows=self.eval_skip_windows))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(Path(self.output) / QUANT_REPORT, json.dumps(res, indent=2, sort_keys=True) + "\n")
        return res

    def metrics(self) -> dict[str, float]:
        """The numbers logged to `trainer.loggers`, under `<name>/`."""
        r = self.result or {}
        keys = {"size_before_mb": r.get("size_before_bytes", 0) / 1e6, "size_after_mb": r.get("size_after_bytes", 0) / 1e6,
                "seconds": r.get("seconds"), "dropped_perplexity": r.get("source_perplexity"),
                "quantized_perplexity": r.get("quantized_perplexity"),
                "perplexity_increase_pct": r.get("perplexity_increase_pct")}
        return {f"{self.name}/{k}": float(v) for k, v in keys.items() if v is not None and r}

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        from lightning_drop.callbacks.evaluation import hf_model_and_tokenizer

        # every rank: a pending fit-end drop is collective; a merged copy if the adapters stay attached
        model, tok = hf_model_and_tokenizer(trainer, pl_module, merged_copy=trainer.is_global_zero)
        if trainer.is_global_zero:
            from lightning_drop.measure.quantize import format_report

            was_training = model.training
            model.eval()
            try:
                self.result = self.quantize(model, tok)
            finally:
                model.train(was_training)
            log_to_loggers(trainer, self.metrics())
            rank_zero_info(format_report(self.result))
        trainer.strategy.barrier("QuantizeCallback")
        return self.result if trainer.is_global_zero else None


__all__ = ["QuantizeCallback"]
