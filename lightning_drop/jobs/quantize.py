"""`lightning-drop quantize`: 4/8-bit AWQ or GPTQ of a saved (dropped) model, with the quality table.

The quantizer is `lightning_drop.measure.quantize`'s, looked up on that module when the command runs (so a replaced
backend is the one used); the quality table is `lightning_drop.measure.quality_table`'s. Nothing heavy is imported
until it runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ..io.atomic_io import atomic_write_text
from ..io.output_targets import check_output
from ..errors import UserError

Method = Literal["awq", "gptq"]
QuantDtype = Literal["float32", "bfloat16", "float16"]


def default_baseline_output(output: str | os.PathLike) -> Path:
    """Where `quantize_main` puts the quantized baseline unless told: a sibling `<output>-baseline`."""
    out = Path(output)
    return out.with_name(out.name + "-baseline")


def quantize_main(model: str, output: str, method: Method = "gptq", bits: int = 4, group_size: int | None = None,
                  calibration: str | None = None, num_samples: int = 64, seq_len: int = 512,
                  backend: str = "gptqmodel", eval_data: str | None = None, eval_windows: int = 16,
                  eval_skip_windows: int | None = None, dtype: QuantDtype | None = None, baseline: str | None = None,
                  baseline_output: str | None = None, tasks: Sequence[str] | str | None = None,
                  num_fewshot: int | None = None, limit: int | float | None = None, include_path: str | None = None,
                  task_results: Sequence[str] | Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Quantize a saved (dropped) model with AWQ or GPTQ; with held-out text or lm-eval tasks, compare quality
    before and after.

    `eval_skip_windows=None` skips as many held-out windows as calibration used (`num_samples`), so
    evaluating on the calibration source does not score text the quantizer has seen. `baseline` (the
    undropped model) is quantized with the same settings into `baseline_output`, so the table has the paper's
    four rows: baseline, baseline+quant, dropped, dropped+quant. Writes `output/lightning_drop_quant.json`
    (settings, time, sizes, quality) and, when quality is measured, `output/quality_table.json` + `.md`.
    Returns the same dictionary.

    Args:
        model: checkpoint dir or catalogue name of the model to quantize
        output: directory for the quantized model
        method: quantization method
        bits: bits per weight (4 or 8)
        group_size: default: largest of 128/64/32 dividing every width
        calibration: calibration text source (default: C4 sample)
        num_samples: calibration windows
        seq_len: tokens per window (calibration and held-out)
        backend: gptqmodel (works on CPU); autoawq/auto-gptq explain why not
        eval_data: held-out text to compare perplexity before/after
        eval_windows: held-out windows of --seq-len for perplexity
        eval_skip_windows: windows of --eval-data to skip first (default: as many as calibration used)
        dtype: dtype the quantizer runs in (default: bf16 where the CPU/GPU has it, else float32)
        baseline: the undropped model: quantized the same way into --baseline-output, so the quality table has
            the paper's four rows (baseline, +quant, dropped, +quant)
        baseline_output: where the quantized baseline goes (default: OUTPUT-baseline)
        tasks: lm-eval tasks for the quality table
        num_fewshot: few-shot examples for --tasks
        limit: examples per task (int) or fraction (<1)
        include_path: directory of extra task YAMLs
        task_results: a row's scores from `lightning-drop eval --output` instead of running --tasks (LABEL:
            baseline, baseline+quant, dropped, dropped+quant); repeatable
        overwrite: replace a non-empty --output / --baseline-output
    """
    from ..measure import quantize as library
    from ..measure.quality_table import quality_report

    measure = bool(eval_data or tasks or task_results)
    if (baseline is not None or baseline_output is not None) and not measure:
        raise UserError("a baseline is only used for the quality table: also give eval_data (--eval-data) or tasks")
    if baseline_output is not None and baseline is None:
        raise UserError("baseline_output given without baseline (the undropped model to quantize)")
    base_out = default_baseline_output(output) if baseline_output is None else Path(baseline_output)
    if baseline is not None and base_out.resolve() == Path(output).resolve():
        raise UserError("baseline_output must differ from output")
    library.check_args(method, bits, backend)
    check_output(output, overwrite=overwrite, sources=[model, baseline, eval_data, calibration])
    if baseline is not None:
        check_output(base_out, overwrite=overwrite, sources=[model, baseline, eval_data, calibration],
                     option="--baseline-output")
    library.require_backend(backend)  # before anything is loaded: both quantizations need it
    settings = dict(method=method, bits=bits, group_size=group_size, calibration=calibration or "c4-sample",
                    num_samples=num_samples, seq_len=seq_len, backend=backend, dtype=dtype)
    res = library.quantize(model, output, **settings).to_dict()
    res["model"], res["calibration"] = str(model), str(calibration or "c4-sample")
    base_q = None
    if baseline is not None:
        base_q = str(base_out)
        settings["group_size"] = res["group_size"]  # the same grid for both rows
        res["baseline_quantization"] = {**library.quantize(baseline, base_q, **settings).to_dict(),
                                        "model": str(baseline)}
    if measure:
        skip = num_samples if eval_skip_windows is None else eval_skip_windows
        res.update(quality_report(model, output, eval_data or None, seq_len=seq_len,
                                  num_windows=eval_windows, skip_windows=skip, baseline=baseline,
                                  baseline_quantized=base_q, tasks=tasks, num_fewshot=num_fewshot,
                                  limit=limit, include_path=include_path, task_results=task_results,
                                  output=output))
    atomic_write_text(Path(output) / library.QUANT_REPORT,
                      json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    print(library.format_report(res))
    return res
