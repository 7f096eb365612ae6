"""The selection rules of a study side by side: per target and count, every sweep (a rule: cosine, relative
magnitude, angular span, loss greedy, reverse, random at a seed, ...) ranked by held-out perplexity, with its
accuracy against the best-ranked rule's (the difference and its standard error, paired over the same
questions) and what selecting cost (forward passes, seconds); and one figure of perplexity against the number
of modules dropped, a panel per target and a line per rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ...measure.significance import Z, diff_stderr
from .figures import LABELS, baseline_row, mc_series, perplexity_panel, plt, save_png


def compared(doc: Mapping[str, Any]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    """{(target, num): rows of two or more sweeps at that point}, each list sorted by perplexity."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in doc["rows"]:
        if r["num"] > 0 and r.get("perplexity") is not None:
            groups.setdefault((r["target"], r["num"]), []).append(r)
    order = list(LABELS)
    return {k: sorted(v, key=lambda r: r["perplexity"]) for k, v in
            sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 9, kv[0][1]))
            if len({r["sweep"] for r in v}) > 1}


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def rules_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per (target, count) the rules ranked by perplexity; perplexity per domain; the first MC
    task's accuracy ± its standard error and its difference to the best-ranked rule ± the paired error (with
    the verdict: beyond noise when more than twice it); the selection cost."""
    domains = doc["config"]["eval"].get("domains") or []
    tasks = mc_series(doc)
    header = ["target", "n", "rank", "rule", "sweep", "perplexity"] + [f"ppl {d}" for d in domains]
    if tasks:
        header += [f"{tasks[0][0]} acc ± s.e.", "Δ acc vs rank 1 ± paired s.e."]
    header += ["selection passes", "selection s"]
    out = []
    for (target, num), rows in compared(doc).items():
        best = rows[0]
        for rank, r in enumerate(rows, 1):
            line = [target, str(num), str(rank), str(r.get("rule") or r["sweep"]), r["sweep"],
                    _f(r["perplexity"], ".2f")] + [_f(r.get(f"perplexity[{d}]"), ".2f") for d in domains]
            if tasks:
                task, acc, se = tasks[0]
                name = None if acc == "mc_acc" else task
                line.append("-" if r.get(acc) is None else f"{r[acc]:.3f} ± {_f(r.get(se), '.3f')}")
                if rank == 1 or r.get(acc) is None or best.get(acc) is None:
                    line.append("-")
                else:
                    d, s = r[acc] - best[acc], diff_stderr(r, best, name)
                    verdict = "" if s is None else ", beyond noise" if abs(d) > Z * s else ", within noise"
                    line.append(f"{d:+.3f}" + ("" if s is None else f" ± {s:.3f}") + verdict)
            line += [_f(r.get("selection_passes"), ".2f"), _f(r.get("selection_seconds"), ".1f")]
            out.append(line)
    return header, out


def plot_rules(doc: Mapping[str, Any], path: Path) -> Path:
    """Held-out perplexity against modules dropped: a panel per target, a line per sweep (the base at n = 0)."""
    groups = compared(doc)
    targets = list(dict.fromkeys(t for t, _ in groups))
    sweeps = list(dict.fromkeys(r["sweep"] for rows in groups.values() for r in rows))
    base = baseline_row(doc["rows"])
    fig, axes = plt.subplots(1, len(targets), figsize=(5.4 * len(targets), 4.4), squeeze=False)
    colors = plt.get_cmap("tab10")
    rules = list(dict.fromkeys(r.get("rule") or r["sweep"] for rows in groups.values() for r in rows))
    for ax, target in zip(axes[0], targets):
        for sweep in sweeps:
            pts = sorted((r for (t, _), rows in groups.items() if t == target for r in rows if r["sweep"] == sweep),
                         key=lambda r: r["num"])
            if not pts:
                continue
            rule = pts[0].get("rule") or sweep
            ax.plot([0] + [r["num"] for r in pts], [base["perplexity"]] + [r["perplexity"] for r in pts],
                    marker="o", ms=3, color=colors(rules.index(rule) % 10), alpha=0.85,
                    label=rule if rule == sweep else f"{rule} [{sweep}]")
        perplexity_panel(ax, f"{LABELS.get(target, target)}: perplexity vs modules dropped", "modules dropped (n)",
                         "held-out perplexity (log scale, lower is better)")
    fig.tight_layout()
    return save_png(fig, path)


def rules_section(doc: Mapping[str, Any], fig_dir: Path) -> tuple[list[str], list[list[str]], Path, str] | None:
    """The rules table, its figure and caption, when two or more sweeps reach the same (target, count)."""
    if not compared(doc):
        return None
    header, rows = rules_table(doc)
    fig = plot_rules(doc, fig_dir / "rules.png")
    caption = ("Each selection rule (a sweep) at each target and count, ranked by held-out perplexity (the same "
               "windows for every rule). Accuracy differences to the rank-1 rule carry the standard error of the "
               f"difference, paired over the same questions; beyond noise = more than {Z:g} times it. Selection "
               "passes: forward passes over the calibration windows the rule ran to choose this set (a pass through "
               "part of the layers counts as that part; one-shot rules share one pass across targets and counts; "
               "positional rules run none); selection s: their seconds.")
    return header, rows, fig, caption

