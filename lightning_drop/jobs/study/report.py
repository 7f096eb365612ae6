"""The study report: a self-contained `report.html` (figures embedded as base64) and `report.md`, with the
figures of `figures.py` and a table in the paper's shape: baseline, then drop-n for each target.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...io.atomic_io import atomic_write_text
from ...measure.significance import Z, diff_stderr
from .kinds_report import KINDS_CAPTION, KINDS_TITLE, kinds_table

from .figures import (
    acc_cell,
    LABELS,
    baseline_row,
    main_sweep,
    mc_series,
    mc_tasks,
    context_series,
    plot_drop_order,
    plot_importance_heatmap,
    plot_quality_vs_num,
    plot_quality_vs_speedup,
    plot_speedup_vs_context,
)

# ------------------------------------------------------------------------------------------------ table
TABLE_COLUMNS = [("config", None), ("perplexity", ".2f"), ("ppl change", "%"), ("MC acc", "acc"),
                 ("decode speedup", ".3f"), ("prefill speedup", ".3f"), ("total speedup", ".3f"),
                 ("SDR gamma (MC, total)", ".2f"), ("SDR (ppl, total)", ".1f"),
                 ("KV bytes/token", ",.0f"), ("KV vs base", ".2f"), ("params (M)", ".1f"),
                 ("params vs base", ".3f"), ("dropped attention", None), ("dropped MLP", None)]


def table_columns(doc: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """TABLE_COLUMNS with a perplexity column per extra domain, and, with several MC tasks, one per task."""
    cols = list(TABLE_COLUMNS)
    domains = doc["config"]["eval"].get("domains") or []
    i = cols.index(("ppl change", "%")) + 1
    cols[i:i] = [(f"perplexity [{d}]", ".2f") for d in domains]
    tasks = [m["task"] for m in mc_tasks(doc)]
    if len(tasks) > 1:
        i = cols.index(("MC acc", "acc"))
        cols[i:i + 1] = [(f"{t} acc", "acc") for t in tasks]
    return cols


def _value(r: Mapping[str, Any], col: str) -> Any:
    if col.startswith("perplexity ["):
        return r.get(f"perplexity[{col[len('perplexity ['):-1]}]")
    if col == "MC acc" or col.endswith(" acc"):
        suffix = "" if col == "MC acc" else f"[{col[:-len(' acc')]}]"
        return tuple(r.get(f"{k}{suffix}") for k in ("mc_acc", "mc_stderr", "mc_diff", "mc_diff_stderr"))
    return {"config": None, "perplexity": r.get("perplexity"), "ppl change": r.get("ppl_loss"),
            "decode speedup": r.get("decode_speedup"), "prefill speedup": r.get("prefill_speedup"),
            "total speedup": r.get("total_speedup"), "SDR gamma (MC, total)": r.get("sdr"),
            "SDR (ppl, total)": r.get("sdr_ppl"), "KV bytes/token": r.get("kv_bytes_per_token"),
            "KV vs base": r.get("kv_ratio"), "params (M)": r["params"] / 1e6 if r.get("params") else None,
            "params vs base": r.get("param_ratio"), "dropped attention": _compact(r.get("drop_attn")),
            "dropped MLP": _compact(r.get("drop_mlp"))}[col]


def table_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """Paper-shaped rows: baseline, then drop-n for each target of each sweep."""
    out = []
    main = main_sweep(doc)
    columns = table_columns(doc)
    rows = sorted(doc["rows"], key=lambda r: (r["num"] > 0, r["sweep"] != main, r["sweep"],
                                               list(LABELS).index(r["target"]) if r["target"] in LABELS else 9, r["num"]))
    seen = set()
    for r in rows:
        name = "baseline" if r["num"] == 0 else f"{r['target']}-{r['num']}" + ("" if r["sweep"] == main else
                                                                                f" [{r['sweep']}]")
        if name in seen:
            continue
        seen.add(name)
        line = []
        for col, spec in columns:
            v = name if col == "config" else _value(r, col)
            if spec == "acc":  # an accuracy is shown with its standard error, never alone
                line.append(acc_cell(*v))
            elif v is None:
                line.append("-")
            elif spec == "%":
                line.append(f"{100 * v:+.1f}%")
            elif spec:
                line.append(format(v, spec))
            else:
                line.append(str(v))
        out.append(line)
    return out


def _compact(xs: Sequence[int] | None) -> str | None:
    if not xs:
        return None
    return ",".join(map(str, xs))


# ------------------------------------------------------------------------------------------------ documents
FIGURES = [("importance.png", "Importance per layer", plot_importance_heatmap,
            "Scores of every attention sublayer, MLP sublayer and block (one calibration pass). Lower = the module "
            "changes its input less = more redundant."),
           ("quality_vs_num.png", "Quality vs number dropped", plot_quality_vs_num,
            "Drops of the n lowest-scoring modules of each kind, under each sweep's schedule (one-shot or iterative)."),
           ("quality_vs_speedup.png", "Quality vs speedup (Pareto view)", plot_quality_vs_speedup,
            "Total speedup (prefill + decode time; the speedup SDR is computed on) measured base vs dropped "
            "alternately in one run (medians). The table also lists the decode and prefill speedups. Accuracy bars are "
            "one standard error; on the accuracy panel a point joins the Pareto front only when its accuracy beats "
            "every faster point's by more than twice the standard error of the difference (paired: every point "
            "answers the same questions)."),
           ("drop_order.png", "Dropping order", plot_drop_order,
            "Which layers go first as n grows (paper Fig. 6), following the main sweep's schedule (one-shot or "
            "iterative).")]


def ordering_lines(doc: Mapping[str, Any]) -> list[str]:
    """Per MC task, the main sweep's targets at their largest count ranked by accuracy, each step to the next
    with its paired difference and whether it exceeds twice its standard error: is the ordering resolved?"""
    main = main_sweep(doc)
    rows = [r for r in doc["rows"] if r["sweep"] == main and r["num"] > 0]
    largest = {r["target"]: max(x["num"] for x in rows if x["target"] == r["target"]) for r in rows}
    lines = []
    for task, acc, _ in mc_series(doc):
        name = None if acc == "mc_acc" else task
        seen, ranked = set(), []
        for r in sorted(rows, key=lambda r: -(r.get(acc) or 0.0)):
            drop_set = (tuple(r.get("drop_attn") or ()), tuple(r.get("drop_mlp") or ()))
            if r["num"] == largest[r["target"]] and r.get(acc) is not None and drop_set not in seen:
                seen.add(drop_set)  # a target that picked another's drop set (joint = attention) is not a rung
                ranked.append(r)
        if len(ranked) < 2:
            continue
        text = f"{ranked[0]['target']}-{ranked[0]['num']} {ranked[0][acc]:.3f}"
        for hi, lo in zip(ranked, ranked[1:]):
            d, se = hi[acc] - lo[acc], diff_stderr(hi, lo, name)
            verdict = "?" if se is None else "resolved" if d > Z * se else "within noise"
            text += (f" > {lo['target']}-{lo['num']} {lo[acc]:.3f} (by {d:.3f}"
                     + (f" ± {se:.3f}, {verdict})" if se is not None else ")"))
        lines.append(f"{task}: {text}")
    return lines


ORDERING_NOTE = ("Ordering at each target's largest count, by accuracy; each step with its difference ± the "
                 "standard error of that difference, paired over the same questions (resolved: more than twice it).")


def write_report(doc: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write the figures, report.md and the self-contained report.html into `out_dir`; returns report.html."""
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = [(name, title, fn(doc, fig_dir / name), caption) for name, title, fn, caption in FIGURES]
    table = table_rows(doc)
    columns = table_columns(doc)
    summary = _summary_lines(doc)
    # Markdown + PNG
    md = [f"# Layer-drop study: {doc['name']}", ""] + [f"- {s}" for s in summary] + ["", "## Results", ""]
    md.append("| " + " | ".join(c for c, _ in columns) + " |")
    md.append("|" + "---|" * len(columns))
    md += ["| " + " | ".join(row) + " |" for row in table]
    ordering = ordering_lines(doc)
    if ordering:
        md += ["", ORDERING_NOTE, ""] + [f"- {line}" for line in ordering]
    for name, title, _, caption in figs:
        md += ["", f"## {title}", "", caption, "", f"![{title}](figures/{name})"]
    if doc.get("selection"):
        md += ["", "## Automated selection", "", doc["selection"]["message"]]
    # sections of a table with its figure: (title, (header, rows, figure, caption)) where the study has them
    from .rules_report import rules_section
    from .track_axis import TRACK_TITLE, track_section

    sections = [(title, sec) for title, sec in ((KINDS_TITLE, _kinds(doc)), (RULES_TITLE, rules_section(doc, fig_dir)),
                                                (CONTEXT_TITLE, _context(doc, fig_dir)),
                                                ("Recovery", _recovery(doc, fig_dir)),
                                                (TRACK_TITLE, track_section(doc, fig_dir))) if sec is not None]
    for title, (header, rows, fig, caption) in sections:
        md += ["", f"## {title}", "", caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(row) + " |" for row in rows]
        md += ["", f"![{title}](figures/{fig.name})"] if fig is not None else []
    if doc.get("notes"):
        md += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    # HTML with embedded figures
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Layer-drop study: {esc(doc['name'])}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}tr:first-child td{font-weight:bold;background:#f3f3f3}"
             "img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}"
             "code,pre{background:#f6f6f6}</style></head><body>",
             f"<h1>Layer-drop study: {esc(doc['name'])}</h1><ul>"]
    parts += [f"<li>{esc(s)}</li>" for s in summary]
    parts.append("</ul><h2>Results</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c, _ in columns) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in table]
    parts.append("</table><p style='font-size:13px;color:#555'>ppl change: relative to the baseline. SDR gamma = "
                 "dAcc% / dSpeedup% on the multiple-choice accuracy and the total speedup (prefill + decode time, as the "
                 "paper times both; lower is better; meaningless while the MC sample is small and near chance), "
                 "SDR (ppl, total) = dPerplexity% / dSpeedup% on the same total speedup. "
                 "KV: KV-cache bytes per token measured from a real cache.</p>")
    if ordering:
        parts.append(f"<p>{esc(ORDERING_NOTE)}</p><ul>" + "".join(f"<li>{esc(x)}</li>" for x in ordering) + "</ul>")
    if doc.get("selection"):
        parts.append(f"<h2>Automated selection</h2><p>{esc(doc['selection']['message'])}</p>")
    for title, (header, rows, fig, caption) in sections:
        parts.append(f"<h2>{esc(title)}</h2><p>{esc(caption)}</p><table><tr>"
                     + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows]
        parts.append("</table>")
        if fig is not None:
            data = base64.b64encode(fig.read_bytes()).decode()
            parts.append(f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{data}'></figure>")
    for name, title, path, caption in figs:
        data = base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(f"<h2>{esc(title)}</h2><figure><img alt='{esc(title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    if doc.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in doc["notes"]) + "</ul>")
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps(doc["config"], indent=2)) + "</pre></body></html>")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path


CONTEXT_TITLE = "Speedup against context length"


def _kinds(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]], None, str] | None:
    """The per-mixer-kind table of a hybrid model's study (no figure of its own: the importance figure marks
    each layer's kind)."""
    if not doc.get("importance_by_kind"):
        return None
    header, rows = kinds_table(doc["importance_by_kind"])
    return header, rows, None, KINDS_CAPTION
RULES_TITLE = "Selection rules compared"


def _context(doc: Mapping[str, Any], fig_dir: Path) -> tuple[list[str], list[list[str]], Path, str] | None:
    """The speedup-by-length table and figure, when the study timed its points at several prompt lengths."""
    series = context_series(doc)
    if not series:
        return None
    fig = plot_speedup_vs_context(doc, fig_dir / "speedup_vs_context.png")
    header = ["config", "prompt", "context", "prefill speedup", "decode speedup", "total speedup", "KV cache (MiB)",
              "KV vs base"]
    rows = [[f"{target}-{r['num']}", str(p["prompt_len"]), str(p["context_len"]), f"{p['prefill_speedup']:.3f}",
             f"{p['decode_speedup']:.3f}", f"{p['total_speedup']:.3f}", f"{p['kv_cache_bytes'] / 2**20:.2f}",
             f"{p['kv_cache_ratio']:.2f}"] for target, r in series.items() for p in r["speed_by_length"]]
    sp = doc["config"]["speed"]
    caption = (f"Each target of the main sweep at its largest count, base and dropped timed alternately at each "
               f"prompt length (then {sp['gen_len']} generated tokens, batch {sp['batch_size']}, median of "
               f"{sp['repeats']}); KV cache = the dropped model's cache at the end of the run (context tokens). As the "
               "context grows, the KV cache and attention take a larger share of the time, so an attention drop is "
               "expected to gain more at long contexts and an MLP drop less: the lines show whether it does here.")
    return header, rows, fig, caption


def _recovery(doc: Mapping[str, Any], fig_dir: Path) -> tuple[list[str], list[list[str]], Path, str] | None:
    """The recovery table, its figure and caption, when the study trained recovery recipes."""
    if not doc.get("recovery"):
        return None
    from .recovery_report import plot_recovery, recovery_table

    header, rows = recovery_table(doc)
    fig = plot_recovery(doc, fig_dir / "recovery.png")
    t = doc["recovery_train"]
    caption = (f"Each recipe trains {t['steps']} steps x {t['batch_size']} windows x {t['seq_len']} tokens "
               f"({t['tokens']:,} tokens) of training text that shares no document with the held-out text. Gap "
               "recovered = (ppl dropped - ppl recovered) / (ppl dropped - ppl base); vs control: with the ppl of "
               "the undropped model given the same training instead of the base (what is left after adaptation to "
               "the training text). Control rows train the undropped model.")
    return header, rows, fig, caption


def _dtype_note(doc: Mapping[str, Any]) -> str:
    """`, in bfloat16 (auto: ...)`: the dtype every number was computed in, and why when `auto` chose it."""
    if "dtype" not in doc:  # results written before the dtype was recorded
        return ""
    why = ""
    if doc["config"].get("dtype") == "auto":
        why = (f" (auto: this machine has native bf16, {doc['native_bf16']})" if doc.get("native_bf16")
               else " (auto: no native bf16 on this machine)")
    return f", in {doc['dtype']}{why}"


def _summary_lines(doc: Mapping[str, Any]) -> list[str]:
    cfg = doc["config"]
    cal, ppl, sp = cfg["calibration"], cfg["eval"]["perplexity"], cfg["speed"]
    lines = [f"model: {doc['model']} ({doc.get('num_layers')} layers)" + _dtype_note(doc),
             f"calibration: {cal['num_samples']} x {cal['seq_len']} tokens of {cal['source']}",
             "perplexity: " + (f"{ppl['num_windows']} x {ppl['seq_len']} held-out tokens of {cal['source']} "
                               "(the windows after the calibration ones)" if ppl["source"] == "calibration" else
                               f"{ppl['num_windows']} x {ppl['seq_len']} tokens of {ppl['source']}")]
    for d in cfg["eval"].get("domains") or []:
        lines.append(f"perplexity [{d}]: the first {ppl['num_windows']} x {ppl['seq_len']} tokens of {d}, a second "
                     "domain (never calibrated or trained on)")
    base = baseline_row(doc["rows"])
    for mc in mc_tasks(doc):
        task = mc["task"]
        n = base.get(f"mc_n[{task}]", base.get("mc_n") if task == mc_tasks(doc)[0]["task"] else None)
        if n is None:
            continue
        where = "the base model, each target's largest count and recovered models" if mc.get("at") == "largest" \
            else "every point"
        lines.append(f"multiple choice: {task} ({n} examples, acc_norm, zero-shot, at {where}); ± = one standard "
                     "error; Δ = the change vs the base, its error paired over the same questions; two accuracies "
                     "closer than twice the standard error of their difference are not told apart")
    lines.append(f"speed: batch {sp['batch_size']}, prompt {sp['prompt_len']}, generate {sp['gen_len']} tokens, "
                 f"median of {sp['repeats']} alternate runs (base vs dropped), CPU threads {_threads()}"
                 + (f"; also at prompt lengths {', '.join(map(str, sp['prompt_lens']))}" if sp.get("prompt_lens") else ""))
    sweeps = [f"{s['name']}: {s['metric']}, {s['schedule']}" for s in cfg["sweeps"]]
    lines.append("sweeps: " + "; ".join(sweeps))
    if doc.get("phase_seconds"):  # what this run computed (a cached item costs nothing), by phase
        lines.append(f"time this run: {doc['seconds_this_run']:.0f} s; by phase: " + ", ".join(
            f"{phase} {seconds:.0f} s" for phase, seconds in sorted(doc["phase_seconds"].items(), key=lambda x: -x[1])))
    return lines


def _threads() -> int:
    import torch

    return torch.get_num_threads()
