"""`lightning-drop track`: importance of every block, attention and MLP layer across a series of checkpoints.

The offline counterpart of the live `ImportanceTracker`: the same calibration windows (the tracker's options,
`make_windows` over the same source), the same scorer and the same files and figure
(`measure.importance_history`), one row per checkpoint instead of per training step. The paper's Figure 7
(importance across the released pre-training checkpoints) is one call over a model's hub revisions.

Imports nothing heavy at module level: the command line reads `track_main`'s signature for `--help`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from ..errors import UserError
from ..io.output_targets import check_output

if TYPE_CHECKING:
    import torch

    from ..io.model_series import SeriesItem

TrackDtype = Literal["float32", "bfloat16", "float16"]


def track_main(models: Sequence[str], output: str, metric: str = "cosine", calibration: str = "c4-sample",
               text_field: str = "text", num_samples: int = 16, seq_len: int = 256, batch_size: int = 8,
               tokenizer: str | None = None, dtype: TrackDtype = "float32", linear_color: bool = False,
               overwrite: bool = False) -> dict[str, Any]:
    """Score a series of checkpoints of one model on the same calibration windows and write layer x checkpoint
    heatmaps per kind (block, attention, MLP) with the history as JSON and CSV.

    Args:
        models: the checkpoints, in order: DropModule training checkpoints (.ckpt), Hugging Face directories,
            catalogue names, hub ids with an optional @revision (owner/name@step1000)
        output: directory for importance_history.json, importance_history.csv and importance_heatmap.png
        metric: importance metric
        calibration: calibration text (as ImportanceTracker's calibration_source): a file, a HF dataset, or
            c4-sample / wiki-sample / tinystories-sample (offline)
        text_field: text field of json/jsonl/parquet/HF sources
        num_samples: calibration windows (as the tracker's calibration_samples)
        seq_len: tokens per window (as the tracker's calibration_seq_len)
        batch_size: windows per forward pass
        tokenizer: tokenizer reference; needed when every model is a .ckpt (they carry none)
        dtype: weights dtype while scoring (scores accumulate in float64 regardless)
        linear_color: a linear color scale in the heatmaps (default: logarithmic, as the tracker)
        overwrite: replace a non-empty --output directory

    Returns the document that OUTPUT/importance_history.json holds.
    """
    from ..io.text_data import check_source
    from ..scoring.metrics import resolve_metric

    if not models:
        raise UserError("--models: give at least one checkpoint")
    for name, value in (("--num-samples", num_samples), ("--seq-len", seq_len), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    resolve_metric(metric)
    check_output(output, overwrite=overwrite, sources=[*models, calibration, tokenizer])
    check_source(calibration)
    items = series_items(models, "--models")  # missing files, revisions not in the cache: before any loading
    return _score_series(items, Path(output), metric, calibration, text_field, num_samples, seq_len, batch_size,
                         tokenizer, dtype, not linear_color)


def series_items(models: Sequence[str], where: str, like: str | None = None) -> list[SeriesItem]:
    """Each checkpoint described without loading weights and checked to be one model's (of `like`'s
    architecture and vocabulary when given): a missing file, a revision not in the offline cache or a mixed
    series is one line naming `where`, before any loading."""
    from ..io.model_series import check_series, describe

    if not models:
        raise UserError(f"{where}: give at least one checkpoint")
    try:
        items = [describe(m) for m in models]
        check_series([describe(like), *items] if like is not None else items)
    except (UserError, FileNotFoundError) as err:
        raise UserError(f"{where}: {err}") from None
    return items


def series_record(source: str, windows: torch.Tensor) -> dict[str, Any]:
    """The calibration record a history carries (the live tracker's shape): two histories scored the same
    windows iff their `windows_sha256` agree."""
    from ..measure.importance_history import windows_digest

    return {"source": source, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "limit": None,
            "windows_sha256": windows_digest(windows)}


def score_checkpoint(item: SeriesItem, windows: torch.Tensor, batch_size: int, metric: str, dtype: str, tok: Any,
                     tokenizer: str | None = None) -> dict[str, Any]:
    """One history entry: `item` loaded alone (then freed) and scored on `windows` by `batch_size`."""
    import torch

    from ..io.model_loading import check_tokenizer
    from ..io.model_series import load_item
    from ..measure.importance_history import KINDS
    from ..scoring.importance import compute_importance

    batches = [{"input_ids": windows[i:i + batch_size], "attention_mask": torch.ones_like(windows[i:i + batch_size])}
               for i in range(0, len(windows), batch_size)]
    model, _ = load_item(item, getattr(torch, dtype))
    check_tokenizer(tok, model.get_input_embeddings().num_embeddings, item.ref, tokenizer)
    scores = compute_importance(model, batches, metric=metric)
    del model
    return {"step": item.step, "label": item.label, "checkpoint": item.ref, "event": "checkpoint",
            "metric": metric, "num_tokens": scores.num_tokens, **{k: scores.row(k) for k in KINDS}}


def write_series(directory: Path, metric: str, history: Sequence[dict[str, Any]], record: dict[str, Any],
                 log_color: bool = True) -> None:
    """The history's JSON and CSV and its layer x checkpoint heatmaps into `directory`."""
    from ..io.atomic_io import save_figure
    from ..measure.importance_history import HEATMAP_PNG, history_figure, write_history

    write_history(directory, metric, history, record)
    save_figure(history_figure(history, metric, "checkpoint", log_color), directory / HEATMAP_PNG, dpi=110)


def _score_series(items: Sequence[SeriesItem], output: Path, metric: str, calibration: str, text_field: str,
                  num_samples: int, seq_len: int, batch_size: int, tokenizer: str | None, dtype: str,
                  log_color: bool) -> dict[str, Any]:
    from ..io.atomic_io import atomic_dir
    from ..io.model_series import series_tokenizer
    from ..io.text_data import load_documents, make_windows
    from ..measure.importance_history import HEATMAP_PNG

    tok = series_tokenizer(items, tokenizer)
    windows = make_windows(tok, load_documents(calibration, text_field=text_field), seq_len, num_samples)
    record = series_record(calibration, windows)
    history: list[dict[str, Any]] = []
    for n, item in enumerate(items, 1):
        t0 = time.perf_counter()
        history.append(score_checkpoint(item, windows, batch_size, metric, dtype, tok, tokenizer))
        print(f"[{n}/{len(items)}] {item.ref}: scored in {time.perf_counter() - t0:.1f} s", flush=True)
    with atomic_dir(output) as tmp:
        write_series(tmp, metric, history, record, log_color)
    print(f"wrote {output}/importance_history.json, .csv and {HEATMAP_PNG} ({len(items)} checkpoints)")
    return {"metric": metric, "history": history, "calibration": record}
