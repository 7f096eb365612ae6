"""`LoRARecovery`: after a drop, freeze the model and train LoRA adapters (peft) to recover quality.

The adapters are the `lora` kind of `trainable.TrainableSet` (shared with `Distillation`): attached through
`DropModule.add_lora` (the module records them in every checkpoint so a resume rebuilds the same wrapped
model before the weights load) and merged back at the end of training (`merge_and_unload`), leaving the
plain dropped model class that `save_dropped` writes. It joins the fit's
record with the role `adapters` (see `fit_end`): the merge is its finishing step, so fit-end measurements see
the merged model wherever they stand in the callback list, and it learns from the record which drops it
recovers from (those listed before it) and when they are done.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.lightning.distributed import refuse_tensor_parallel

from ._common import ensure_unsharded, rebuild_optimizers
from .fit_end import FitEnd, FitEndMember
from .trainable import DEFAULT_TARGETS, LoRASettings, TrainableSet

__all__ = ["DEFAULT_TARGETS", "LoRARecovery"]


class LoRARecovery(FitEndMember):
    """Train LoRA adapters on the frozen (dropped) model.

    Args:
        r, alpha, dropout: LoRA rank, scaling numerator (`lora_alpha`) and dropout.
        target_modules: module names to adapt (peft `target_modules`), e.g. `[q_proj, v_proj]`.
        when: `after_drop` (as soon as every `LayerDrop` callback listed before it has finished its schedule;
            at setup if they drop at fit start or there is none) or `fit_start` (at setup, even before later
            step or fit-end drops). Drops that change the model before the adapters are attached come first
            in `trainer.callbacks`.
        merge: merge the adapters into the weights at the end of training (so evaluation callbacks that
            follow and `DropModule(save_dir=...)` see a plain dropped model).
        base_dtype: keep the frozen base in `bfloat16` / `float16` while the adapters train in float32
            (QLoRA-style; `nf4` needs bitsandbytes and CUDA, refused where they are missing); None: as loaded.
    """

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules: Sequence[str] = DEFAULT_TARGETS,
                 when: Literal["after_drop", "fit_start"] = "after_drop", merge: bool = True,
                 base_dtype: str | None = None) -> None:
        settings = LoRASettings.checked("LoRARecovery", r, alpha, dropout, target_modules, base_dtype=base_dtype)
        if when not in ("after_drop", "fit_start"):
            raise MisconfigurationException(f"LoRARecovery: unknown when {when!r}; choose after_drop or fit_start")
        self.trainable = TrainableSet("LoRARecovery", "lora", lora=settings)
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, list(settings.target_modules)
        self.when, self.merge, self.base_dtype = when, merge, base_dtype
        self.attached_at: int | None = None
        self.merged = False

    def state_dict(self) -> dict[str, Any]:
        return {"attached_at": self.attached_at, "merged": self.merged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.attached_at = state_dict["attached_at"]
        self.merged = state_dict["merged"]

    # -------------------------------------------------------------------------------------------------
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        what = self.trainable.apply(pl_module)
        self.attached_at = trainer.global_step
        rank_zero_info(f"LoRARecovery: {what} (attached at step {trainer.global_step})")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # peft wraps the linear layers a tensor-parallel plan splits, and its adapters would not be split alike
        refuse_tensor_parallel(trainer, "LoRARecovery (LoRA adapters on tensor-parallel layers)")
        # role `adapters`: the merge is a finishing step; drops listed later are checked when they join
        record = FitEnd.of(trainer).join(self, "adapters", finish=lambda tr, module: self.merge_now(module))
        late = [d for d in record.drops() if getattr(d, "when", None) == "fit_end"]
        if self.when == "after_drop" and late:
            raise MisconfigurationException(
                "LoRARecovery(when='after_drop') with a LayerDrop(when='fit_end'): the drop comes after training, "
                "so the adapters would never be attached; drop at fit start or a step, or use when='fit_start'")
        if self.when == "fit_start" or record.drops_finished():
            self._attach(trainer, pl_module)  # before optimizers exist: nothing to rebuild

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if getattr(pl_module, "lora_config", None) is not None or self.merged:
            return
        if FitEnd.of(trainer).drops_finished():
            ensure_unsharded(trainer, pl_module)
            self._attach(trainer, pl_module)
            rebuild_optimizers(trainer, pl_module)

    def merge_now(self, pl_module: pl.LightningModule) -> None:
        """Merge the adapters into the weights now when `merge=True` (idempotent; a sharded model keeps them,
        see `TrainableSet.merge`)."""
        if self.merge and self.trainable.merge(pl_module):
            self.merged = True
            rank_zero_info("LoRARecovery: adapters merged into the weights")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.merge_now(pl_module)
