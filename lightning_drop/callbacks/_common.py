"""Helpers shared by the drop callbacks: the wrapped HF model, calibration data, optimizer rebuilds, and the
final model that fit-end measurements must see whatever the callback order."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn


def hf_of(pl_module: pl.LightningModule) -> nn.Module:
    """The plain transformers model of `pl_module` (`DropModule.hf_model`, else its `.model`)."""
    model = getattr(pl_module, "hf_model", None)
    if isinstance(model, nn.Module):
        return model
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(pl_module, "config"):  # the LightningModule is the transformers model itself
        return pl_module
    raise MisconfigurationException(
        f"{type(pl_module).__name__} exposes no transformers model: use lightning_drop.DropModule or give the "
        "LightningModule a `.model` attribute holding the Hugging Face model"
    )


def split_batch(batch: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]


class CalibrationSource:
    """Fixed calibration batches: the datamodule's `calibration_batch()` or windows of a named source.

    Args (as on the callbacks): source (None = the datamodule), samples, seq_len, batch_size.
    """

    def __init__(self, source: str | None, samples: int, seq_len: int, batch_size: int, owner: str) -> None:
        for name, v in (("calibration_samples", samples), ("calibration_seq_len", seq_len),
                        ("calibration_batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MisconfigurationException(f"{owner}: {name} must be an integer >= 1, got {v!r}")
        self.source, self.samples, self.seq_len, self.batch_size, self.owner = source, samples, seq_len, batch_size, owner
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, torch.Tensor]]:
        if self._batches is None:
            self._batches = split_batch(self._load(trainer, pl_module), self.batch_size)
        return self._batches

    def _load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        if self.source is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "calibration_batch"):
                raise MisconfigurationException(
                    f"{self.owner}: no calibration data: the datamodule has no `calibration_batch()`; set "
                    "`calibration_source` (e.g. c4-sample or a .jsonl file)"
                )
            return dm.calibration_batch()
        from lightning_drop.data import load_documents, make_windows

        tok = getattr(pl_module, "tokenizer", None) or getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is None:
            raise MisconfigurationException(f"{self.owner}: calibration_source needs a tokenizer on the module")
        docs = load_documents(self.source)
        ids = make_windows(tok, docs, self.seq_len, self.samples)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _rewrap_ddp(strategy: Any) -> None:
    """Re-wrap the LightningModule in DDP after its parameter set changed (DDP keeps the old set)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "_setup_model"):
        strategy.model = strategy._setup_model(strategy.lightning_module)
        if hasattr(strategy, "_register_ddp_hooks"):
            strategy._register_ddp_hooks()


def rebuild_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """After the model's parameters changed mid-fit: re-wrap DDP, rebuild optimizers and schedulers.

    The optimizer state (e.g. Adam moments) of every surviving parameter carries over; schedulers continue
    from the current step (`DropModule.lr_step_offset`).
    """
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    old_state = {id(p): s for opt in trainer.optimizers for p, s in opt.state.items()}
    if hasattr(pl_module, "lr_step_offset"):
        pl_module.lr_step_offset = trainer.global_step
    _rewrap_ddp(trainer.strategy)
    trainer.strategy.setup_optimizers(trainer)
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in old_state:
                    opt.state[p] = old_state[id(p)]
    _optimizers_to_device(trainer.optimizers, trainer.strategy.root_device)


@contextmanager
def scoring_device(trainer: pl.Trainer, model: nn.Module) -> Iterator[None]:
    """Score on `trainer.strategy.root_device` even before the strategy moved the model (`Callback.setup`).

    The score sync (torchmetrics) is then a collective on that device: a CPU tensor cannot go through NCCL.
    Single-device and DDP strategies would move the model there next anyway, so it stays; any other (FSDP
    shards from where the model is, with or without CPU offload) gets it back where it was.
    """
    device = trainer.strategy.root_device
    p = next(model.parameters(), None)
    if p is None or p.device == device:
        yield
        return
    model.to(device)
    if type(trainer.strategy).__name__ in ("SingleDeviceStrategy", "DDPStrategy"):
        yield
        return
    try:
        yield
    finally:
        model.to(p.device)


def final_model(trainer: pl.Trainer, pl_module: pl.LightningModule, merged_copy: bool = False) -> nn.Module:
    """The model as this fit leaves it, for fit-end measurements, whatever their place in `trainer.callbacks`.

    Asks, in callback order, every `LayerDrop(when="fit_end")` to drop now and every `LoRARecovery(merge=True)`
    to merge now (both idempotent: their own `on_train_end` then does nothing), and returns the plain
    transformers model. Call it on every rank (a drop scores and broadcasts). Adapters that stay attached
    (`merge=False`) still act inside the returned model; `merged_copy=True` returns a merged deep copy then
    (for what must see a plain checkpoint: quantization, speed of the deployable model).
    """
    from .layer_drop import LayerDrop
    from .lora_recovery import LoRARecovery

    for cb in trainer.callbacks:
        if isinstance(cb, LayerDrop):
            cb.drop_at_fit_end(trainer, pl_module)
        elif isinstance(cb, LoRARecovery):
            cb.merge_now(pl_module)
    wrapped = getattr(pl_module, "model", None)
    if getattr(pl_module, "lora_config", None) is not None and hasattr(wrapped, "merge_and_unload"):
        if merged_copy:
            return copy.deepcopy(wrapped).merge_and_unload()
    return hf_of(pl_module)


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Log through every logger (allowed in any hook; loggers are rank-zero-only themselves)."""
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
