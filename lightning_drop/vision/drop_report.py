"""`ImageDropReport`: what a drop did to an image classifier, measured at the end of training.

The drop itself is `LayerDrop`'s, as for language models. This callback follows the LLM-Vision-Drop fork's
evaluation (`on_train_end`, model still on its device): test accuracy before the drop (taken when the drop
is about to happen, through the `before_drop` hook every drop calls) -> test accuracy of the dropped model
-> fine-tune the classification head alone (backbone frozen) -> test accuracy again; plus images/s and FLOPs
per image of the model before vs after the drop in one run, and a run-time check that dropped sublayers do
no work. Everything goes to `report_path` (JSON, atomic write) and to the trainer's loggers.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ..callbacks._common import hf_of, log_to_loggers
from ..callbacks.fit_end import FitEnd, FitEndMember, final_model
from ..core.architectures import vision_spec
from ..core.modeling_dropped import dropped_layers
from ..errors import UserError
from ..io.atomic_io import atomic_write_text
from ..lightning.distributed import refuse_if_sharded
from ..lightning.task import ImageClassification
from ..measure.sublayer_check import check_really_skipped
from .speed import compare_image_throughput


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
    head = list(pl_module.task.classifier(hf_of(pl_module)).parameters())
    ids = {id(p) for p in head}
    trainable = {p: p.requires_grad for p in pl_module.parameters()}
    for p in pl_module.parameters():
        p.requires_grad_(id(p) in ids)
    opt = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
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
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        pl_module.train(was)
    return last


class ImageDropReport(FitEndMember):
    """Report test accuracy before / after the fit's drops and after a head fine-tune, and images/s.

    Needs a `DropModule` training an image classifier and a datamodule with `test_dataloader()` (such as
    `lightning_drop.vision.image_data.ImageDataModule`). Wherever it stands in the callback list, it reports
    on the final model (`LayerDrop(when="fit_end")` done).

    Args:
        head_epochs / head_lr: head fine-tuning after the drop (0 epochs: none).
        speed_batch_size / speed_iters: images/s measurement (0 iters: skip speed).
        report_path: JSON report.
    """

    def __init__(self, head_epochs: int = 3, head_lr: float = 1e-3, speed_batch_size: int = 64,
                 speed_iters: int = 5, report_path: str | None = None) -> None:
        for name, v in (("head_epochs", head_epochs), ("speed_iters", speed_iters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise MisconfigurationException(f"ImageDropReport: {name} must be an integer >= 0, got {v!r}")
        if not isinstance(speed_batch_size, int) or speed_batch_size < 1:
            raise MisconfigurationException(f"ImageDropReport: speed_batch_size must be >= 1, got {speed_batch_size!r}")
        self.head_epochs, self.head_lr = head_epochs, head_lr
        self.speed_batch_size, self.speed_iters, self.report_path = speed_batch_size, speed_iters, report_path
        self.report: dict[str, Any] = {}
        self._before: tuple[float, Any] | None = None  # (test accuracy, copy for speed) before the first drop

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_if_sharded(trainer, "ImageDropReport (it measures the whole image model at fit end)", "use DDP")
        if not isinstance(getattr(pl_module, "task", None), ImageClassification):
            raise MisconfigurationException("ImageDropReport needs a DropModule training an image classifier "
                                            "(a vision `family` or checkpoint)")
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "test_dataloader"):
            raise MisconfigurationException("ImageDropReport needs a datamodule with test_dataloader()")

    def before_drop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._before is None:  # the model as it was before the first drop of this fit
            self._before = self._baseline(trainer, pl_module)

    def _baseline(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, Any]:
        base = copy.deepcopy(hf_of(pl_module)) if self.speed_iters else None
        return evaluate_accuracy(pl_module, trainer.datamodule.test_dataloader()), base

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = final_model(trainer, pl_module)  # runs a fit-end drop listed after this callback first
        if self._before is None:
            self._before = self._baseline(trainer, pl_module)
        acc_before, base = self._before
        dm = trainer.datamodule
        test = dm.test_dataloader()
        attn, mlp = dropped_layers(model)
        rounds = [r for drop in FitEnd.of(trainer).drops() for r in getattr(drop, "rounds", [])]
        report: dict[str, Any] = {"test_acc_before": acc_before, "drop_attn_list": attn, "drop_mlp_list": mlp,
                                  "rounds": rounds, "block_names": vision_spec(model).block_names(model)}
        report["test_acc_after_drop"] = evaluate_accuracy(pl_module, test)
        if self.head_epochs:
            report["head_loss"] = finetune_head(pl_module, dm.train_dataloader(), self.head_epochs, self.head_lr)
            report["test_acc_after_head_finetune"] = evaluate_accuracy(pl_module, test)
        images = next(iter(test))[0][:2].to(pl_module.device)
        report["sublayer_calls"] = check_really_skipped(model, images)
        if base is not None:
            report["speed"] = compare_image_throughput(base, model, self.speed_batch_size, iters=self.speed_iters)
        self._before = None
        self.report = report
        self._write(trainer, report)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._before = None
        super().teardown(trainer, pl_module, stage)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, report: dict[str, Any]) -> None:
        metrics = {f"drop/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))}
        for k in ("speedup", "flops_ratio"):
            if "speed" in report:
                metrics[f"drop/{k}"] = float(report["speed"][k])
        log_to_loggers(trainer, metrics)
        line = (f"ImageDropReport: dropped attn {report['drop_attn_list']} mlp {report['drop_mlp_list']}; test acc "
                f"{report['test_acc_before']:.4f} -> {report['test_acc_after_drop']:.4f}")
        if "test_acc_after_head_finetune" in report:
            line += f" -> {report['test_acc_after_head_finetune']:.4f} (head fine-tuned)"
        if "speed" in report:
            line += f"; images/s x{report['speed']['speedup']:.2f}, FLOPs x{report['speed']['flops_ratio']:.3f}"
        rank_zero_info(line)
        if self.report_path:
            atomic_write_text(self.report_path, json.dumps(report, indent=1) + "\n")
