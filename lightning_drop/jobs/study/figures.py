"""The study report's figures, one PNG each: importance heatmap (layers x {attention, MLP, block}), quality
vs number dropped per target, quality vs total (prefill + decode) speedup (Pareto view, the speedup SDR
uses), the dropping order (which layers go first as n grows, paper Fig. 6; one-shot or iterative, as
the main sweep), and, when the study timed several prompt lengths, speedup against context length.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from ...io.atomic_io import save_figure  # noqa: E402
from ...measure.plots import PlainLogFormatter  # noqa: E402
from ...measure.significance import Z, diff_stderr  # noqa: E402

_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def log_y(ax: Any) -> None:
    """Log y axis with plain numbers (20, 50, 100) instead of 2 x 10^1."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLogFormatter("{:g}"))
    ax.yaxis.set_minor_formatter(PlainLogFormatter("{:g}"))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def perplexity_panel(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    """Finish a panel of perplexity lines: log y, labels, grid and legend (one look across the report)."""
    log_y(ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)

COLORS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "block": "#2ca02c", "joint": "#9467bd", "baseline": "#000000"}
LABELS = {"attn": "attention", "mlp": "MLP", "block": "block", "joint": "joint (attn + MLP)"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]


def save_png(fig: Any, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def main_sweep(doc: Mapping[str, Any]) -> str:
    return doc["config"]["sweeps"][0]["name"]


def baseline_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return next(r for r in rows if r["num"] == 0)


def _series(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """{(sweep, target): rows sorted by num, baseline included at n = 0}."""
    base = baseline_row(rows)
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["num"] > 0:
            out.setdefault((r["sweep"], r["target"]), []).append(r)
    return {k: [base] + sorted(v, key=lambda r: r["num"]) for k, v in out.items()}


def _style(sweeps: list[str], sweep: str) -> dict[str, Any]:
    i = sweeps.index(sweep)
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}


# ------------------------------------------------------------------------------------------------ figures
def plot_importance_heatmap(doc: Mapping[str, Any], path: Path) -> Path:
    """One panel per score set of the study (`plots.importance_figure`)."""
    from ...measure.plots import importance_figure, score_panel

    scores = doc["scores"]
    if not scores:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no importance scores (baseline only)", ha="center", va="center")
        ax.axis("off")
        return save_png(fig, path)
    panels = [score_panel(s, f"importance ({label}); lower = more redundant, dropped first")
              for label, s in scores.items()]
    return save_png(importance_figure(panels), path)


#: Accuracy of guessing, per task family (a reference line on the accuracy panels).
CHANCE = {"hellaswag": 0.25, "arc": 0.25, "openbookqa": 0.25, "mmlu": 0.25, "piqa": 0.5, "boolq": 0.5,
          "winogrande": 0.5, "rte": 0.5}


def mc_tasks(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The study's MC task specs (a results document of an older version holds one mapping or null)."""
    mc = doc["config"]["eval"].get("mc")
    return [] if not mc else list(mc) if isinstance(mc, list) else [mc]


def mc_series(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(task, accuracy key, stderr key) per MC task with results; the first task's plain keys for older docs."""
    tasks = [m["task"] for m in mc_tasks(doc)]
    out = []
    for t in tasks:
        acc = f"mc_acc[{t}]" if any(f"mc_acc[{t}]" in r for r in doc["rows"]) else "mc_acc"
        if acc == "mc_acc" and t != tasks[0]:
            continue
        if any(r.get(acc) is not None for r in doc["rows"]):
            out.append((t, acc, acc.replace("mc_acc", "mc_stderr")))
    return out


def acc_cell(acc: float | None, se: float | None, diff: float | None = None, diff_se: float | None = None) -> str:
    """`0.460 ± 0.035 (Δ -0.010 ± 0.012)`: the accuracy, and its change vs the base with the error of that
    change (paired over the same questions, so often much smaller than the accuracy's own)."""
    if acc is None:
        return "-"
    cell = f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "")
    if diff is not None and diff_se is not None:
        cell += f" (Δ {diff:+.3f} ± {diff_se:.3f})"
    return cell


def _chance(task: str) -> float | None:
    return next((v for k, v in CHANCE.items() if task.startswith(k)), None)


def plot_quality_vs_num(doc: Mapping[str, Any], path: Path) -> Path:
    rows = doc["rows"]
    series = _series(rows)
    sweeps = [s["name"] for s in doc["config"]["sweeps"]]
    tasks = mc_series(doc)
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(6.5 + 5.5 * len(tasks), 4.6), squeeze=False)
    ax_p = axes[0, 0]
    for (sweep, target), rs in series.items():
        label = LABELS.get(target, target) + ("" if sweep == sweeps[0] else f" [{sweep}]")
        st = _style(sweeps, sweep)
        ax_p.plot([r["num"] for r in rs], [r["perplexity"] for r in rs], color=COLORS.get(target), label=label, **st)
        for ax, (_, acc, se) in zip(axes[0, 1:], tasks):
            pts = [r for r in rs if r.get(acc) is not None]  # `at: largest` tasks skip the counts in between
            ax.errorbar([r["num"] for r in pts], [r[acc] for r in pts], yerr=[r.get(se) or 0.0 for r in pts],
                        color=COLORS.get(target), label=label, capsize=3, **st)
    base = baseline_row(rows)
    ax_p.axhline(base["perplexity"], color="gray", lw=0.8, ls=":", label="baseline")
    log_y(ax_p)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of modules dropped (n)")
        ax.grid(alpha=0.3, which="both")
    ax_p.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax_p.set_title("perplexity vs number dropped")
    for ax, (task, acc, _) in zip(axes[0, 1:], tasks):
        if base.get(acc) is not None:
            ax.axhline(base[acc], color="gray", lw=0.8, ls=":", label="baseline")
        if _chance(task) is not None:
            ax.axhline(_chance(task), color="red", lw=0.8, ls="--", label="chance")
        ax.set_ylabel("accuracy (acc_norm), bars: ± one standard error")
        ax.set_title(f"{task} accuracy (n={base.get(acc.replace('mc_acc', 'mc_n'))})")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def pareto_front(points: Sequence[tuple[float, float]] | Sequence[tuple[float, float, float | None]],
                 z: float = Z, diff_se: Callable[[int, int], float | None] | None = None) -> list[tuple[float, float]]:
    """Points (speedup, loss[, standard error of the loss]) that no faster point matches in quality.

    With errors, a faster point matches a slower one unless the slower one's loss is lower by more than `z`
    standard errors of the difference: a quality edge within noise does not earn a place on the front.
    `diff_se(i, j)` gives that error for points i and j (paired, when they were scored on the same questions);
    by default the two errors combined as independent.
    """
    errs = [p[2] if len(p) > 2 and p[2] is not None else 0.0 for p in points]

    def se(i: int, j: int) -> float:
        e = diff_se(i, j) if diff_se else None
        return math.hypot(errs[i], errs[j]) if e is None else e

    front = []
    for i, (s, q, *_) in enumerate(points):
        beaten = any((s2 > s or (s2 == s and q2 < q)) and q2 <= q + z * se(i, j)
                     for j, (s2, q2, *_) in enumerate(points))
        if not beaten:
            front.append((s, q))
    return sorted(front)


SPEEDUP_KEY = "total_speedup"  # the speedup SDR is computed on (prefill + decode, as the paper times)


def plot_quality_vs_speedup(doc: Mapping[str, Any], path: Path) -> Path:
    rows = [r for r in doc["rows"] if r.get(SPEEDUP_KEY) is not None]
    sweeps = [s["name"] for s in doc["config"]["sweeps"]]
    tasks = mc_series(doc)[:1]  # the first task: the one the selection and the SDR use
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(6.5 + 5.5 * len(tasks), 4.8), squeeze=False)
    panels = [("perplexity", None, "held-out perplexity (log scale, lower is better)", True)]
    panels += [(acc, se, f"{task} accuracy (acc_norm, ± one standard error)", False) for task, acc, se in tasks]
    for ax, (key, se_key, ylabel, log) in zip(axes[0], panels):
        seen = set()
        pts, kept = [], []
        for r in rows:
            if r.get(key) is None:
                continue
            target = r["target"]
            lab = LABELS.get(target, target) + ("" if r["sweep"] == sweeps[0] else f" [{r['sweep']}]")
            st = _style(sweeps, r["sweep"]) if r["num"] else {"marker": "*"}
            se = r.get(se_key) if se_key else None
            if se:
                ax.errorbar(r[SPEEDUP_KEY], r[key], yerr=se, color=COLORS.get(target), capsize=3, lw=0.8, zorder=2)
            ax.scatter(r[SPEEDUP_KEY], r[key], color=COLORS.get(target), marker=st["marker"], s=60 if r["num"] else 160,
                       label=None if lab in seen else ("baseline" if target == "baseline" else lab), zorder=3)
            seen.add(lab)
            if r["num"]:
                ax.annotate(str(r["num"]), (r[SPEEDUP_KEY], r[key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
            pts.append((r[SPEEDUP_KEY], r[key] if log else -r[key], se))
            kept.append(r)
        task = None if key == "mc_acc" else key[len("mc_acc["):-1]
        front = pareto_front(pts, diff_se=None if log else lambda i, j: diff_stderr(kept[i], kept[j], task))
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] if log else -p[1] for p in front], color="gray", lw=1, ls="--",
                    label="Pareto front" + ("" if log else " (edges within 2 s.e. do not count)"), zorder=2)
        if log:
            log_y(ax)
        ax.axvline(1.0, color="gray", lw=0.6, ls=":")
        ax.set_xlabel("total speedup vs base (prefill + decode time, x, measured alternately)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0, 0].set_title("quality vs speed (numbers = modules dropped)")
    if tasks:
        axes[0, 1].set_title("accuracy vs speed (SDR gamma in the table)")
    fig.tight_layout()
    return save_png(fig, path)


def context_series(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{target: the main sweep's row at that target's largest count}, for the rows timed at several prompt
    lengths (`speed_by_length`); empty when the study timed one length."""
    main = main_sweep(doc)
    out: dict[str, Mapping[str, Any]] = {}
    for r in doc["rows"]:
        if r["sweep"] == main and r["num"] > 0 and len(r.get("speed_by_length") or []) > 1:
            if r["target"] not in out or r["num"] > out[r["target"]]["num"]:
                out[r["target"]] = r
    return dict(sorted(out.items(), key=lambda kv: list(LABELS).index(kv[0]) if kv[0] in LABELS else 9))


def plot_speedup_vs_context(doc: Mapping[str, Any], path: Path) -> Path:
    """Prefill, decode and total speedup against the prompt length, one line per drop (each target of the main
    sweep at its largest count): whether attention drops gain more as the context grows."""
    series = context_series(doc)
    gen_len = doc["config"]["speed"]["gen_len"]
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.6), sharex=True)
    for ax, phase in zip(axes, ("prefill", "decode", "total")):
        for i, (target, r) in enumerate(series.items()):
            pts = r["speed_by_length"]
            ax.plot([p["prompt_len"] for p in pts], [p[f"{phase}_speedup"] for p in pts], color=COLORS.get(target),
                    marker=MARKERS[i % len(MARKERS)], label=f"{LABELS.get(target, target)}-{r['num']}")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_PLAIN)
        ax.set_xlabel(f"prompt tokens (then {gen_len} generated)")
        ax.set_title(f"{phase} speedup vs base")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("speedup (x, base and dropped timed alternately)")
    axes[0].legend(fontsize=8)
    fig.suptitle("speedup against context length (each target at its largest count dropped)", fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)


def drop_order(scores: Mapping[str, Any], kind: str) -> list[int]:
    """Layers in the order a one-shot drop of `kind` removes them (lowest score first, ties by layer)."""
    vals = scores[kind]
    return [i for _, i in sorted((v, i) for i, v in enumerate(vals) if v is not None)]


def _scores_label(doc: Mapping[str, Any], sweep: Mapping[str, Any]) -> str | None:
    """The `doc["scores"]` entry of this sweep's (metric, calibration), as `DropSets.all_scores` labels it."""
    cal = {**doc["config"]["calibration"], **(sweep.get("calibration") or {})}
    exact = f"{sweep['metric']} | {Path(str(cal['source'])).name} x{cal['num_samples']}"
    if exact in doc["scores"]:
        return exact
    return next((k for k in doc["scores"] if k.startswith(f"{sweep['metric']} |")), next(iter(doc["scores"]), None))


def _iterative_grid(sets: Mapping[str, Sequence[Sequence[int]]], kind: str, n: int) -> Any:
    """Rows n = 1..L of an iterative walk: 1 = dropped at that count, NaN = a count the walk did not store."""
    import numpy as np

    grid = np.full((n, n), np.nan)
    for k, (attn, mlp) in sets.items():
        k = int(k)
        if not 1 <= k <= n:
            continue
        layers = set(attn) if kind == "attn" else set(mlp) if kind == "mlp" else set(attn) & set(mlp)
        grid[k - 1] = [1.0 if i in layers else 0.0 for i in range(n)]
    return grid


def plot_drop_order(doc: Mapping[str, Any], path: Path) -> Path:
    """Paper Fig. 6: rows n = 1..L, a filled cell = that layer is dropped when n modules go.

    It follows the main sweep's schedule: one-shot = the order of one scoring pass; iterative = the sets the
    re-scoring walk actually reached (`doc["drop_order"]`, read from the study cache). A kind the iterative
    sweep did not walk is shown one-shot, and its panel says so.
    """
    from ...scoring.schedule import resolve_schedule

    import numpy as np

    main = doc["config"]["sweeps"][0]
    label = _scores_label(doc, main)
    rescores = resolve_schedule(main["schedule"]).rescores
    walked = (doc.get("drop_order") or {}).get("sets", {}) if rescores else {}
    if label is None and not walked:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no importance scores (baseline only)", ha="center", va="center")
        ax.axis("off")
        return save_png(fig, path)
    s = doc["scores"].get(label) if label else None
    n = len(s["attn"]) if s else int(doc.get("num_layers") or 0)
    kinds = ["attn", "mlp", "block"]
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 5.0), sharey=True)
    marks = {}
    for r in doc["rows"]:
        if r["sweep"] == main["name"] and r["num"] > 0:
            marks.setdefault(r["target"], set()).add(r["num"])
    cmap = plt.get_cmap("Blues").with_extremes(bad="#eeeeee")  # set_bad is deprecated
    for ax, kind in zip(axes, kinds):
        if kind in walked:
            grid = _iterative_grid(walked[kind], kind, n)
            stored = [k for k in range(n) if not np.isnan(grid[k, 0])]
            first = ",".join(str(i) for i in np.flatnonzero(grid[stored[0]] > 0)) if stored else None
            first_n = stored[0] + 1 if stored else 1
            how = f"iterative, step {main['step']}"
        elif s is not None:
            order = drop_order(s, kind)
            grid = np.zeros((n, n))
            for k in range(1, n + 1):
                for layer in order[:k]:
                    grid[k - 1, layer] = 1.0
            first, first_n = (order[0] if order else None), 1
            how = "one-shot" + ("; not in the iterative sweep" if rescores else "")
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(LABELS[kind])
            continue
        ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1.4, origin="lower",
                  extent=(-0.5, n - 0.5, 0.5, n + 0.5), interpolation="nearest")
        for k in sorted(marks.get(kind, ())):
            ax.axhline(k, color=COLORS[kind], lw=1.2)
            ax.text(n - 0.4, k, f" n={k}", color=COLORS[kind], va="center", fontsize=7)
        ax.set_title(f"{LABELS[kind]} ({how}): first dropped" + (f" (n={first_n})" if first_n > 1 else "")
                     + f" = layer {'-' if first is None else first}", fontsize=10)
        ax.set_xlabel("layer index")
        ax.set_xticks(range(0, n, max(1, n // 15)))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("number dropped n (filled = layer dropped)")
    if walked:
        title = (f"dropping order, {main['metric']} re-scored after every {main['step']} dropped (iterative sweep "
                 f"'{main['name']}'; grey rows: counts the walk did not reach; lines: n evaluated)")
    else:
        title = f"dropping order, one-shot {label} (lines: n evaluated in the sweep)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)
