"""Figures of importance scores (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic_io import save_figure  # noqa: E402
from .importance import ImportanceScores  # noqa: E402

_LABELS = {"attn": "attention", "mlp": "MLP", "block": "block"}


def plot_importance(scores: ImportanceScores, path: str | os.PathLike, drop_attn: Sequence[int] = (),
                    drop_mlp: Sequence[int] = (), title: str | None = None) -> Path:
    """Three bar rows (attention, MLP, block) of per-layer scores; dropped modules in red. Written atomically."""
    path = Path(path)
    dropped = {"attn": set(drop_attn), "mlp": set(drop_mlp), "block": set(drop_attn) & set(drop_mlp)}
    n = len(scores.attn)
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.32 * n + 2), 7.5), sharex=True)
    for ax, kind in zip(axes, ("attn", "mlp", "block")):
        values = scores.row(kind)
        xs = list(range(n))
        heights = [v if v is not None else 0.0 for v in values]
        colors = ["#d62728" if i in dropped[kind] else "#1f77b4" for i in xs]
        ax.bar(xs, [max(h, 1e-6) for h in heights], color=colors)
        for i, v in enumerate(values):
            if v is None:
                ax.text(i, 1e-6, "gone", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
        ax.set_yscale("log")
        ax.set_ylabel(f"{_LABELS[kind]}\nscore (log)")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("layer index")
    axes[-1].set_xticks(range(n))
    axes[-1].tick_params(axis="x", labelsize=7)
    from matplotlib.patches import Patch

    axes[0].legend(handles=[Patch(color="#1f77b4", label="kept"), Patch(color="#d62728", label="dropped")],
                   loc="upper right", fontsize=8)
    metric = {"cosine": "1 - cos(X, Y)"}.get(scores.metric, scores.metric)
    fig.suptitle(title or f"Importance per layer ({metric}; lower = more redundant)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
