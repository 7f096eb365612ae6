"""Lightning callbacks for vision dropping: importance tracking during training, drop + evaluation at fit end.

They work on any LightningModule with a `model` attribute holding a supported vision model (such as
`VisionDropModule`) and a datamodule with `test_dataloader()` (and, optionally, `calibration_dataloader()`).

`VisionLayerDrop` follows the LLM-Vision-Drop fork's evaluation at the end of training (`on_train_end`, model
still on its device): test accuracy of the trained model -> score and drop -> test accuracy right after the
drop -> fine-tune the classification head alone (backbone frozen) -> test accuracy again; plus images/s and
FLOPs per image of baseline vs dropped in one run, and a run-time check that dropped sublayers do no work.
Everything goes to `report_path` (JSON, atomic write) and to the trainer's loggers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ..callbacks._common import log_to_loggers
from ..callbacks.importance_tracker import HISTORY_JSON, ImportanceTracker
from ..io.dropped_checkpoint import atomic_write_text
from ..errors import UserError
from ..scoring.metrics import resolve_metric
from ..core.modeling_dropped import apply_drop, dropped_layers
from ..core.options import TARGETS
from ..scoring.schedule import drop_by_importance, resolve_schedule
from ..measure.sublayer_check import check_really_skipped
from .speed import compare_image_throughput


def _calibration(trainer: pl.Trainer, max_images: int) -> list[torch.Tensor]:
    dm = trainer.datamodule
    loader = dm.calibration_dataloader() if hasattr(dm, "calibration_dataloader") else dm.train_dataloader()
    out, n = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out.append(x)
        n += len(x)
        if n >= max_images:
            break
    return out


class VisionImportanceTracker(ImportanceTracker):
    """`ImportanceTracker` scoring on the image datamodule's calibration images (`calibration_batch()`).

    The vision arguments keep their names: `calibration_images` caps the images used; `output` names the
    history JSON (its directory also gets the CSV and the heatmap). Any other `ImportanceTracker` argument
    (`at_fit_start`, `heatmap`, `log_scalars`, ...) may be given too.
    """

    def __init__(self, every_n_steps: int = 50, metric: str = "cosine", calibration_images: int = 128,
                 output: str | None = None, calibration_batch_size: int = 64, **tracker_args: Any) -> None:
        if not isinstance(calibration_images, int) or isinstance(calibration_images, bool) or calibration_images < 1:
            raise MisconfigurationException(
                f"VisionImportanceTracker: calibration_images must be an integer >= 1, got {calibration_images!r}")
        super().__init__(every_n_steps=every_n_steps, metric=metric, calibration_batch_size=calibration_batch_size,
                         output_dir=str(Path(output).parent) if output else None, **tracker_args)
        self.calibration.limit = calibration_images
        self.output = output

    def write_history(self, out_dir: str | Path) -> None:
        super().write_history(out_dir)
        if self.output and Path(self.output).name != HISTORY_JSON:
            atomic_write_text(self.output, (Path(out_dir) / HISTORY_JSON).read_text())


@torch.no_grad()
def evaluate_accuracy(pl_module: pl.LightningModule, loader: Any) -> float:
    """Top-1 accuracy of `pl_module(images)` over a loader of (images, labels)."""
    was = pl_module.training
    pl_module.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(pl_module.device), y.to(pl_module.device)
        correct += int((pl_module(x).argmax(-1) == y).sum())
        total += len(y)
    pl_module.train(was)
    if total == 0:
        raise UserError("the evaluation loader is empty")
    return correct / total


def finetune_head(pl_module: pl.LightningModule, loader: Any, epochs: int, lr: float) -> float:
    """Train only the classification head (backbone frozen, eval mode); returns the last epoch's mean loss."""
    params = pl_module.freeze_backbone()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was = pl_module.training
    pl_module.eval()
    last = float("nan")
    try:
        for _ in range(epochs):
            total, n = 0.0, 0
            for x, y in loader:
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                with torch.enable_grad():
                    loss = F.cross_entropy(pl_module(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                total, n = total + float(loss.detach()) * len(y), n + len(y)
            last = total / max(1, n)
    finally:
        pl_module.unfreeze()
        pl_module.train(was)
    return last


class VisionLayerDrop(pl.Callback):
    """At the end of training: drop `num` modules chosen by importance, fine-tune the head, report.

    Args:
        target: block | attn | mlp | joint. num: modules to drop. metric / schedule / step: as in
            `lightning_drop.scoring.schedule.drop_by_importance`. keep: flat block indices never dropped.
        calibration_images: training images used for scoring.
        head_epochs / head_lr: head fine-tuning after the drop (0 epochs: none).
        speed_batch_size / speed_iters: images/s measurement (0 iters: skip speed).
        report_path: JSON report. save_dir: write the dropped model (`save_vision_dropped`) there.
    """

    def __init__(self, target: str = "attn", num: int = 1, metric: str = "cosine", schedule: str = "one-shot",
                 step: int = 1, keep: list[int] | None = None, calibration_images: int = 256, head_epochs: int = 3,
                 head_lr: float = 1e-3, speed_batch_size: int = 64, speed_iters: int = 5,
                 report_path: str | None = None, save_dir: str | None = None) -> None:
        if target not in TARGETS:
            raise MisconfigurationException(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
        try:
            resolve_metric(metric), resolve_schedule(schedule)
        except UserError as err:
            raise MisconfigurationException(str(err)) from None
        if num < 1 or step < 1:
            raise MisconfigurationException(f"num and step must be at least 1, got num={num}, step={step}")
        if head_epochs < 0 or speed_iters < 0:
            raise MisconfigurationException("head_epochs and speed_iters must be >= 0")
        self.target, self.num, self.metric, self.schedule, self.step = target, num, metric, schedule, step
        self.keep = list(keep or [])
        self.calibration_images, self.head_epochs, self.head_lr = calibration_images, head_epochs, head_lr
        self.speed_batch_size, self.speed_iters = speed_batch_size, speed_iters
        self.report_path, self.save_dir = report_path, save_dir
        self.report: dict[str, Any] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "test_dataloader"):
            raise MisconfigurationException("VisionLayerDrop needs a datamodule with test_dataloader()")
        model = pl_module.model
        test = dm.test_dataloader()
        report: dict[str, Any] = {"target": self.target, "num": self.num, "metric": self.metric,
                                  "schedule": self.schedule}
        report["test_acc_before"] = evaluate_accuracy(pl_module, test)
        base = copy.deepcopy(model) if self.speed_iters else None
        calib = _calibration(trainer, self.calibration_images)
        # Every rank scores (the scores are synced, so every rank takes part in each round) on a copy; rank
        # zero's choice is broadcast and that is what every rank applies to its own model.
        trial = copy.deepcopy(model)
        result = drop_by_importance(trial, calib, self.target, self.num, self.metric, self.schedule, self.step,
                                    self.keep)
        del trial
        attn, mlp = trainer.strategy.broadcast((result.attn, result.mlp))
        have_attn, have_mlp = dropped_layers(model)
        apply_drop(model, attn=sorted(set(attn) - set(have_attn)), mlp=sorted(set(mlp) - set(have_mlp)))
        report.update(drop_attn_list=attn, drop_mlp_list=mlp, rounds=[r.to_dict() for r in result.rounds],
                      block_names=pl_module.spec.block_names(model))
        report["test_acc_after_drop"] = evaluate_accuracy(pl_module, test)
        if self.head_epochs:
            report["head_loss"] = finetune_head(pl_module, dm.train_dataloader(), self.head_epochs, self.head_lr)
            report["test_acc_after_head_finetune"] = evaluate_accuracy(pl_module, test)
        report["sublayer_calls"] = check_really_skipped(model, calib[0][:2])
        if base is not None:
            report["speed"] = compare_image_throughput(base, model, self.speed_batch_size, iters=self.speed_iters)
            del base
        self.report = report
        self._write(trainer, pl_module, report)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: dict[str, Any]) -> None:
        metrics = {f"drop/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))}
        for k in ("speedup", "flops_ratio"):
            if "speed" in report:
                metrics[f"drop/{k}"] = float(report["speed"][k])
        log_to_loggers(trainer, metrics)
        line = (f"VisionLayerDrop: dropped attn {report['drop_attn_list']} mlp {report['drop_mlp_list']}; test acc "
                f"{report['test_acc_before']:.4f} -> {report['test_acc_after_drop']:.4f}")
        if "test_acc_after_head_finetune" in report:
            line += f" -> {report['test_acc_after_head_finetune']:.4f} (head fine-tuned)"
        if "speed" in report:
            line += f"; images/s x{report['speed']['speedup']:.2f}, FLOPs x{report['speed']['flops_ratio']:.3f}"
        rank_zero_info(line)
        if self.report_path:
            atomic_write_text(self.report_path, json.dumps(report, indent=1) + "\n")
        if self.save_dir:
            from ..io.dropped_checkpoint import save_dropped

            save_dropped(pl_module.model, Path(self.save_dir), overwrite=True)  # a re-run replaces its own output
