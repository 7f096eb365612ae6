"""An importance history: block, attention and MLP scores of one model at a series of points, as files and a figure.

The points are the scoring steps of a live fit (`ImportanceTracker`) or a series of saved checkpoints
(`lightning-drop track`); both write the same three files through this module, so a live run and an offline
series read alike: `importance_history.json` (every entry, the metric and the calibration windows' record),
`importance_history.csv` (one row per point x kind) and `importance_heatmap.png` (one panel per kind, a row
per point, layers on x; `plots.importance_figure`).

An entry is `{"step", "event", "metric", "num_tokens", "attn", "mlp", "block"}` (a score per layer, None where
the module is gone), with `label` (the figure's row name) and `checkpoint` (its reference) for a series.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.atomic_io import atomic_write_text

KINDS = ("attn", "mlp", "block")
HISTORY_JSON = "importance_history.json"
HISTORY_CSV = "importance_history.csv"
HEATMAP_PNG = "importance_heatmap.png"


def windows_digest(input_ids: Any) -> str:
    """SHA-256 of calibration token windows (shape and ids): two scorings used the same windows iff equal."""
    import torch

    ids = torch.as_tensor(input_ids).to(torch.int64).contiguous()
    h = hashlib.sha256(repr(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()


def write_history(out_dir: str | os.PathLike, metric: str, history: Sequence[Mapping[str, Any]],
                  calibration: Mapping[str, Any] | None = None) -> None:
    """`importance_history.json` and `.csv` into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    n = max((len(e["attn"]) for e in history), default=0)
    doc: dict[str, Any] = {"metric": metric, "num_layers": n, "history": list(history)}
    if calibration is not None:
        doc["calibration"] = dict(calibration)
    atomic_write_text(out_dir / HISTORY_JSON, json.dumps(doc, indent=1) + "\n")
    series = any("checkpoint" in e for e in history)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "event"] + (["checkpoint"] if series else []) + ["kind"] + [f"layer_{i}" for i in range(n)])
    for e in history:
        for k in KINDS:
            w.writerow([e["step"], e["event"]] + ([e.get("checkpoint", "")] if series else []) + [k]
                       + ["" if v is None else f"{v:.8g}" for v in e[k]])
    atomic_write_text(out_dir / HISTORY_CSV, buf.getvalue())


def history_figure(history: Sequence[Mapping[str, Any]], metric: str, row_axis: str = "training step",
                   log_color: bool = True) -> Any:
    """The layer x point heatmaps (matplotlib figure): one panel per kind side by side, the first point at the
    bottom, modules already gone blank."""
    from .plots import KIND_LABELS, Panel, importance_figure

    rows = [str(e.get("label", e["step"])) for e in history]
    panels = [Panel(f"{KIND_LABELS[kind]} importance ({metric})", rows, [e[kind] for e in history], metric)
              for kind in KINDS]
    return importance_figure(panels, row_axis=row_axis, log_color=log_color, side_by_side=True, rows_upward=True)
