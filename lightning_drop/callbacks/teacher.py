"""Where a distillation teacher comes from, whether it fits its student, where it runs (or its stored top-k
instead of it), and how a resumed fit gets it back.

A teacher given by reference is loaded through `model_loading.load_model`; any teacher must predict over the
student's vocabulary with the student's tokenizer (checked when the tokenizer is known), and block outputs
can only be matched between models of the same depth and width. Errors are one line naming the teacher.

Resume of a teacher copied from the model before the drop: the checkpoint records when the copy was taken. A
copy taken at fit start (step 0) is the module's source model, so it is rebuilt the same way: the drop
callback re-applies its drops on the freshly loaded model and calls `before_drop` first; a fingerprint of the
weights (per-tensor sums) proves it is the same model. A copy taken during training has trained weights found
nowhere else, so they are saved in the checkpoint (in the teacher's dtype) and loaded from it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_drop.errors import UserError
from lightning_drop.io.teacher_logits import TeacherLogitStore, output_vocab_size, prepare_store, training_windows
from lightning_drop.lightning.distributed import is_fsdp2, is_sharded, shard_model
from lightning_drop.io.training_checkpoint import model_from_config
from lightning_drop.lightning.sharded_weights import full_tensors

from ._common import hf_of


def teacher_dtype_of(owner: str, name: str | None) -> torch.dtype | None:
    """The torch dtype a `teacher_dtype` argument names (None: keep the teacher's own)."""
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MisconfigurationException(f"{owner}: teacher_dtype must name a floating torch dtype such as "
                                        f"'bfloat16', got {name!r}")
    return dtype


def load_teacher(ref: str, dtype: torch.dtype | None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a teacher reference; a reference that does not load is a one-line error."""
    from lightning_drop.io.model_loading import load_model

    try:
        return load_model(ref, dtype=dtype or torch.float32)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MisconfigurationException(f"Distillation: teacher {ref!r} does not load: {reason}") from err


def check_teacher(pl_module: pl.LightningModule, model: nn.Module, tokenizer: Any, ref: str,
                  compare_hidden: bool) -> None:
    """One vocabulary (and tokenizer, when known) for teacher and student; the same depth and width when
    block outputs are compared (`compare_hidden`)."""
    student = hf_of(pl_module)
    s_vocab, t_vocab = output_vocab_size(student), output_vocab_size(model)
    if s_vocab != t_vocab:
        raise MisconfigurationException(f"Distillation: teacher {ref!r} has a vocabulary of {t_vocab} tokens, the "
                                        f"student {s_vocab}: distillation needs one shared vocabulary")
    mine = getattr(pl_module, "tokenizer", None)
    if mine is not None and tokenizer is not None and mine.get_vocab() != tokenizer.get_vocab():
        theirs = tokenizer.get_vocab()
        differ = sum(1 for k, v in mine.get_vocab().items() if theirs.get(k) != v)
        raise MisconfigurationException(f"Distillation: teacher {ref!r} has another tokenizer than the student "
                                        f"({differ} tokens map to other ids): both must share one vocabulary")
    if compare_hidden:
        s_cfg, t_cfg = student.config, model.config
        if (s_cfg.num_hidden_layers, s_cfg.hidden_size) != (t_cfg.num_hidden_layers, t_cfg.hidden_size):
            raise MisconfigurationException(
                f"Distillation: hidden_weight > 0 compares block outputs, but teacher {ref!r} has "
                f"{t_cfg.num_hidden_layers} layers of width {t_cfg.hidden_size}, the student "
                f"{s_cfg.num_hidden_layers} of {s_cfg.hidden_size}")


def shared_blocks(*models: nn.Module) -> list[int]:
    """Blocks that every model still has (not fully dropped): where their outputs can be compared."""
    from lightning_drop.core.architectures import get_spec
    from lightning_drop.core.modeling_dropped import dropped_layers

    n = len(get_spec(models[0]).get_layers(models[0]))
    gone: set[int] = set()
    for m in models:
        attn, mlp = dropped_layers(m)
        gone |= set(attn) & set(mlp)
    return [i for i in range(n) if i not in gone]


def frozen(model: nn.Module) -> nn.Module:
    """`model` as a teacher: no gradients, eval mode."""
    model.requires_grad_(False)
    return model.eval()


def copied_teacher_state(teacher: nn.Module | None, step: int | None, mark: torch.Tensor | None,
                         config: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's record of a teacher copied at global step `step` (None: no copied teacher): the step and
    the fingerprint, and for a copy taken during training (`step > 0`) its config and weights."""
    copied = teacher is not None and step is not None
    trained = copied and step > 0  # weights found nowhere else: they go into the checkpoint
    return {"teacher_step": step if copied else None, "teacher_fingerprint": mark if copied else None,
            "teacher_config": config if trained else None,
            # a sharded teacher is gathered tensor by tensor (every rank takes part: a collective)
            "teacher_weights": dict(full_tensors(teacher, keep=True)) if trained else None}


def restored_teacher(state: dict[str, Any], current: nn.Module | None, mark: torch.Tensor | None
                     ) -> nn.Module | None:
    """The teacher a resumed fit continues with (`state` from `copied_teacher_state`): a model built from the
    checkpoint's weights for a copy taken during training; None when the copy taken at fit start was rebuilt
    already (`current`, whose fingerprint `mark` must be the checkpoint's)."""
    saved = state["teacher_fingerprint"]
    if state.get("teacher_weights") is not None:
        weights = state["teacher_weights"]
        model = model_from_config(state["teacher_config"], next(iter(weights.values())).dtype)
        model.load_state_dict(weights)
        return model
    if current is None:
        raise MisconfigurationException(
            "Distillation: cannot rebuild the teacher: the checkpoint's teacher was copied before a fit-start "
            "drop, but no drop was made or re-applied in this fit's setup; list the same LayerDrop callbacks")
    if mark is None or mark.shape != saved.shape or not torch.allclose(mark, saved, rtol=1e-5, atol=1e-6):
        raise MisconfigurationException(
            "Distillation: the teacher rebuilt from the module's source model differs from the one this "
            "checkpoint's fit copied (a random init without a fixed seed, or a module trained before the "
            "fit?): resume with the same model and seed_everything")
    return None


def place_teacher(teacher: nn.Module | None, trainer: pl.Trainer, device: torch.device | None,
                  dtype: torch.dtype | None) -> None:
    """Move the teacher where it runs: under FSDP2 sharded as the student is (frozen, so no optimizer sees
    it), else on `device` (None: the student's) in `dtype` (None: as it is)."""
    strategy = trainer.strategy
    if teacher is not None and is_fsdp2(strategy):
        if not is_sharded(teacher):
            teacher.to(device=strategy.root_device, dtype=dtype)
            shard_model(teacher, strategy.device_mesh["data_parallel"], strategy.root_device)
    elif teacher is not None:
        teacher.to(device=device or strategy.root_device, dtype=dtype)


def stored_teacher_logits(directory: str, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          teacher: nn.Module | None, k: int, temperature: float, dtype: str,
                          digest: str | None) -> TeacherLogitStore:
    """The teacher's top-k over every training window in `directory`, written by rank zero when absent and
    reused when it matches (`digest`: the store a resumed checkpoint trained with). Every rank calls it (one
    barrier each)."""
    if trainer.datamodule is None:
        raise MisconfigurationException("Distillation: teacher_logits stores the teacher over the training "
                                        "windows of a LightningDataModule: fit with `datamodule=`")
    loader = trainer.datamodule.train_dataloader()
    try:
        return prepare_store(
            directory, training_windows(loader.dataset), teacher=teacher, k=k, temperature=temperature, dtype=dtype,
            vocab_size=output_vocab_size(teacher if teacher is not None else hf_of(pl_module)),
            batch_size=loader.batch_size or 8, writer=trainer.is_global_zero, barrier=trainer.strategy.barrier,
            digest=digest, log=rank_zero_info)
    except UserError as err:
        raise MisconfigurationException(f"Distillation: {err}") from err
