"""`Distillation`: recover a dropped model by distilling the model as it was before the drop into it.

Loss per training step, over real (non-padding) tokens only:
`alpha * T^2 * KL(teacher || student)` of the next-token distributions at temperature `T`
`+ (1 - alpha) * LM loss` `+ hidden_weight * MSE(student, teacher block outputs) / mean(teacher^2)`, the last
at the outputs of the blocks both models still have (blockwise matching; 0 by default); the first two come
from one pass over the logits (`distill_loss.kd_and_lm_loss`). It reaches
`DropModule.training_step` through the module's one hook for that, `set_training_objective`, and its parts
are logged as `train/kd_loss`, `train/lm_loss` (and `train/hidden_loss`).

The teacher is frozen (`requires_grad_(False)`, eval mode, run under `no_grad`), optionally on another device
(`teacher_device`) and in lower precision (`teacher_dtype`); it is never a submodule of the LightningModule,
so DDP, checkpoints of the module and its optimizer never see it, and under DDP each rank holds its own; under
FSDP2 it is sharded like the student (each rank holds a shard; `teacher_device` is refused there). It is:

- by default, a deep copy of the model taken just before the first drop of the fit (`FitEnd.before_drop`,
  which the drop callbacks call on every rank): a fit-start drop, a mid-training drop and the first round
  of an iterative schedule all leave the undropped model as teacher;
- or `teacher: <reference>`, loaded with `model_loading.load_model` at setup (a catalogue name, a directory,
  a hub id), refused when its vocabulary or tokenizer differs from the student's.

- or, from Python, a model object (`teacher=model`): used as it is, frozen.

What trains is a `trainable.TrainableSet` (LoRA adapters, all weights, or chosen layers), as for
`LoRARecovery`; by default (`start: after_drops`) recovery starts once every drop listed before this callback
is finished (at setup for fit-start drops, after the last round for step and iterative drops, then the
optimizers are rebuilt), and the fit's record sees it with the role `adapters` (a LoRA merge is its
finishing step). `start: first_drop` heals between the rounds of an iterative `LayerDrop` with
`every_n_steps` (drop k, heal, score the healed model, drop the next k): recovery starts after the first
round; before each later round LoRA adapters are merged (the next scores see the healed model), after it
the trainable set is applied to the new model (fresh adapters; `near_drops` follows the new drops).

Resume: the state records when the copy was taken, and a resumed fit continues with the same teacher
(`teacher.copied_teacher_state`, `teacher.restored_teacher`).

With `teacher_logits: DIR` the teacher runs once, when recovery starts, over every training window, and its
top-k log-probabilities are stored in DIR (`lightning_drop.io.teacher_logits`); the teacher is then freed and
the KL is taken over the stored top-k and one tail bucket (`distill_loss.topk_kd_and_lm_loss`). The store on
disk is then the teacher's state: the checkpoint records its digest, and a resumed fit reuses it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_drop.errors import UserError
from lightning_drop.lightning.task import lm_batch
from lightning_drop.io.teacher_logits import TeacherLogitStore, check_store_options, fingerprint
from lightning_drop.lightning.distributed import is_fsdp2, refuse_tensor_parallel

from ._common import ensure_unsharded, hf_of, rebuild_optimizers
from .distill_loss import hidden_loss, kd_and_lm_loss, topk_kd_and_lm_loss
from .fit_end import FitEnd, FitEndMember
from .teacher import (
    check_teacher,
    copied_teacher_state,
    frozen,
    load_teacher,
    place_teacher,
    restored_teacher,
    shared_blocks,
    stored_teacher_logits,
    teacher_dtype_of,
)
from .trainable import DEFAULT_TARGETS, LoRASettings, TrainableSet


def _real_number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MisconfigurationException(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


class Distillation(FitEndMember):
    """Distill the model as it was before the drop (the teacher) into the dropped model (the student).

    Args:
        alpha: weight of the KL term; `1 - alpha` weighs the LM loss. In [0, 1].
        temperature: softmax temperature T of both distributions (> 0); the KL is scaled by T^2.
        hidden_weight: weight of the normalized MSE between block outputs both models have (>= 0; 0: off).
            With `alpha=0` and `hidden_weight=0` no teacher is built: the LM loss alone on the same
            trainable set (a control).
        teacher: None for a copy of the model taken just before the first drop, a model reference, or (from
            Python) a model object.
        teacher_device: where the teacher runs (`cpu`, `cuda:1`, ...); None: the student's device.
        teacher_dtype: the teacher's dtype (`bfloat16`, `float16`, ...); None: as loaded or copied.
        trainable: `lora` (adapters), `all` (every weight), `layers`, or `last_layers` (the output head and
            the last `last_k` remaining layers, as "Reassessing Layer Pruning" heals).
        layers: with `trainable: layers`: indices, `near_drops` or `last:K` (see `trainable`).
        last_k: with `trainable: last_layers`: how many of the last layers that still have weights train.
        r, lora_alpha, lora_dropout, target_modules: the LoRA adapters of `trainable: lora`.
        base_dtype: with `trainable: lora`: keep the frozen base in `bfloat16` / `float16` (QLoRA-style; `nf4`
            needs bitsandbytes and CUDA, refused where they are missing); None: the model's own dtype.
        merge: merge LoRA adapters into the weights at the end of training (as `LoRARecovery`).
        start: `after_drops` (recover once every drop listed before this callback is done) or `first_drop`
            (heal between the rounds of an iterative drop schedule, from the first round on).
        teacher_logits: a directory for the teacher's top-k log-probabilities over every training window
            (`lightning_drop.io.teacher_logits`): written once when recovery starts, reused when it matches, and
            used instead of a live teacher, which is then freed. None: the live teacher.
        teacher_logits_k: tokens kept per position (`k`); the rest of the teacher's mass is one tail bucket.
        teacher_logits_dtype: `float16` (2 bytes per value) or `float32` (exact, 4).
    """

    when = "after_drop"  # what the fit's record checks: it starts once the drops listed before it are done

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, hidden_weight: float = 0.0,
                 teacher: str | None = None, teacher_device: str | None = None, teacher_dtype: str | None = None,
                 trainable: str = "lora", layers: Sequence[int] | str | None = None, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.05,
                 target_modules: Sequence[str] = DEFAULT_TARGETS, merge: bool = True,
                 start: Literal["after_drops", "first_drop"] = "after_drops",
                 teacher_logits: str | None = None, teacher_logits_k: int = 64,
                 teacher_logits_dtype: str = "float16", last_k: int | None = None,
                 base_dtype: str | None = None) -> None:
        owner = "Distillation"
        self.alpha = _real_number(owner, "alpha", alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise MisconfigurationException(f"{owner}: alpha must be in [0, 1], got {alpha!r}")
        self.temperature = _real_number(owner, "temperature", temperature)
        if self.temperature <= 0:
            raise MisconfigurationException(f"{owner}: temperature must be > 0, got {temperature!r}")
        self.hidden_weight = _real_number(owner, "hidden_weight", hidden_weight)
        if self.hidden_weight < 0:
            raise MisconfigurationException(f"{owner}: hidden_weight must be >= 0, got {hidden_weight!r}")
        given_model = isinstance(teacher, nn.Module)
        if teacher is not None and not given_model and (not isinstance(teacher, str) or not teacher.strip()):
            raise MisconfigurationException(f"{owner}: teacher must be a model reference or null (a copy of the "
                                            f"model before the drop), got {teacher!r}")
        if start not in START:
            raise MisconfigurationException(f"{owner}: unknown start {start!r}; choose from {', '.join(START)}")
        self.teacher_dtype = teacher_dtype_of(owner, teacher_dtype)
        try:
            self.teacher_device = None if teacher_device is None else torch.device(teacher_device)
        except (RuntimeError, TypeError):
            raise MisconfigurationException(f"{owner}: teacher_device must name a device such as 'cpu' or 'cuda:1', "
                                            f"got {teacher_device!r}") from None
        lora = LoRASettings.checked(owner, r, lora_alpha, lora_dropout, target_modules,
                                    names=("r", "lora_alpha", "lora_dropout"), base_dtype=base_dtype)
        self.trainable = TrainableSet(owner, trainable, layers, lora=lora, last_k=last_k)
        self.teacher_ref = "<model object>" if given_model else teacher
        self.merge, self.start = merge, start
        if teacher_logits is not None and (self.hidden_weight > 0 or self.alpha == 0):
            raise MisconfigurationException(
                f"{owner}: teacher_logits stores the teacher's output distributions only: "
                + ("hidden_weight > 0 needs its hidden states; set hidden_weight: 0" if self.hidden_weight > 0
                   else "with alpha=0 nothing uses them; set alpha > 0 or teacher_logits: null"))
        try:
            check_store_options(teacher_logits, teacher_logits_k, teacher_logits_dtype)
        except UserError as err:
            raise MisconfigurationException(f"{owner}: {err}") from None
        self.teacher_logits, self.teacher_logits_k = teacher_logits, teacher_logits_k
        self.teacher_logits_dtype = teacher_logits_dtype
        self._store: TeacherLogitStore | None = None  # open once recovery started with a store
        self._store_digest: str | None = None  # the digest of the store a resumed checkpoint trained with
        self.teacher: nn.Module | None = None
        self.teacher_step: int | None = None  # global step at which the copy was taken
        self._fingerprint: torch.Tensor | None = None
        self._config: dict[str, Any] | None = None
        self.started_at: int | None = None
        self.merged = False
        self._rounds_seen = 0  # drop rounds this fit (the `first_drop` start)
        if given_model:
            self._adopt(teacher, None, None, None)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden_weight > 0

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        copied = self.teacher_ref is None and self.teacher is not None and self.teacher_step is not None
        return {"started_at": self.started_at, "merged": self.merged,
                **copied_teacher_state(self.teacher if copied else None, self.teacher_step, self._fingerprint,
                                       self._config),
                "teacher_logits": None if self._store is None else {"path": str(self._store.path),
                                                                    "digest": self._store.digest}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.started_at = state_dict["started_at"]
        self.merged = state_dict["merged"]

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Restore the teacher and the trainable set before Lightning builds the optimizers (resume)."""
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is None:
            return
        if self.teacher_logits is not None and state.get("teacher_logits"):
            self._store_digest = state["teacher_logits"]["digest"]  # the store on disk is the teacher's state
            if self._store is not None and self._store.digest != self._store_digest:
                raise MisconfigurationException(f"Distillation: the teacher-logit store at {self._store.path} is "
                                                f"not the one this checkpoint trained with: restore that one")
        if state.get("teacher_step") is not None and self.teacher_ref is None:
            self._restore_teacher(trainer, state)
        if state["started_at"] is not None and self.started_at is None and not state["merged"]:
            self._start(trainer, pl_module, at=state["started_at"])

    def _restore_teacher(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        model = restored_teacher(state, self.teacher, self._fingerprint)
        if model is not None:
            self._adopt(model, state["teacher_step"], state["teacher_fingerprint"], state["teacher_config"])
            place_teacher(self.teacher, trainer, self.teacher_device, self.teacher_dtype)
        self.teacher_step = state["teacher_step"]

    # ---------------------------------------------------------------------------------------- teacher
    def before_drop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the model as it is now, before the first drop of the fit removes anything (the teacher); when
        healing between rounds, merge the adapters so the round scores and drops the healed model."""
        if self.started_at is not None and not self.merged:
            self.trainable.merge(pl_module)
        if self.teacher_ref is not None or self.teacher is not None or not self.needs_teacher \
                or self._store is not None:
            return
        model = hf_of(pl_module)
        self._adopt(copy.deepcopy(model), trainer.global_step, fingerprint(model), model.config.to_dict())
        if self.started_at is not None:
            place_teacher(self.teacher, trainer, self.teacher_device, self.teacher_dtype)

    def after_drop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a round: start healing (`first_drop`), or make the new model trainable again (the drop
        callback rebuilds the optimizers next)."""
        self._rounds_seen += 1
        if self.started_at is not None and not self.merged:
            what = self.trainable.apply(pl_module)
            rank_zero_info(f"Distillation: healing the model of round {self._rounds_seen} at step "
                           f"{trainer.global_step}: {what}")
        elif self._may_start(trainer) and trainer.global_step > 0:
            self._start(trainer, pl_module)  # mid-fit: the drop callback rebuilds the optimizers after this

    def _adopt(self, model: nn.Module, step: int | None, mark: torch.Tensor | None,
               config: dict[str, Any] | None) -> None:
        self.teacher = frozen(model)
        self.teacher_step, self._fingerprint, self._config = step, mark, config

    # ------------------------------------------------------------------------------------- objective
    def objective(self, module: pl.LightningModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                          dict[str, torch.Tensor]]:
        """The training loss of a batch and its parts (`DropModule.set_training_objective`)."""
        ids, mask, labels = lm_batch(batch)
        hidden = self.hidden_weight > 0
        fused = self.alpha > 0  # with the teacher's logits at hand, both losses come from one pass over them
        out = module.model(input_ids=ids, attention_mask=mask, labels=None if fused else labels, use_cache=False,
                           output_hidden_states=hidden)
        if not self.needs_teacher:
            return (1.0 - self.alpha) * out.loss, {"lm_loss": out.loss.detach()}
        if self._store is not None:  # the stored top-k of the teacher (alpha > 0, hidden_weight 0: checked)
            values, top = self._store.lookup(ids)
            kd, lm = topk_kd_and_lm_loss(out.logits, values, top, labels, None if mask is None else mask.bool(),
                                         self.temperature)
            return self.alpha * kd + (1.0 - self.alpha) * lm, {"kd_loss": kd.detach(), "lm_loss": lm.detach()}
        teacher = self.teacher
        assert teacher is not None, "Distillation: no teacher (checked at train start)"
        device = next(teacher.parameters()).device
        with torch.no_grad():
            t_out = teacher(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                            use_cache=False, output_hidden_states=hidden)
        real = None if mask is None else mask.bool()
        if fused:
            kd, lm = kd_and_lm_loss(out.logits, t_out.logits, labels, real, self.temperature)
            parts = {"kd_loss": kd.detach(), "lm_loss": lm.detach()}
            loss = self.alpha * kd + (1.0 - self.alpha) * lm
        else:
            parts = {"lm_loss": out.loss.detach()}
            loss = out.loss
        if hidden:
            h = hidden_loss(out.hidden_states, t_out.hidden_states, real, shared_blocks(hf_of(module), teacher))
            parts["hidden_loss"] = h.detach()
            loss = loss + self.hidden_weight * h
        return loss, parts

    # ----------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_tensor_parallel(trainer, "Distillation (its teacher is sharded along data parallelism only)")
        if self.teacher_device is not None and is_fsdp2(trainer.strategy):
            raise MisconfigurationException(
                f"Distillation: teacher_device={str(self.teacher_device)!r} would hold the whole teacher on one device, "
                "but under FSDP2 the teacher is sharded like the student: leave teacher_device unset (or precompute "
                "its top-k with teacher_logits)")
        record = FitEnd.of(trainer).join(self, "adapters", finish=lambda tr, module: self.finish(module))
        if not hasattr(pl_module, "set_training_objective"):
            raise MisconfigurationException(f"Distillation needs a module with `set_training_objective` "
                                            f"(lightning_drop.DropModule), got {type(pl_module).__name__}")
        drops = record.drops()
        if any(getattr(d, "when", None) == "fit_end" for d in drops):
            raise MisconfigurationException("Distillation with a LayerDrop(when='fit_end'): the drop comes after "
                                            "training, so there is nothing to recover; drop at fit start or a step")
        if not drops and self.teacher_ref is None:
            raise MisconfigurationException(
                "Distillation: no drop configured: list a LayerDrop before it in trainer.callbacks (the teacher is "
                "the model before the drop), or train an already dropped model with a `teacher` reference")
        self.trainable.check_model(pl_module)
        if self.teacher_ref is not None and self.needs_teacher and self.teacher is None:
            model, tokenizer = load_teacher(self.teacher_ref, self.teacher_dtype)
            check_teacher(pl_module, model, tokenizer, self.teacher_ref, self.hidden_weight > 0)
            self._adopt(model, None, None, None)
        elif self.teacher_ref is not None and self.teacher is not None and self.needs_teacher:
            check_teacher(pl_module, self.teacher, None, self.teacher_ref, self.hidden_weight > 0)  # a model object
        if self.start == "first_drop" and not drops:
            raise MisconfigurationException("Distillation: start='first_drop' heals between the rounds of a drop "
                                            "schedule: list an iterative LayerDrop (every_n_steps > 0) before it")
        if self.started_at is None and self._may_start(trainer):
            self._start(trainer, pl_module)  # before optimizers exist: nothing to rebuild

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        others = [type(m.owner).__name__ for m in FitEnd.of(trainer).of_role("adapters") if m.owner is not self]
        if others:
            raise MisconfigurationException(
                f"Distillation and {', '.join(others)} both train the dropped model: use one recovery callback "
                "(Distillation(trainable='lora') trains LoRA adapters on the distillation loss)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started_at is not None and self.needs_teacher and self.teacher is None and self._store is None:
            raise MisconfigurationException("Distillation: recovery starts but no teacher was taken: the model was "
                                            "dropped before this fit; give a `teacher` reference")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.started_at is None and not self.merged and self._may_start(trainer):
            ensure_unsharded(trainer, pl_module)
            self._start(trainer, pl_module)
            rebuild_optimizers(trainer, pl_module)

    def _may_start(self, trainer: pl.Trainer) -> bool:
        if self.start == "first_drop" and self._rounds_seen:
            return True
        return FitEnd.of(trainer).drops_finished()

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at: int | None = None) -> None:
        what = self.trainable.apply(pl_module)
        place_teacher(self.teacher, trainer, self.teacher_device, self.teacher_dtype)
        if self.teacher_logits is not None:
            self._open_store(trainer, pl_module)
        pl_module.set_training_objective(self.objective)
        self.started_at = trainer.global_step if at is None else at
        teacher = ("none (LM loss only)" if not self.needs_teacher else self.teacher_ref
                   or f"the model before the drop (copied at step {self.teacher_step})")
        if self._store is not None:
            teacher += f", read as its top-{self._store.k} from {self._store.path}"
        rank_zero_info(f"Distillation from step {self.started_at}: {what}; teacher {teacher}, alpha={self.alpha}, "
                       f"T={self.temperature}, hidden_weight={self.hidden_weight}")

    def _open_store(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Replace the teacher by its stored top-k (`teacher.stored_teacher_logits`), so training holds the
        student alone. Every rank calls it."""
        assert self.teacher_logits is not None, "Distillation: no teacher_logits directory (checked by the caller)"
        self._store = stored_teacher_logits(self.teacher_logits, trainer, pl_module, self.teacher,
                                            k=self.teacher_logits_k, temperature=self.temperature,
                                            dtype=self.teacher_logits_dtype, digest=self._store_digest)
        self.teacher = None

    def finish(self, pl_module: pl.LightningModule) -> None:
        """End of recovery (idempotent): the LM loss again, LoRA merged when `merge`."""
        if getattr(pl_module, "training_objective", None) == self.objective:
            pl_module.set_training_objective(None)
        if self.merge and self.trainable.merge(pl_module):
            self.merged = True
            rank_zero_info("Distillation: adapters merged into the weights")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finish(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._rounds_seen = 0
        if getattr(pl_module, "training_objective", None) == self.objective:
            pl_module.set_training_objective(None)  # a later fit without this callback trains on the LM loss
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._rounds_seen = 0
        if getattr(pl_module, "training_objective", None) == self.objective:
            pl_module.set_training_objective(None)
        super().on_exception(trainer, pl_module, exception)


START = ("after_drops", "first_drop")
