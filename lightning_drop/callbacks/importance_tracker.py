"""`ImportanceTracker`: block / attention / MLP importance over training, on a fixed calibration batch.

Scores at fit start (`on_train_start`, after any checkpoint restore), every `every_n_steps` optimizer steps
and at fit end (`on_train_end`, while the model is still on the accelerator). All ranks compute (the scores
are torchmetrics states, synchronized across processes); global rank zero writes
`importance_history.json` / `.csv` and `importance_heatmap.png` (`measure.importance_history`, the files and
figure `lightning-drop track` writes for a series of saved checkpoints; the JSON records which calibration
windows were scored, by digest) atomically into a directory that every rank
resolves before that (the trainer's log dir is a broadcast: asked on rank zero alone it would hang DDP;
`ModelCheckpoint` resolves its dirpath on all ranks for the same reason). Scalars and the layer x step
heatmap go through every Lightning logger (`trainer.loggers`, as `LearningRateMonitor` does): TensorBoard
gets `add_figure`, loggers with `log_image` (W&B, ...) get the image. Every scoring point comes after the
strategy set the model up: under FSDP2 the hooks sit on sharded layers, which run with their full
parameters, and every rank scores the same number of batches (each forward is a collective there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.io.atomic_io import atomic_file
from lightning_drop.measure.importance_history import HEATMAP_PNG, KINDS, history_figure, write_history

from ._common import CalibrationSource, hf_of, log_to_loggers

__all__ = ["ImportanceTracker"]


class ImportanceTracker(Callback):
    """Track how important every block, attention and MLP sublayer is as training goes.

    Args:
        every_n_steps: score every this many optimizer steps (also at fit start and fit end).
        metric: importance metric (`lightning_drop.core.options.METRICS`).
        calibration_source / calibration_samples / calibration_seq_len / calibration_batch_size: as on
            `LayerDrop` (None = the datamodule's `calibration_batch()`).
        calibration_limit: keep only the first rows (windows, images) of the datamodule's calibration batch.
        output_dir: where the history files and the PNG go (default: the trainer's log dir).
        log_scalars: log `importance/<kind>/layer_XX` through the loggers.
        heatmap: draw the layer x step heatmap (PNG file and loggers).
        log_color: logarithmic color scale in the heatmap.
        at_fit_start / at_fit_end: score at those points too.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        metric: str = "cosine",
        calibration_source: str | None = None,
        calibration_samples: int = 16,
        calibration_seq_len: int = 256,
        calibration_batch_size: int = 8,
        output_dir: str | None = None,
        log_scalars: bool = True,
        heatmap: bool = True,
        log_color: bool = True,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        prefix: str = "importance/",
        calibration_limit: int | None = None,
    ) -> None:
        from lightning_drop.errors import UserError
        from lightning_drop.scoring.metrics import resolve_metric

        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise MisconfigurationException(f"ImportanceTracker: every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        try:
            resolve_metric(metric)
        except UserError as err:
            raise MisconfigurationException(f"ImportanceTracker: {err}") from None
        self.every_n_steps, self.metric = every_n_steps, metric
        self.calibration = CalibrationSource(calibration_source, calibration_samples, calibration_seq_len,
                                             calibration_batch_size, "ImportanceTracker", calibration_limit)
        self.output_dir, self.log_scalars, self.heatmap, self.log_color = output_dir, log_scalars, heatmap, log_color
        self.at_fit_start, self.at_fit_end, self.prefix = at_fit_start, at_fit_end, prefix
        self.history: list[dict[str, Any]] = []
        self._last_seen_step = -1
        self._dir: Path | None = None

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "metric": self.metric}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    # ---------------------------------------------------------------------------------------- scoring
    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str) -> dict[str, Any]:
        """Score now (every rank), append to the history, write files and log (rank zero)."""
        from lightning_drop.lightning.distributed import whole_root
        from lightning_drop.scoring.importance import compute_importance

        with whole_root(pl_module):  # sharded: the scoring pass runs the decoder body, not the root
            scores = compute_importance(hf_of(pl_module), self.calibration.batches(trainer, pl_module),
                                        metric=self.metric)
        entry = {"step": trainer.global_step, "event": event, "metric": self.metric,
                 "num_tokens": scores.num_tokens, **{k: scores.row(k) for k in KINDS}}
        self.history.append(entry)
        if self.log_scalars:
            log_to_loggers(trainer, {f"{self.prefix}{k}/layer_{i:02d}": float(v) for k in KINDS
                                  for i, v in enumerate(entry[k]) if v is not None})
        out = self._out_dir(trainer)  # every rank: resolving it may be a collective
        if trainer.is_global_zero:
            self.write_history(out)
            if self.heatmap:
                self._heatmap(trainer, out)
        return entry

    def _out_dir(self, trainer: pl.Trainer) -> Path:
        """`output_dir`, else the trainer's log dir; call it on every rank (`trainer.log_dir` broadcasts)."""
        if self._dir is None:
            self._dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        return self._dir

    def write_history(self, out_dir: str | os.PathLike) -> None:
        """`importance_history.json` (all entries, the calibration windows' record) and `.csv`, atomically."""
        write_history(out_dir, self.metric, self.history, self.calibration.record())

    def figure(self) -> Any:
        """Matplotlib figure (`importance_history.history_figure`): one panel per kind, a row per scoring step,
        layers on x (dropped modules blank)."""
        return history_figure(self.history, self.metric, "training step", self.log_color)

    def _heatmap(self, trainer: pl.Trainer, out_dir: Path) -> None:
        fig = self.figure()
        png = out_dir / HEATMAP_PNG
        try:
            with atomic_file(png) as tmp:
                fig.savefig(tmp, dpi=110, format="png")
            log_to_loggers(trainer, figure=fig, tag=f"{self.prefix}heatmap", image_file=png)
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._dir = None  # a new fit may have a new logger version: resolved at its first score

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_seen_step = trainer.global_step
        if self.at_fit_start and not any(e["step"] == trainer.global_step for e in self.history):
            self.score(trainer, pl_module, "fit_start")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_seen_step:
            return
        self._last_seen_step = step
        if step % self.every_n_steps == 0:
            self.score(trainer, pl_module, "step")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and not (self.history and self.history[-1]["step"] == trainer.global_step):
            self.score(trainer, pl_module, "fit_end")
