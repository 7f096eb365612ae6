"""`DropModule`: a LightningModule around a (possibly dropped, possibly LoRA-wrapped) causal LM or image model.

What it trains on a batch (loss, metrics) is its task (`lightning_drop.lightning.task`), chosen by the model:
next-token prediction for a decoder, image classification for a vision family.

The wrapped Hugging Face model is `self.model` (a peft model while LoRA adapters are attached);
`self.hf_model` is always the plain transformers model underneath, the one `apply_drop`, the importance
hooks and `save_dropped` work on. Drops and LoRA wrapping are done by callbacks
(`lightning_drop.callbacks`); this module only knows how to record them in a Lightning checkpoint and put
them back on resume:

- `on_save_checkpoint` writes the drop plan (`dropped_layers`), the LoRA settings and the model config
  under `checkpoint["lightning_drop"]`;
- `on_load_checkpoint` runs before Lightning loads the weights (Lightning 2.6 `restore_model`: hook first,
  then `load_model_state_dict`), and rebuilds the same architecture there, so the weights fit.
- Recovery callbacks that train on another loss (`callbacks.Distillation`) register a *training objective*
  with `set_training_objective`: `training_step` then returns `objective(module, batch)`'s loss and logs its
  parts as `train/<name>`; validation and test keep the task's loss, so `val/loss` stays comparable. This is
  the one way a callback changes the training loss.
- Strategies that restore after setup (ModelParallelStrategy: `strategy.restore_checkpoint_after_setup`) call
  that hook after the model was sharded, too late to change it: `configure_model` rebuilds the architecture
  from `trainer.ckpt_path` before sharding instead, and `on_load_checkpoint` refuses a mismatch there.
- Under `ModelParallelStrategy` (`--trainer.strategy fsdp2`) `configure_model` then shards every decoder layer
  and the root with FSDP2; what needs the whole model at fit end (measurements, `save_dir`) reads it through
  `gathered_dir` (see `lightning_drop.lightning.distributed`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal, NamedTuple, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from .optimization import check_settings, configure
from .sharded_weights import empty_model, materialize
from .tensor_parallel import clip_grad_norm
from .distributed import (check_strategy, drop_gathered, gathered_dir, is_fsdp2, is_sharded, save_sharded, shard_model,
                          sharded_strategy, swap_dropped_layers, tensor_parallel_size, tensor_plan,
                          unshard_module)
from .task import build_task
from ..errors import UserError
from ..core.architectures import LLAMA_LORA_TARGETS
from ..core.modeling_dropped import apply_drop, dropped_layers
from ..io.family_inference import lora_excluded, lora_targets
from ..io.training_checkpoint import CKPT_KEY, checkpoint_meta, model_from_config, refuse_other_model, resume_path

LOG_DIR = "{log_dir}"  # the one placeholder of `DropModule(save_dir=...)`: the logger's run folder


class DropPlan(NamedTuple):
    """(attention indices, MLP indices) dropped so far; what `drop_plan` of the drop modules returns.

    Calling it returns itself, so code written when `DropModule.drop_plan` was a method keeps working.
    """

    attn: list[int]
    mlp: list[int]

    def __call__(self) -> "DropPlan":
        return self


class TrainingObjective(Protocol):
    """What `DropModule.set_training_objective` takes: `(module, batch) -> (loss, parts)`.

    `loss` is what `training_step` optimizes; `parts` are scalars it logs as `train/<name>`.
    """

    def __call__(self, module: DropModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                               dict[str, torch.Tensor]]: ...


def is_peft(model: nn.Module) -> bool:
    from peft import PeftModel  # a dependency; imported late, as it is slow to import

    return isinstance(model, PeftModel)


class DropModule(pl.LightningModule):
    """Training of a transformer (causal LM or image classifier) that callbacks may drop layers from.

    Args:
        model: catalogue name (`smollm2-135m`, `tiny-llama`, ...), checkpoint directory (plain or dropped),
            `.gguf` file or hub id, for `lightning_drop.io.model_loading.load_model`. `tiny-<family>` is random init.
        init_config: random init: config fields, e.g. `{model_type: llama, hidden_size: 128,
            num_hidden_layers: 8}` (with `model=None`), or overrides of a `tiny-<family>` model.
        family: random init of a family with its tiny defaults, `init_config` overriding them: a vision
            family (`vit`, `dinov2`, `dinov2_with_registers`, `dinov3_vit`, `swinv2`: image classification)
            or a decoder one (as `model="tiny-<family>"`). A vision checkpoint directory as `model` also
            trains as image classification.
        num_labels: classes of an image classifier (default 10); not for language models.
        tokenizer_name: tokenizer reference when the model's own is not wanted (named so, not `tokenizer`,
            because Lightning merges module and datamodule hyperparameters and they must not clash).
        dtype: parameter dtype (`float32`, `bfloat16`, ...).
        optimizer: `adamw`, `adam` or `sgd`. lr, weight_decay, betas, momentum: its settings (no decay on
            biases and norm weights).
        scheduler: `constant`, `cosine` or `linear` (decay to `min_lr_ratio * lr` at `max_steps`, default
            the trainer's estimated stepping batches), after `warmup_steps` of linear warmup.
        save_dir: when set, the final model (dropped, LoRA merged if a callback merged it) is saved there
            with `save_pretrained` at the end of fit (global rank zero). `{log_dir}` in it is the trainer's log
            dir (the logger's run folder, new for each run: `"{log_dir}/dropped_model"`); the resolved path is
            `save_path`. Checked before the first step. Sharded weights are gathered one layer at a time
            to rank zero and written by the streamed writer.
        overwrite: replace a non-empty `save_dir` (else the fit is refused before it starts).
        load_sharded: build the model on the meta device and read its weights in `configure_model`, after
            FSDP2 sharded it: each rank reads only its own rows from the safetensors files (`model` must be a
            checkpoint directory). The weights exist only from then on, so a fit-start drop is refused: drop
            first (`lightning-drop drop --stream`), then recover the dropped checkpoint.
        tp_plan: tensor parallelism under `ModelParallelStrategy` with `tensor_parallel_size > 1` (ignored
            without one): `auto`, the plan transformers ships with the model's config, or a mapping of module
            globs relative to the base model (`layers.*.self_attn.q_proj`) to `colwise` or `rowwise`
            (`lightning_drop.lightning.tensor_parallel`).
    """

    def __init__(
        self,
        model: str | None = None,
        init_config: dict[str, Any] | None = None,
        tokenizer_name: str | None = None,
        dtype: str = "float32",
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        momentum: float = 0.9,
        scheduler: Literal["constant", "cosine", "linear"] = "constant",
        warmup_steps: int = 0,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        save_dir: str | None = None,
        overwrite: bool = False,
        family: str | None = None,
        num_labels: int | None = None,
        load_sharded: bool = False,
        tp_plan: Literal["auto"] | dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        check_settings(optimizer, scheduler, lr, weight_decay, warmup_steps, max_steps, min_lr_ratio)
        other = set(re.findall(r"\{[^{}]*\}", save_dir or "")) - {LOG_DIR}
        if other:
            raise UserError(f"save_dir {save_dir!r}: unknown placeholder {sorted(other)[0]} (the one placeholder is "
                            f"{LOG_DIR}, the trainer's log dir)")
        self.save_hyperparameters()
        self._load_from: str | None = None  # `load_sharded`: the directory configure_model reads weights from
        if load_sharded:
            from ..io.model_loading import load_tokenizer
            from .task import CausalLM

            if model is None or not os.path.isdir(model) or init_config or family:
                raise UserError(f"load_sharded reads a checkpoint directory's safetensors files: model={model!r} is "
                                "not a directory")
            self.model, self.task = empty_model(model, getattr(torch, dtype)), CausalLM()
            self.tokenizer, self._load_from = load_tokenizer(tokenizer_name or model), model
        else:
            self.model, self.tokenizer, self.task = build_task(model, init_config, family, num_labels, dtype,
                                                               tokenizer_name)
        self.lora_config: dict[str, Any] | None = None
        self.training_objective: TrainingObjective | None = None
        # Step at which the current optimizer/scheduler were built (after a drop or LoRA wrap mid-fit),
        # so a rebuilt scheduler continues the schedule instead of restarting it.
        self.lr_step_offset = 0
        #: where fit end saves the model: `save_dir` with `{log_dir}` resolved (set in `setup("fit")`)
        self.save_path: str | None = None
        self._gathered: tuple[Any, str | None] | None = None  # (model state it was gathered at, rank zero's dir)

    # ------------------------------------------------------------------------------------------ model
    @property
    def hf_model(self) -> nn.Module:
        """The transformers model under any peft wrapper (what drops, scores and saving act on)."""
        return self.model.get_base_model() if is_peft(self.model) else self.model

    @property
    def drop_plan(self) -> "DropPlan":
        """(attention, MLP) indices dropped so far (original numbering)."""
        return DropPlan(*dropped_layers(self.hf_model))

    def apply_drop(self, attn: list[int] = (), mlp: list[int] = ()) -> None:  # type: ignore[assignment]
        """Drop more sublayers in place (the optimizer must be rebuilt if one exists). Sharded under FSDP2, only
        the layers that change are gathered, rebuilt and sharded again (`swap_dropped_layers`)."""
        if is_sharded(self.model):
            swap_dropped_layers(self, list(attn), list(mlp))
        else:
            apply_drop(self.hf_model, attn=list(attn), mlp=list(mlp))

    def add_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 target_modules: list[str] | None = None) -> None:
        """Freeze the model and attach LoRA adapters (peft) to `target_modules` of the live layers."""
        from peft import LoraConfig, get_peft_model

        if self.lora_config is not None:
            raise UserError("LoRA adapters are already attached")
        # the default (Llama's names) means the family's own linear layers: GPT-2's Conv1D c_attn/c_proj/c_fc, ...
        targets = list(lora_targets(self.hf_model) if not target_modules or tuple(target_modules) == LLAMA_LORA_TARGETS
                       else target_modules)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                            exclude_modules=lora_excluded(self.hf_model, targets) or None, task_type="CAUSAL_LM")
        try:
            self.model = get_peft_model(self.model, config)
        except ValueError as err:
            raise UserError(f"LoRA target_modules {targets} match no module of the (dropped) model: {err}") from err
        self.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets}

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the weights; the model becomes the plain (dropped) class again."""
        if self.lora_config is None:
            return
        plan = self.drop_plan
        merged = self.model.merge_and_unload()
        if (plan[0] or plan[1]) and not type(merged).__name__.startswith("Dropped"):
            apply_drop(merged)  # re-mark the class (no new drops): cannot happen with peft 0.21, kept as a guard
        if dropped_layers(merged) != plan:
            raise RuntimeError(f"LoRA merge changed the drop plan {plan} -> {dropped_layers(merged)}")
        for p in merged.parameters():
            p.requires_grad_(True)
        self.model = merged
        self.lora_config = None

    def save_pretrained(self, out_dir: str | os.PathLike, merge: bool = True, overwrite: bool = False) -> str:
        """Save the current model with `save_dropped` (dropped weights physically absent).

        With LoRA attached and `merge=True`, a merged copy is saved and the module keeps its adapters. A
        non-empty `out_dir` is replaced only with `overwrite=True`.
        """
        from ..io.dropped_checkpoint import save_dropped

        model = self.model
        if self.lora_config is not None:
            if not merge:
                raise UserError("save_pretrained of a LoRA-wrapped model needs merge=True (or call merge_lora())")
            import copy

            model = copy.deepcopy(self.model).merge_and_unload()
        return str(save_dropped(model, out_dir, tokenizer=self.tokenizer, overwrite=overwrite))

    # --------------------------------------------------------------------------------------- training
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The task's forward: the LM's output for `input_ids`, an image classifier's logits for `pixel_values`."""
        return self.task(self.model, *args, **kwargs)

    def _loss(self, batch: Any) -> torch.Tensor:
        """The task's loss of a batch (what validation reports and training optimizes without an objective)."""
        return self.task.loss(self.model, batch)

    def set_training_objective(self, objective: TrainingObjective | None) -> None:
        """Train on `objective(self, batch) -> (loss, parts)` instead of the LM loss (None: the LM loss again).

        One objective at a time: replacing another one is refused (two callbacks would fight over the loss).
        """
        if objective is not None and self.training_objective is not None and objective != self.training_objective:
            raise MisconfigurationException("DropModule already trains on another objective: only one recovery "
                                            "callback may set the training loss")
        self.training_objective = objective

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        size = self.task.batch_size(batch)
        if self.training_objective is None:
            loss = self._loss(batch)
        else:
            loss, parts = self.training_objective(self, batch)
            for name, value in parts.items():
                self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.task.evaluate(self, batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.task.evaluate(self, batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.task.on_validation_epoch_end(self)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None) if dm is not None else None
        emb = self.hf_model.get_input_embeddings() if tok is not None else None
        if tok is not None and emb is not None and len(tok) > emb.num_embeddings:
            raise UserError(f"the datamodule's tokenizer has {len(tok)} tokens but the model embeds only "
                             f"{emb.num_embeddings}: set the datamodule's tokenizer to the model's")
        if self._trainer is not None:
            check_strategy(self.trainer.strategy, self)
        if self.hparams.save_dir and self._trainer is not None and stage == "fit":
            self.save_path = self.check_save_dir(str(self.trainer.log_dir or self.trainer.default_root_dir))

    def check_save_dir(self, log_dir: str) -> str:
        """`save_dir` with `{log_dir}` resolved, refused before step 0 as every writer refuses its target (not empty
        without `overwrite`, an input, not writable); `lightning-drop fit` asks before the trainer writes."""
        from ..io.output_targets import check_output

        save_dir, problem, trainer = str(self.hparams.save_dir).replace(LOG_DIR, log_dir), None, self._trainer
        try:
            if trainer is None or trainer.is_global_zero:
                check_output(save_dir, overwrite=bool(self.hparams.overwrite), option="DropModule save_dir",
                             sources=[self.hparams.model, self.hparams.tokenizer_name],
                             hint="set model.init_args.overwrite: true to replace it, or another save_dir")
        except UserError as err:
            problem = str(err)
        if trainer is not None:
            problem = trainer.strategy.broadcast(problem)  # global rank zero's verdict: all ranks stop together
        if problem is not None:
            raise UserError(problem)
        return save_dir

    def configure_model(self) -> None:
        """Rebuild the checkpoint's architecture before sharding when the strategy restores after setup, then
        shard every decoder layer and the root with FSDP2 under `ModelParallelStrategy` (after splitting the
        `tp_plan`'s linear layers over its tensor-parallel dimension, where it has one)."""
        trainer = self._trainer
        if trainer is None or not getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            self._materialize()
            return
        path = resume_path(trainer)
        meta = checkpoint_meta(path) if path is not None and not is_sharded(self.model) else None
        state = (meta or {}).get(CKPT_KEY)
        if state:
            refuse_other_model(state, self.hf_model.config.to_dict(), f"the checkpoint {path}")
            self._restore_architecture(state)
        if is_fsdp2(trainer.strategy):
            strategy = trainer.strategy
            shard_model(self.model, strategy.device_mesh["data_parallel"], strategy.root_device, tensor_plan(self))
        self._materialize()

    def _materialize(self) -> None:
        """`load_sharded`: read the weights now (each rank its own shards when sharded)."""
        if self._load_from is not None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            materialize(self.model, self._load_from, device)
            self._load_from = None

    def gathered_dir(self) -> str | None:
        """The full weights of the sharded model as a Hugging Face directory on rank zero (None elsewhere);
        a collective (`lightning_drop.lightning.distributed.gathered_dir`)."""
        return gathered_dir(self)

    def unshard(self) -> None:
        """Make the sharded model plain (full weights on every rank; a collective) before its structure changes;
        `rebuild_optimizers` shards it again."""
        unshard_module(self)

    def teardown(self, stage: str) -> None:
        drop_gathered(self)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Norm clipping under tensor parallelism through `clip_grad_norm` (the gradients lie on two meshes, which
        torch's clipping cannot stack); everything else as Lightning clips."""
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm" and self._trainer is not None \
                and tensor_parallel_size(self.trainer.strategy) > 1:
            clip_grad_norm([p for group in optimizer.param_groups for p in group["params"]], float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        estimate = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        return configure(self.parameters(), self.hparams, estimate, self.lr_step_offset)

    def on_train_end(self) -> None:
        if self.save_path and is_sharded(self.model):
            save_sharded(self, self.save_path)
        elif self.save_path and self.trainer.is_global_zero:
            path = self.save_pretrained(self.save_path, overwrite=bool(self.hparams.overwrite))
            rank_zero_info(f"saved the {'dropped ' if any(self.drop_plan) else ''}model to {path}")
        if self.save_path:
            self.trainer.strategy.barrier("drop_module_save")

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        attn, mlp = self.drop_plan
        checkpoint[CKPT_KEY] = {"drop_attn_list": attn, "drop_mlp_list": mlp, "lora": self.lora_config,
                                "lr_step_offset": self.lr_step_offset, "hf_config": self.hf_model.config.to_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the saved architecture (drops, LoRA) before Lightning loads the weights into it."""
        state = checkpoint.get(CKPT_KEY)
        if not state:
            return
        refuse_other_model(state, self.hf_model.config.to_dict(), "the checkpoint to resume")
        self.lr_step_offset = int(state.get("lr_step_offset", 0))
        saved = (list(state["drop_attn_list"]), list(state["drop_mlp_list"]))
        if self.drop_plan == saved and self.lora_config == state.get("lora"):
            return
        trainer = self._trainer
        if trainer is not None and getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            name = sharded_strategy(trainer.strategy) or type(trainer.strategy).__name__
            raise MisconfigurationException(
                f"the checkpoint holds drops {saved} and LoRA {state.get('lora')}, the model {tuple(self.drop_plan)} and "
                f"LoRA {self.lora_config}, and {name} restores after the model was set up: set `trainer.ckpt_path` "
                "before `fit` (`lightning-drop fit --ckpt_path` does) so DropModule.configure_model rebuilds it first")
        self._restore_architecture(state)

    def _restore_architecture(self, state: dict[str, Any]) -> None:
        """Make the model's drops and LoRA those of a checkpoint record (before its weights load)."""
        saved = (list(state["drop_attn_list"]), list(state["drop_mlp_list"]))
        lora = state.get("lora")
        current = self.drop_plan
        if current == saved and self.lora_config == lora:
            return
        subset = set(current[0]) <= set(saved[0]) and set(current[1]) <= set(saved[1])
        if subset and (self.lora_config is None or self.lora_config == lora):
            # Same base model with fewer drops so far (e.g. resuming after a mid-training drop).
            self.apply_drop(sorted(set(saved[0]) - set(current[0])), sorted(set(saved[1]) - set(current[1])))
        else:
            # The run already changed the model differently (a callback re-decided at setup): start again
            # from the saved config; every weight comes from the checkpoint next.
            self.model = self._model_from_config(state["hf_config"])
            self.lora_config = None
        if lora is not None and self.lora_config is None:
            self.add_lora(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                          target_modules=lora["target_modules"])

    def _model_from_config(self, config: dict[str, Any]) -> nn.Module:
        return model_from_config(config, getattr(torch, self.hparams.dtype))
