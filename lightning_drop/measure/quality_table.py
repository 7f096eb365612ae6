"""Quality before and after quantization, in the shape of the paper's Table 10.

`quality_table` measures any checkpoints ({row label: checkpoint directory or catalogue name}) the same way:
perplexity on the same held-out windows, lm-eval task scores (run, or read from `lightning-drop eval`
output) and the weights' size on disk, each relative to the first row. `quality_report` builds the four rows
baseline / baseline+quant / dropped / dropped+quant, and `write_quality_table` writes `quality_table.json`
+ `.md`. They read checkpoint directories, whatever made them, so they need no quantization backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.atomic_io import read_json
from ..errors import UserError
from ..io.safetensors_io import dir_size
from ..io.text_data import load_documents, make_windows

TABLE_ORDER = ("baseline", "baseline+quant", "dropped", "dropped+quant")
QUALITY_TABLE = "quality_table"  # written as quality_table.json + quality_table.md


def _ref_size(ref: str | os.PathLike) -> int | None:
    """Bytes of the weights on disk (safetensors), or None when `ref` is not a local checkpoint directory."""
    from ..io.model_loading import resolve

    path = Path(resolve(str(ref)))
    if not path.is_dir():
        return None
    return dir_size(path) or None


def _read_task_results(given: Any, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{label: eval results} from {label: dict | JSON file} or ["LABEL=FILE", ...] (`lightning-drop eval --output`)."""
    if not given:
        return {}
    if isinstance(given, (list, tuple)):
        from .evaluation import parse_pairs

        given = parse_pairs(given, f"task results must be LABEL=FILE (LABEL in {', '.join(labels)})")
    out = {}
    for label, res in dict(given).items():
        if label not in labels:
            raise UserError(f"task results for {label!r}, which is not a row of this table ({', '.join(labels)})")
        if not isinstance(res, Mapping):
            res = read_json(res, "the JSON of `lightning-drop eval --output`", {"scores": dict}, "task results file")
        if not isinstance(res.get("scores"), Mapping):
            raise UserError(f"task results for {label} have no 'scores' mapping (expected the JSON of lightning-drop eval)")
        out[label] = dict(res)
    return out


def quality_table(models: Mapping[str, str | os.PathLike], data: str | os.PathLike | Sequence[str] | None = None,
                  seq_len: int = 512, num_windows: int = 16, skip_windows: int = 0, batch_size: int = 4,
                  field: str = "text", tasks: Sequence[str] | str | None = None,
                  num_fewshot: int | Mapping[str, int] | None = None, limit: int | float | None = None,
                  include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  task_results: Mapping[str, Any] | Sequence[str] | None = None) -> dict[str, Any]:
    """Measure each model of `models` ({row label: checkpoint}) the same way: one row per model.

    Columns: perplexity on the same held-out windows of `data` (skipping `skip_windows`), lm-eval task
    scores and their average with their standard errors and numbers of examples (run for `tasks`, or read
    from `task_results` = {label: eval JSON}), and the weights' size on disk. Changes are relative to the first
    row (the baseline when there is one). Any checkpoint directory works, quantized or not, so the table is
    built the same way with any backend.
    """
    if not models:
        raise UserError("quality table: give at least one model")
    labels = list(models)
    given = _read_task_results(task_results, labels)
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks or [])
    if data is None and not tasks and not given:
        raise UserError("quality table: nothing to measure; give held-out text (data), lm-eval tasks or task results")
    from .evaluation import average_stderr, perplexity, result_stderrs, run_lm_eval
    from ..io.model_loading import load_model

    table: dict[str, Any] = {"rows": [], "data": None if data is None else str(data), "seq_len": seq_len,
                             "tasks": tasks, "limit": limit}
    windows = None
    for label, ref in models.items():
        row: dict[str, Any] = {"config": label, "model": str(ref), "perplexity": None, "task_average": None,
                               "task_average_stderr": None, "task_scores": {}, "task_stderrs": {}, "task_n": {},
                               "size_bytes": _ref_size(ref)}
        needs_model = data is not None or (tasks and label not in given)
        if needs_model:
            model, tok = load_model(str(ref))
            if data is not None:
                if windows is None:
                    texts = load_documents(data, text_field=field)
                    windows = make_windows(tok, texts, seq_len, skip_windows + num_windows)[skip_windows:]
                    if windows.shape[0] == 0:
                        raise UserError(f"{data} has no windows of {seq_len} tokens left after skipping {skip_windows}")
                    table["num_windows"] = int(windows.shape[0])
                row["perplexity"] = perplexity(model, windows, batch_size)
            if tasks and label not in given:
                given[label] = run_lm_eval(model, tok, tasks, num_fewshot=num_fewshot, limit=limit,
                                           include_path=include_path, batch_size=batch_size)
            del model
        if label in given:
            res = given[label]
            row["task_scores"] = {k: v for k, v in res["scores"].items() if v is not None}
            stderrs = result_stderrs(res)  # None for each task of a JSON that has none
            row["task_stderrs"] = {t: stderrs.get(t) for t in row["task_scores"]}
            row["task_n"] = {t: int(n) for t, n in (res.get("n_samples") or {}).items() if t in row["task_scores"]}
            valid = list(row["task_scores"].values())
            row["task_average"] = res.get("average", sum(valid) / len(valid) if valid else None)
            row["task_average_stderr"] = res["average_stderr"] if "average_stderr" in res \
                else average_stderr(list(row["task_stderrs"].values()))
        table["rows"].append(row)
    first = table["rows"][0]
    for row in table["rows"]:
        for key, out in (("perplexity", "perplexity_change_pct"), ("task_average", "task_average_change_pct"),
                         ("size_bytes", "size_ratio")):
            a, b = row[key], first[key]
            if a is None or not b:
                row[out] = None
            else:
                row[out] = a / b if key == "size_bytes" else 100.0 * (a / b - 1.0)
    table["task_names"] = sorted({t for r in table["rows"] for t in r["task_scores"]})
    return table


def format_quality_table(table: Mapping[str, Any]) -> str:
    """The table as Markdown: perplexity, task scores + average ± one standard error, size on disk; '-' where
    not measured, no ± where the results carry no standard error (JSONs of older versions)."""
    from .evaluation import plus_minus

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def pm(v: Any, se: Any) -> str:
        return "-" if v is None else plus_minus(v, se, ".4f", ".3f")

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:+.1f}%"

    tasks = list(table.get("task_names") or [])
    has_ppl = any(r["perplexity"] is not None for r in table["rows"])
    has_tasks = any(r["task_average"] is not None for r in table["rows"])
    head = ["config"] + (["perplexity", "ppl change"] if has_ppl else []) + tasks \
        + (["task avg", "avg change"] if has_tasks else []) + ["size (MB)", "size vs first"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [r["config"]]
        if has_ppl:
            cells += [f(r["perplexity"], ".3f"), pct(r["perplexity_change_pct"])]
        stderrs = r.get("task_stderrs") or {}
        cells += [pm(r["task_scores"].get(t), stderrs.get(t)) for t in tasks]
        if has_tasks:
            cells += [pm(r["task_average"], r.get("task_average_stderr")), pct(r["task_average_change_pct"])]
        cells += [f(None if r["size_bytes"] is None else r["size_bytes"] / 1e6, ".2f"), f(r["size_ratio"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if has_ppl:
        notes.append(f"perplexity on {table.get('num_windows')} x {table['seq_len']} held-out tokens of {table['data']}")
    if has_tasks:
        notes.append("task avg = mean of the lm-eval primary metrics" + (f" (limit {table['limit']})" if table.get("limit") else ""))
        shown = [r.get("task_average_stderr") for r in table["rows"]] \
            + [se for r in table["rows"] for se in (r.get("task_stderrs") or {}).values()]
        if any(se is not None for se in shown):
            notes.append("± = one standard error")
        examples = _examples_per_task(table["rows"], tasks)
        if examples:
            notes.append(f"examples per task: {examples}")
    notes.append("size = safetensors bytes on disk; changes are relative to the first row")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + ".\n"


def _examples_per_task(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """'hellaswag 20, piqa 50', naming the rows where they scored different numbers; '' when none is known."""
    parts = []
    for t in tasks:
        ns = {r["config"]: (r.get("task_n") or {}).get(t) for r in rows if t in r["task_scores"]}
        known = {n for n in ns.values() if n is not None}
        if not known:
            continue
        if len(known) == 1 and None not in ns.values():
            parts.append(f"{t} {known.pop()}")
        else:
            parts.append(f"{t} " + " / ".join(f"{'?' if n is None else n} ({label})" for label, n in ns.items()))
    return ", ".join(parts)


def write_quality_table(table: Mapping[str, Any], out_dir: str | os.PathLike, name: str = QUALITY_TABLE) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` and `<name>.md` atomically; returns both paths."""
    from ..io.dropped_checkpoint import atomic_write_text

    out = Path(out_dir)
    js, md = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(js, json.dumps(table, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(md, "# Quality before and after quantization (paper Table 10 shape)\n\n" + format_quality_table(table))
    return js, md


def quality_report(source: str | os.PathLike, quantized: str | os.PathLike, data: str | os.PathLike | None,
                   seq_len: int = 512, num_windows: int = 16, skip_windows: int = 0, batch_size: int = 4,
                   field: str = "text", baseline: str | os.PathLike | None = None,
                   baseline_quantized: str | os.PathLike | None = None, tasks: Sequence[str] | str | None = None,
                   num_fewshot: int | Mapping[str, int] | None = None, limit: int | float | None = None,
                   include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   task_results: Mapping[str, Any] | Sequence[str] | None = None,
                   output: str | os.PathLike | None = None) -> dict[str, Any]:
    """The paper's Table 10 shape: baseline / baseline+quant / dropped / dropped+quant on the same measures.

    `source` is the dropped model and `quantized` its quantized copy; the baseline rows appear when
    `baseline` (and its quantized copy `baseline_quantized`) are given. Returns the flat keys of the
    dropped pair (`source_perplexity`, `quantized_perplexity`, `perplexity_increase_pct`, ...) plus
    `table` (see `quality_table`); with `output`, the table is also written there as JSON + Markdown.
    """
    if baseline_quantized is not None and baseline is None:
        raise UserError("baseline_quantized given without baseline (the unquantized model it was made from)")
    models: dict[str, Any] = {}
    if baseline is not None:
        models["baseline"] = baseline
        if baseline_quantized is not None:
            models["baseline+quant"] = baseline_quantized
    models.update({"dropped": source, "dropped+quant": quantized})
    table = quality_table(models, data, seq_len=seq_len, num_windows=num_windows, skip_windows=skip_windows,
                          batch_size=batch_size, field=field, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                          include_path=include_path, task_results=task_results)
    rows = {r["config"]: r for r in table["rows"]}
    out: dict[str, Any] = {"data": None if data is None else str(data), "seq_len": seq_len, "table": table}
    src, q = rows["dropped"], rows["dropped+quant"]
    if data is not None:
        out["num_windows"] = table["num_windows"]
        out["source_perplexity"], out["quantized_perplexity"] = src["perplexity"], q["perplexity"]
        out["perplexity_increase_pct"] = 100.0 * (q["perplexity"] / src["perplexity"] - 1.0)
    if src["task_average"] is not None and q["task_average"] is not None:
        out["source_task_average"], out["quantized_task_average"] = src["task_average"], q["task_average"]
    if output is not None:
        js, md = write_quality_table(table, output)
        out["table_files"] = [str(js), str(md)]
    return out
