"""`VisionDropModule`: a LightningModule for image classification around a (possibly dropped) vision transformer.

Mirrors the decoder `DropModule`'s interface so drop callbacks can treat both alike: the Hugging Face model
is `self.model` (= `self.hf_model`), `drop_plan` / `apply_drop(attn, mlp)` read and change the drop
(flat block indices), and the plan is stored in Lightning checkpoints (`checkpoint["lightning_drop"]`) and
re-applied in `on_load_checkpoint`, before Lightning loads the weights. Families without a classification
class in transformers (DINOv3 ViT) get a linear head on the pooled output (`self.head`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..errors import UserError
from ..core.modeling_dropped import apply_drop, dropped_layers
from ..lightning.module import DropPlan
from ..core.architectures import VISION_SPECS, vision_spec

CKPT_KEY = "lightning_drop"
FAMILIES = tuple(spec.family for spec in VISION_SPECS)


def build_vision_model(family: str = "vit", init_config: dict[str, Any] | None = None, model_path: str | None = None,
                       num_labels: int = 10, seed: int | None = None) -> nn.Module:
    """A vision model: loaded from `model_path` (plain or dropped checkpoint), or `family` at random init with
    the family's tiny defaults overridden by `init_config` (e.g. hidden_size, num_hidden_layers, image_size)."""
    import transformers

    from ..io.dropped_checkpoint import read_config

    if model_path:
        from ..io.dropped_checkpoint import load_dropped

        vision_spec(str(read_config(model_path).get("model_type", "")))
        return load_dropped(model_path)
    if family not in FAMILIES:
        raise UserError(f"unknown vision family '{family}'; choose from {', '.join(FAMILIES)}")
    spec = vision_spec(family)
    kwargs = {**spec.tiny_overrides, **(init_config or {})}
    if spec.classification_class:
        kwargs["num_labels"] = num_labels
    config = getattr(transformers, spec.config_class)(**kwargs)
    cls = getattr(transformers, spec.classification_class or spec.model_classes[0])
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config)


def tiny_vision_model(family: str, seed: int = 0, num_labels: int = 10, **overrides: Any) -> nn.Module:
    """Random-init tiny model of `family` in eval mode (tests)."""
    return build_vision_model(family, overrides, num_labels=num_labels, seed=seed).eval()


def hidden_size(config: Any) -> int:
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    return int(config.embed_dim * 2 ** (len(config.depths) - 1))  # SwinV2 final stage width


class VisionDropModule(pl.LightningModule):
    """Image classification with cross-entropy; logs train/loss, val/loss, val/acc, test/acc.

    Args:
        family: vision family for random init (vit, dinov2, dinov2_with_registers, dinov3_vit, swinv2).
        init_config: config overrides for random init (hidden_size, num_hidden_layers, image_size, ...).
        model_path: a saved (plain or dropped) checkpoint to start from instead.
        num_labels: classes.
        lr, weight_decay, warmup_steps: AdamW with linear warmup then cosine decay to 10% over the run.
    """

    def __init__(self, family: str = "vit", init_config: dict[str, Any] | None = None, model_path: str | None = None,
                 num_labels: int = 10, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        if lr <= 0:
            raise UserError(f"lr must be positive, got {lr}")
        if num_labels < 2:
            raise UserError(f"num_labels must be at least 2, got {num_labels}")
        self.save_hyperparameters()
        self.model = build_vision_model(family, init_config, model_path, num_labels, seed)
        self.spec = vision_spec(self.model)
        self.head: nn.Module | None = None
        if self.spec.classification_class is None:
            self.head = nn.Linear(hidden_size(self.model.config), num_labels)
        self.val_acc = MulticlassAccuracy(num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_labels, average="micro")

    # --- the interface drop callbacks use -------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        return self.model

    @property
    def drop_plan(self) -> DropPlan:
        """(attention, MLP) flat block indices dropped so far."""
        return DropPlan(*dropped_layers(self.model))

    def apply_drop(self, attn: list[int] = (), mlp: list[int] = ()) -> None:  # type: ignore[assignment]
        apply_drop(self.model, attn=attn, mlp=mlp)

    def classifier(self) -> nn.Module:
        """The classification head (fine-tuned alone after a drop)."""
        return self.head if self.head is not None else self.model.classifier

    def freeze_backbone(self) -> list[nn.Parameter]:
        """Freeze everything but the head; returns the head's parameters."""
        head = list(self.classifier().parameters())
        ids = {id(p) for p in head}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)
        return head

    def unfreeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(True)

    # --- training -------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if self.head is not None:
            return self.head(out.pooler_output)
        return out.logits

    def _step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_acc.update(logits, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # every rank validates: the mean of all
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.test_acc.update(logits, y)
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000

        def factor(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            t = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        attn, mlp = dropped_layers(self.model)
        checkpoint[CKPT_KEY] = {"drop_attn_list": attn, "drop_mlp_list": mlp, "family": self.spec.family}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        plan = checkpoint.get(CKPT_KEY)
        if not plan:
            return
        attn_now, mlp_now = dropped_layers(self.model)
        attn = [i for i in plan["drop_attn_list"] if i not in attn_now]
        mlp = [i for i in plan["drop_mlp_list"] if i not in mlp_now]
        if attn or mlp:
            apply_drop(self.model, attn=attn, mlp=mlp)
