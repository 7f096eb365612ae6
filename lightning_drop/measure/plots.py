"""The importance figure (matplotlib, headless): one function draws every importance heatmap of the package.

`importance_figure` takes panels of rows x layers (a row is a kind of module, or a scoring step); the
callers are `plot_importance` (one score set, the modules this drop removes outlined: `lightning-drop drop`),
`lightning_drop.jobs.study.figures.plot_importance_heatmap` (one panel per score set of a study) and
`ImportanceTracker.figure` (one panel per kind, a row per scoring step).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from ..io.atomic_io import save_figure  # noqa: E402
from ..scoring.importance import KINDS, ImportanceScores  # noqa: E402

KIND_LABELS = {"attn": "attention", "mlp": "MLP", "block": "block"}
METRIC_LABELS = {"cosine": "1 - cos(X, Y)", "cosine_no_residual": "1 - cos (no residual)",
                 "angular": "arccos(cos)/pi", "relative_magnitude": "||f(x)||/||x+f(x)||"}
_MAX_ROW_TICKS = 12
# token-mixer kinds as short x labels: a hybrid's figure shows which kind each layer's mixer is
MIXER_LABELS = {"full_attention": "attn", "sliding_attention": "swa", "linear_attention": "lin", "mamba": "mamba",
                "conv": "conv"}


class PlainLogFormatter(LogFormatter):
    """Log-scale tick labels as plain numbers (0.2, 150), not 2 x 10^-1; between decades only where the axis
    spans two decades or less, so a wide axis is not crowded with labels."""

    def __init__(self, fmt: str = "{:.2g}") -> None:
        super().__init__(labelOnlyBase=False, minor_thresholds=(2, 0.5))
        self.fmt = fmt

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return self.fmt.format(x)


@dataclass
class Panel:
    """One heatmap: `values[row][layer]` (None: the module is gone), `rows` labels its rows, `marked` holds
    (row, layer) cells to outline (the modules a drop removes), `columns` labels each layer (its mixer kind)."""

    title: str
    rows: Sequence[str]
    values: Sequence[Sequence[float | None]]
    metric: str = ""
    marked: Collection[tuple[int, int]] = field(default_factory=tuple)
    columns: Sequence[str] = ()


def score_panel(scores: Any, title: str, drop_attn: Sequence[int] = (), drop_mlp: Sequence[int] = ()) -> Panel:
    """A panel of one score set (`ImportanceScores` or its dict): rows attention, MLP, block."""
    get = scores.row if isinstance(scores, ImportanceScores) else scores.__getitem__
    metric = scores.metric if isinstance(scores, ImportanceScores) else scores.get("metric", "")
    attn, mlp = set(drop_attn), set(drop_mlp)
    marked = [(0, i) for i in attn] + [(1, i) for i in mlp] + [(2, i) for i in attn & mlp]
    extra = scores.extra if isinstance(scores, ImportanceScores) else scores.get("extra") or {}
    columns = [f"{i}\n{MIXER_LABELS.get(k, k)}" for i, k in enumerate(extra.get("mixer_kinds") or ())]
    return Panel(title, [KIND_LABELS[k] for k in KINDS], [list(get(k)) for k in KINDS], metric, marked, columns)


def importance_figure(panels: Sequence[Panel], *, row_axis: str = "", log_color: bool = True,
                      side_by_side: bool = False, rows_upward: bool = False, title: str | None = None) -> Any:
    """Heatmaps of importance, layers on x (lower = more redundant); returns the matplotlib figure.

    `log_color`: a logarithmic color scale when every value of a panel is positive (layer 0 often dwarfs the
    rest; a log scale shows them all). `side_by_side`: panels in one row instead of a column. `rows_upward`:
    the first row at the bottom (a time axis) instead of at the top.
    """
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    n = max((len(r) for p in panels for r in p.values), default=0)
    rows = max((len(p.rows) for p in panels), default=1)
    width = max(4.3, 0.16 * n + 2.0) if side_by_side else max(7.0, 0.3 * n + 3.0)
    height = max(1.9, 0.22 * min(rows, 30) + 1.2)
    shape = (1, len(panels)) if side_by_side else (len(panels), 1)
    fig, axes = plt.subplots(*shape, squeeze=False, constrained_layout=True,
                             figsize=(width * shape[1], height * shape[0] + (0.5 if title else 0.2)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # modules already gone
    for ax, p in zip(axes.flat, panels):
        data = np.array([[math.nan if v is None else float(v) for v in r] + [math.nan] * (n - len(r))
                         for r in p.values], dtype=float).reshape(len(p.values), n)
        finite = data[np.isfinite(data)]
        norm = None
        if log_color and finite.size and finite.min() > 0 and finite.min() < finite.max():
            norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", origin="lower" if rows_upward else "upper",
                       cmap=cmap, norm=norm,
                       interpolation="nearest")
        for r, c in p.marked:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=2))
        stride = max(1, -(-len(p.rows) // _MAX_ROW_TICKS))
        ticks = list(range(0, len(p.rows), stride))
        ax.set_yticks(ticks, [str(p.rows[i]) for i in ticks])
        if p.columns:
            ax.set_xticks(range(len(p.columns)), p.columns)
        else:
            ax.set_xticks(range(0, n, max(1, n // 32)))
        ax.tick_params(axis="x", labelsize=7 if not p.columns else 6)
        ax.set_xlabel("layer index" + (" and token-mixer kind" if p.columns else ""))
        if row_axis:
            ax.set_ylabel(row_axis)
        ax.set_title(p.title + ("\nred outline: dropped" if p.marked else ""), fontsize=10)
        cb = fig.colorbar(im, ax=ax, pad=0.01, shrink=0.9)
        if norm is not None:
            cb.ax.yaxis.set_major_formatter(PlainLogFormatter())
            cb.ax.yaxis.set_minor_formatter(PlainLogFormatter())
        cb.set_label(METRIC_LABELS.get(p.metric, p.metric) + (" (log)" if norm is not None else ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_importance(scores: ImportanceScores, path: str | os.PathLike, drop_attn: Sequence[int] = (),
                    drop_mlp: Sequence[int] = (), title: str | None = None) -> Path:
    """One score set (rows attention, MLP, block), the dropped modules outlined. Written atomically."""
    metric = METRIC_LABELS.get(scores.metric, scores.metric)
    fig = importance_figure([score_panel(scores, title or f"Importance per layer ({metric}; lower = more "
                                                          "redundant)", drop_attn, drop_mlp)])
    return save_figure(fig, Path(path), dpi=110)
