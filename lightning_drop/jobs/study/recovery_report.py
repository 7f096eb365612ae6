"""The recovery part of a study report: one table of every recipe per point and the curves of held-out
perplexity against training tokens (one panel per point and domain)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ...measure.significance import diff_stderr
from .figures import acc_cell, mc_series, perplexity_panel, plt, save_png


def _domains(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Perplexity keys present: `perplexity` (the held-out text of the calibration domain) then the others."""
    keys = []
    for r in rows:
        for k in r:
            if k.startswith("perplexity") and k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (k != "perplexity", k))


def _domain_label(key: str, doc: Mapping[str, Any]) -> str:
    if key == "perplexity":
        ppl = doc["config"]["eval"]["perplexity"]
        return doc["config"]["calibration"]["source"] if ppl["source"] == "calibration" else ppl["source"]
    return key[len("perplexity["):-1]


def recovery_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per row the point, recipe, tokens, perplexity and gap recovered per domain, the gap
    recovered against the control in the first domain, and MC accuracy with its standard error."""
    rows = doc["recovery"]
    keys = _domains(rows)
    header = ["point", "recipe", "train tokens"]
    for k in keys:
        name = _domain_label(k, doc)
        header += [f"ppl {name}", f"gap recovered {name}"]
    header += [f"gap recovered vs control {_domain_label(k, doc)}" for k in keys]
    tasks = mc_series({**doc, "rows": list(doc["rows"]) + list(rows)})
    header += [f"{task} acc (± s.e.; Δ vs base)" for task, _, _ in tasks]
    base = next((r for r in doc["rows"] if r["num"] == 0), {})
    out = [["base (undropped)", "-", "0"] + sum([[_f(base.get(k), ".2f"), "-"] for k in keys], [])
           + ["-" for _ in keys] + [_acc(base, acc) for _, acc, _ in tasks]]
    for r in rows:
        line = [r["point"], r["recipe"], f"{r['tokens']:,}"]
        for k in keys:
            suffix = k[len("perplexity"):]
            line += [_f(r.get(k), ".2f"), _f(r.get(f"gap_recovered{suffix}"), "%")]
        line += [_f(r.get(f"gap_recovered_vs_control{k[len('perplexity'):]}"), "%") for k in keys]
        line += [_acc(r, acc, base) for _, acc, _ in tasks]
        out.append(line)
    return header, out


def _f(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if spec == "%" else format(v, spec)


def _acc(r: Mapping[str, Any], key: str = "mc_acc", base: Mapping[str, Any] | None = None) -> str:
    """The accuracy ± its error and n; with `base`, its change vs the base (paired error)."""
    if r.get(key) is None:
        return "-"
    task = key[len("mc_acc["):-1] if key != "mc_acc" else None
    diff = r[key] - base[key] if base is not None and base.get(key) is not None else None
    cell = acc_cell(r[key], r.get(key.replace("mc_acc", "mc_stderr")), diff,
                    diff_stderr(r, base, task) if diff is not None else None)
    return f"{cell} (n={r.get(key.replace('mc_acc', 'mc_n'))})"


def plot_recovery(doc: Mapping[str, Any], path: Path) -> Path:
    """Held-out perplexity vs training tokens, one panel per (point, domain), one line per recipe."""
    rows = [r for r in doc["recovery"] if r.get("curve")]
    keys = _domains([p for r in rows for p in r["curve"]])
    points = list(dict.fromkeys(r["point"] for r in rows))
    fig, axes = plt.subplots(len(keys), len(points), figsize=(5.2 * len(points), 3.9 * len(keys)), squeeze=False)
    base = next((r for r in doc["rows"] if r["num"] == 0), {})
    for j, point in enumerate(points):
        for i, k in enumerate(keys):
            ax = axes[i, j]
            for r in rows:
                if r["point"] == point:
                    xs = [p["tokens"] for p in r["curve"] if p.get(k) is not None]
                    ax.plot(xs, [p[k] for p in r["curve"] if p.get(k) is not None], marker="o", ms=3,
                            label=r["recipe"])
            if base.get(k) is not None:
                ax.axhline(base[k], color="gray", lw=0.8, ls=":", label="undropped, untrained")
            perplexity_panel(ax, f"{point}: held-out {_domain_label(k, doc)}", "training tokens",
                             "perplexity (log scale)")
    fig.tight_layout()
    return save_png(fig, path)
