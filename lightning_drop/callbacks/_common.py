"""Helpers shared by the callbacks: the wrapped HF model, calibration data, optimizer rebuilds, scoring device
and logging to `trainer.loggers`. How callbacks cooperate at fit end is `fit_end`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

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
    """Rows of a batch (token windows or images) in batches of `batch_size`."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]


class CalibrationSource:
    """Fixed calibration batches: the datamodule's `calibration_batch()` (token windows, or images from an
    image datamodule) or windows of a named text source.

    Args (as on the callbacks): source (None = the datamodule), samples, seq_len, batch_size; `limit` keeps
    the datamodule's first rows only (None: all it gives).
    """

    def __init__(self, source: str | None, samples: int, seq_len: int, batch_size: int, owner: str,
                 limit: int | None = None) -> None:
        for name, v in (("calibration_samples", samples), ("calibration_seq_len", seq_len),
                        ("calibration_batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MisconfigurationException(f"{owner}: {name} must be an integer >= 1, got {v!r}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise MisconfigurationException(f"{owner}: calibration_limit must be an integer >= 1, got {limit!r}")
        self.source, self.samples, self.seq_len, self.batch_size, self.owner = source, samples, seq_len, batch_size, owner
        self.limit = limit
        self._batches: list[dict[str, torch.Tensor]] | None = None
        self._digest: str | None = None

    def batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the calibration batches (all of them on one process).

        Scores are token-weighted sums that add up across ranks when they sync, so N ranks scoring a share
        each give the scores of one process scoring every batch, N times sooner. A rank may get none, except
        on a sharded model, whose every forward is a collective: when the batches do not split evenly there,
        every rank scores all of them (the synced sums grow N-fold, their ratios stay the same).
        """
        from lightning_drop.lightning.distributed import data_parallel_share, is_sharded

        if self._batches is None:
            from lightning_drop.measure.importance_history import windows_digest

            batch = self._load(trainer, pl_module)
            if "input_ids" in batch:
                self._digest = windows_digest(batch["input_ids"])
            self._batches = split_batch(batch, self.batch_size)
        # a tensor-parallel group splits one forward: its processes score the same share (their sums grow alike)
        rank, world = data_parallel_share(trainer)
        if len(self._batches) % world and isinstance(pl_module, nn.Module) and is_sharded(pl_module):
            return list(self._batches)
        return self._batches[rank::world]

    def record(self) -> dict[str, Any]:
        """Which windows were scored: the options, and the digest of the token windows once loaded (an
        offline scoring of saved checkpoints on the same windows shows the same digest)."""
        return {"source": self.source or "datamodule", "samples": self.samples, "seq_len": self.seq_len,
                "limit": self.limit, "windows_sha256": self._digest}

    def _load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        if self.source is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "calibration_batch"):
                raise MisconfigurationException(
                    f"{self.owner}: no calibration data: the datamodule has no `calibration_batch()`; give it one, "
                    "or set `calibration_source` to a text source (e.g. c4-sample or a .jsonl file)"
                )
            batch = dm.calibration_batch()
            return batch if self.limit is None else {k: v[:self.limit] for k, v in batch.items()}
        from lightning_drop.io.text_data import load_documents, make_windows

        tok = getattr(pl_module, "tokenizer", None) or getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is None:
            raise MisconfigurationException(f"{self.owner}: calibration_source needs a tokenizer on the module")
        docs = load_documents(self.source)
        ids = make_windows(tok, docs, self.seq_len, self.samples)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def rebuild_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """After the model's parameters changed mid-fit: re-wrap DDP (or shard again under FSDP2), rebuild optimizers
    and schedulers.

    The optimizer state (e.g. Adam moments) of every surviving parameter carries over; schedulers continue
    from the current step (`lr_step_offset`, when the module has one). This is the one place that relies on
    Lightning internals (`tests/test_callbacks.py::test_rebuild_optimizers_pins_lightning` pins them): the
    strategy's `_setup_model` / `_register_ddp_hooks` (DDP keeps the old parameter set otherwise),
    `setup_optimizers` (calls `configure_optimizers` and replaces `trainer.optimizers` and
    `trainer.lr_scheduler_configs`, which the fit loop reads at every step) and `_optimizers_to_device`.
    """
    from lightning.fabric.utilities.optimizer import _optimizers_to_device
    from torch.nn.parallel import DistributedDataParallel

    from lightning_drop.lightning.distributed import is_fsdp2, reshard_module

    old_state = {id(p): s for opt in trainer.optimizers for p, s in opt.state.items()}
    if hasattr(pl_module, "lr_step_offset"):
        pl_module.lr_step_offset = trainer.global_step
    strategy = trainer.strategy
    if is_fsdp2(strategy) and hasattr(pl_module, "unshard"):  # sharded again if made plain for the change
        by_name = reshard_module(pl_module)  # the state of parameters that are new objects now, by name
        old_state.update({id(p): by_name[n] for n, p in pl_module.named_parameters() if n in by_name})
    if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "_setup_model"):
        strategy.model = strategy._setup_model(strategy.lightning_module)
        if hasattr(strategy, "_register_ddp_hooks"):
            strategy._register_ddp_hooks()
    strategy.setup_optimizers(trainer)
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in old_state:
                    opt.state[p] = old_state[id(p)]
    _optimizers_to_device(trainer.optimizers, strategy.root_device)


def ensure_unsharded(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Before the model's structure changes during a sharded fit (a drop, adapters attached or merged): make it
    plain on every rank (`DropModule.unshard`, a collective); `rebuild_optimizers` shards it again."""
    from lightning_drop.lightning.distributed import is_sharded

    if is_sharded(pl_module):
        unshard = getattr(pl_module, "unshard", None)
        if unshard is None:
            raise MisconfigurationException(f"{type(pl_module).__name__} cannot change a sharded model: use "
                                            "lightning_drop.DropModule")
        unshard()


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


def log_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float | None] | None = None, *,
                   figure: Any = None, tag: str | None = None, image_file: str | os.PathLike | None = None) -> None:
    """Log through every logger of the trainer, from any hook (`self.log` is not allowed in `on_train_end`;
    loggers are rank-zero-only themselves, as for Lightning's `LearningRateMonitor`).

    `metrics`: scalars (None values are skipped). `figure` + `tag`: a matplotlib figure for loggers that take
    figures (TensorBoard `add_figure`); `image_file` (the same figure saved as PNG) for those with `log_image`
    (W&B, Neptune, ...).
    """
    clean = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
    for logger in trainer.loggers:
        if clean:
            logger.log_metrics(clean, step=trainer.global_step)
        if figure is None:
            continue
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "add_figure"):
            exp.add_figure(tag, figure, global_step=trainer.global_step, close=False)
        elif hasattr(logger, "log_image") and image_file is not None:
            logger.log_image(key=tag, images=[str(image_file)], step=trainer.global_step)
