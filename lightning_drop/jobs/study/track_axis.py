"""The study's `track` axis: the importance of every layer across a series of checkpoints of the study's model,
scored on the study's calibration windows by the functions behind `lightning-drop track` (`jobs.track`), each
checkpoint cached like any other study item, written to OUTPUT/track/ as `track` writes its output directory
(history JSON and CSV, layer x checkpoint heatmaps), and shown in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ...io.atomic_io import atomic_dir
from ..track import score_checkpoint, series_items, series_record, write_series
from .cache import Cache, CacheKeys, key_of
from .sweep import StudyInputs

TRACK_DIR = "track"
TRACK_TITLE = "Importance across checkpoints"


def _stamp(item: Any) -> Any:
    """What a checkpoint's scores depend on besides its reference: the size and time of its local files (a
    retrained `.ckpt` under the same name is scored again); a hub snapshot's path names its commit."""
    path = Path(item.path)
    if item.kind not in ("ckpt", "dir"):
        return item.path
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def track_history(inputs: StudyInputs, cache: Cache, keys: CacheKeys, out: Path) -> dict[str, Any]:
    """Score (or read from the cache) every checkpoint of `track.models`, write OUTPUT/track/ and return the
    results document's `track` part: the metric, the history (one entry per checkpoint) and the windows' record."""
    import torch

    cfg = inputs.cfg
    spec = cfg.track
    assert spec is not None
    items = series_items(spec.models, "track.models", like=cfg.model)
    calib = cfg.calibration
    windows: list[Any] = []  # cut by the study's tokenizer only when a checkpoint is not cached

    def the_windows() -> Any:
        if not windows:
            windows.append(torch.cat(inputs.calibration_batches(calib)))
        return windows[0]

    history, record = [], None
    for item in items:
        key = key_of({"kind": "track", **keys.model(), "calibration": keys.calibration(calib), "metric": spec.metric,
                      "checkpoint": item.ref, "files": _stamp(item)})

        def compute(item: Any = item) -> dict[str, Any]:
            with inputs.timed("track", f"track: scoring {item.ref}"):
                entry = score_checkpoint(item, the_windows(), calib.batch_size, spec.metric, cfg.model_dtype,
                                         inputs.tokenizer)
            return {"entry": entry, "calibration": series_record(calib.source, the_windows())}

        hit = cache.get_or_compute("track", key, compute)
        history.append(hit["entry"])
        record = hit["calibration"]
    with atomic_dir(out / TRACK_DIR) as tmp:
        write_series(tmp, spec.metric, history, record, not spec.linear_color)
    inputs.log(f"track: {len(items)} checkpoint(s) written to {out / TRACK_DIR}")
    return {"metric": spec.metric, "history": history, "calibration": record, "path": TRACK_DIR}


def track_section(doc: Mapping[str, Any], fig_dir: Path) -> tuple[list[str], list[list[str]], Path, str] | None:
    """The report's table (a row per checkpoint and kind, a column per layer) and heatmap of the track axis."""
    track = doc.get("track")
    if not track:
        return None
    from ...io.atomic_io import save_figure
    from ...measure.importance_history import KINDS, history_figure

    history = track["history"]
    fig = fig_dir / "track_heatmap.png"
    linear = bool((doc["config"].get("track") or {}).get("linear_color"))
    save_figure(history_figure(history, track["metric"], "checkpoint", not linear), fig, dpi=110)
    n = max(len(e["attn"]) for e in history)
    header = ["checkpoint", "kind", *(f"layer {i}" for i in range(n))]
    rows = [[str(e.get("label", e["step"])), kind, *("-" if v is None else f"{v:.4g}" for v in e[kind])]
            for e in history for kind in KINDS]
    cal = track["calibration"]
    caption = (f"{track['metric']} importance of every layer at each checkpoint of track.models, on the study's "
               f"{cal['samples']} x {cal['seq_len']} calibration windows of {cal['source']} (lower = more "
               f"redundant; '-' = already dropped); the history is in {track['path']}/importance_history.json and "
               ".csv, as `lightning-drop track` writes it.")
    return header, rows, fig, caption
