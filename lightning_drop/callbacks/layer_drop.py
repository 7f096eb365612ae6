"""`LayerDrop`: remove the least important blocks / attention / MLP sublayers at fit start, a step, or fit end.

Where the drop happens follows Lightning's hook order: at fit start it is done in `setup`, before
the strategy moves the model and builds optimizers (as `BaseFinetuning.setup` changes the model); during
training it happens after an optimizer step and is followed by a rebuild of DDP, optimizers and
schedulers (`trainer.strategy.setup_optimizers`); at fit end in `on_train_end`. Scores are synchronized
across processes (torchmetrics states) and rank zero's copy is broadcast before the selection, so every rank
drops the same modules. The rounds are those of `lightning_drop.scoring.schedule.drop_rounds`, as for every other way
of dropping. Like `ModelPruning`, the structural change itself lives in the model (`DropModule`
writes the drop plan into every checkpoint); this callback's `state_dict` keeps the schedule position and
the per-round record. Just before each drop (and before re-applying recorded drops on resume) it calls
`FitEnd.before_drop`, so a distillation teacher is copied from the model as it was, and after each round
`FitEnd.after_drop`, so a recovery that heals between rounds trains the new model.

`setup` checks `num`/`ratio` and `keep` against the model before any training, so a mid-training drop cannot
fail half-way. On resume (`trainer.ckpt_path` set before `fit`, as `lightning-drop fit --ckpt_path` does) it
reads its state from the checkpoint and re-applies the recorded drops instead of scoring again; with
`trainer.fit(ckpt_path=...)` Lightning reveals the path only after setup, so a fit-start drop is re-scored
and `DropModule.on_load_checkpoint` then restores the checkpoint's architecture (correct, but wasted work).
Under FSDP2 a fit-start drop happens before `DropModule.configure_model` shards the model; a later drop
scores the sharded model (every rank runs the same calibration batches) and swaps sublayers inside the
sharded layers; the optimizers are rebuilt with the surviving parameters, as under DDP.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.io.training_checkpoint import checkpoint_meta, resume_path
from lightning_drop.lightning.distributed import whole_root

from ._common import CalibrationSource, ensure_unsharded, hf_of, log_to_loggers, rebuild_optimizers, scoring_device
from .fit_end import FitEnd, FitEndMember

WHEN = ("fit_start", "step", "fit_end")


class LayerDrop(FitEndMember):
    """Drop `num` (or `ratio` of the) `target` modules with the lowest `metric` scores.

    Args:
        target: `block`, `attn`, `mlp` or `joint` (attention and MLP ranked together).
        num / ratio: how many modules in total (exactly one of them; ratio of the layers, or of 2x the
            layers for `joint`).
        metric: a metric of `lightning_drop.scoring.metrics` (`cosine` is the paper's), or the importable
            name of one's own (`my_package.metrics.dot`).
        schedule: `one-shot` (score once, drop all), `iterative` (drop `step` modules per round and
            re-score the dropped model before the next round), or the importable name of a round-size function.
        step: modules per iterative round.
        rule: how a round picks its modules from the scores: `lowest`, or the importable name of a rule.
        span: with `metric="angular"` and `target="block"`: drop the `span` consecutive blocks whose first
            input and last output are closest (Gromov et al.); `num` may be left out.
        every_n_steps: training steps between iterative rounds (0: all rounds back to back, as the paper).
        when: `fit_start`, `step` (first round after optimizer step `at_step`) or `fit_end`.
        at_step: the global step of the first round when `when="step"`.
        keep: layer indices never dropped.
        seed: seed of the `random` metric.
        calibration_source: None for the datamodule's `calibration_batch()`, else a source for
            `lightning_drop.io.text_data.load_documents` (`c4-sample`, a .jsonl file, ...), cut into
            `calibration_samples` windows of `calibration_seq_len` tokens.
        calibration_batch_size: windows per forward pass while scoring.
        verbose: print each round's decision (rank zero).
    """

    def __init__(
        self,
        target: Literal["block", "attn", "mlp", "joint"] = "attn",
        num: int | None = None,
        ratio: float | None = None,
        metric: str = "cosine",
        schedule: str = "one-shot",
        step: int = 1,
        every_n_steps: int = 0,
        when: Literal["fit_start", "step", "fit_end"] = "fit_start",
        at_step: int | None = None,
        keep: Sequence[int] = (),
        seed: int = 0,
        calibration_source: str | None = None,
        calibration_samples: int = 16,
        calibration_seq_len: int = 256,
        calibration_batch_size: int = 8,
        verbose: bool = True,
        rule: str = "lowest",
        span: int | None = None,
    ) -> None:
        from lightning_drop.errors import UserError
        from lightning_drop.scoring.metrics import resolve_metric
        from lightning_drop.core.options import TARGETS
        from lightning_drop.scoring.schedule import resolve_schedule
        from lightning_drop.scoring.selection import check_span, resolve_rule

        if target not in TARGETS:
            raise MisconfigurationException(f"LayerDrop: unknown target {target!r}; choose from {', '.join(TARGETS)}")
        if span is not None and num is None and ratio is None:
            num = span  # a span of N blocks drops N blocks
        if (num is None) == (ratio is None):
            raise MisconfigurationException("LayerDrop: give exactly one of `num` or `ratio`")
        if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
            raise MisconfigurationException(f"LayerDrop: num must be an integer >= 1, got {num!r}")
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise MisconfigurationException(f"LayerDrop: ratio must be in (0, 1), got {ratio!r}")
        try:
            self._metric, self._schedule, self._rule = resolve_metric(metric), resolve_schedule(schedule), \
                resolve_rule(rule)
            check_span(span, self._metric.name, target, num=num, where="span")
        except UserError as err:
            raise MisconfigurationException(f"LayerDrop: {err}") from None
        if not isinstance(step, int) or step < 1:
            raise MisconfigurationException(f"LayerDrop: step must be an integer >= 1, got {step!r}")
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise MisconfigurationException(f"LayerDrop: every_n_steps must be an integer >= 0, got {every_n_steps!r}")
        if when not in WHEN:
            raise MisconfigurationException(f"LayerDrop: unknown when {when!r}; choose from {', '.join(WHEN)}")
        if when == "step" and (not isinstance(at_step, int) or at_step < 1):
            raise MisconfigurationException(f"LayerDrop: when='step' needs at_step >= 1, got {at_step!r}")
        if when != "step" and at_step is not None:
            raise MisconfigurationException(f"LayerDrop: at_step is only used with when='step' (when={when!r})")
        if when == "fit_end" and every_n_steps:
            raise MisconfigurationException("LayerDrop: when='fit_end' cannot train between rounds: set every_n_steps=0")
        if any(not isinstance(i, int) or i < 0 for i in keep):
            raise MisconfigurationException(f"LayerDrop: keep must hold layer indices >= 0, got {list(keep)!r}")
        self.target, self.num, self.ratio, self.metric, self.span = target, num, ratio, metric, span
        self.schedule, self.step, self.every_n_steps = schedule, step, every_n_steps
        self.when, self.at_step, self.keep, self.seed, self.verbose = when, at_step, list(keep), seed, verbose
        self.calibration = CalibrationSource(calibration_source, calibration_samples, calibration_seq_len,
                                             calibration_batch_size, "LayerDrop")
        # schedule position (saved in checkpoints)
        self.total: int | None = None
        self.rounds: list[dict[str, Any]] = []
        self.next_step: int | None = at_step if when == "step" else None
        self._last_seen_step = -1

    # ------------------------------------------------------------------------------------------ state
    @property
    def dropped_count(self) -> int:
        return sum(len(r["modules"]) for r in self.rounds)

    @property
    def finished(self) -> bool:
        return self.total is not None and self.dropped_count >= self.total

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "rounds": self.rounds, "next_step": self.next_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = state_dict["total"]
        self.rounds = list(state_dict["rounds"])
        self.next_step = state_dict["next_step"]

    # ---------------------------------------------------------------------------------------- dropping
    def _resolve_total(self, pl_module: pl.LightningModule) -> int:
        from lightning_drop.core.architectures import get_spec
        from lightning_drop.scoring.selection import resolve_num, total_modules

        model = hf_of(pl_module)
        n = len(get_spec(model).get_layers(model))
        return resolve_num(total_modules(n, self.target), self.num, self.ratio)

    def drop_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Score the current model and drop the next round's modules (on every rank identically).

        The round is the next one of `lightning_drop.scoring.schedule.drop_rounds`, continued from this callback's
        recorded rounds, so a round after a resume is the one an uninterrupted fit would have made.
        """
        from lightning_drop.scoring.importance import ImportanceScores, compute_importance
        from lightning_drop.core.modeling_dropped import apply_drop
        from lightning_drop.scoring.schedule import drop_rounds
        from lightning_drop.scoring.selection import target_kinds

        if self.total is None:
            self.total = self._resolve_total(pl_module)
        if self.finished:
            raise MisconfigurationException(f"LayerDrop: all {self.total} {self.target} modules are already dropped")
        model = hf_of(pl_module)

        def score(attn: list[int], mlp: list[int], index: int) -> ImportanceScores:
            with whole_root(pl_module):  # sharded: the scoring pass runs the decoder body, not the root
                scores = compute_importance(model, self.calibration.batches(trainer, pl_module), metric=self._metric,
                                            seed=self.seed + index, kinds=target_kinds(self.target), span=self.span)
            # The scores are synced across ranks; rank zero's copy makes every rank rank them identically.
            return trainer.strategy.broadcast(scores, src=0)

        walk_attn, walk_mlp = self.recorded_plan()
        cur_attn, cur_mlp = dropped_layers_of(model)
        rnd = next(drop_rounds(score, self.target, self.total, self._num_layers(pl_module), self._schedule, self.step,
                               self.keep, sorted(set(cur_attn) - set(walk_attn)), sorted(set(cur_mlp) - set(walk_mlp)),
                               start=self.dropped_count, walked=(walk_attn, walk_mlp), rule=self._rule))
        attn, mlp, scores = rnd.attn, rnd.mlp, rnd.scores
        swap = _swaps_layers(trainer, pl_module)
        if not swap:  # sharded: the change is made on the plain model, sharded again later
            ensure_unsharded(trainer, pl_module)
        record_of_fit = FitEnd.of(trainer)
        record_of_fit.before_drop(trainer, pl_module)
        model = hf_of(pl_module)  # a recovery healing between rounds may have merged its adapters just now
        if swap:  # sharded: only the layers that change are gathered, rebuilt and sharded again
            pl_module.apply_drop(attn, mlp)
        else:
            apply_drop(model, attn=attn, mlp=mlp)
        if self.target == "block":  # a block whose attention was already gone drops only its MLP
            modules = [f"block.{i}" for i in sorted(set(attn) | set(mlp))]
        else:
            modules = [f"attn.{i}" for i in attn] + [f"mlp.{i}" for i in mlp]
        record = {"step": trainer.global_step, "attn": list(attn), "mlp": list(mlp), "modules": modules,
                  "scores": scores.to_dict()}
        self.rounds.append(record)
        if self.verbose:
            rank_zero_info(f"LayerDrop round {len(self.rounds)} at step {trainer.global_step}: dropped attention "
                           f"{attn}, MLP {mlp} ({self.dropped_count}/{self.total} {self.target} modules)")
        record_of_fit.after_drop(trainer, pl_module)
        cur_attn, cur_mlp = dropped_layers_of(model)
        log_to_loggers(trainer, {"drop/num_attn_dropped": float(len(cur_attn)), "drop/num_mlp_dropped": float(len(cur_mlp))})
        return record

    def _drop_rounds_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """One round, or all rounds back to back when no training is wanted between them."""
        did = False
        while not self.finished:
            self.drop_round(trainer, pl_module)
            did = True
            if self.every_n_steps:
                break
        if not self.finished:
            self.next_step = trainer.global_step + self.every_n_steps
        else:
            self.next_step = None
        return did

    # ------------------------------------------------------------------------------------------- hooks
    def _num_layers(self, pl_module: pl.LightningModule) -> int:
        from lightning_drop.core.architectures import get_spec

        model = hf_of(pl_module)
        return len(get_spec(model).get_layers(model))

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        """`keep` and the number to drop must fit this model (before any training)."""
        from lightning_drop.errors import UserError
        from lightning_drop.scoring.loss_metric import require_lm_head
        from lightning_drop.scoring.selection import check_span

        n = self._num_layers(pl_module)
        try:
            check_span(self.span, self._metric.name, self.target, n, where="span")
            if self._metric.model is not None:
                require_lm_head(hf_of(pl_module), f"metric '{self._metric.name}'")
        except UserError as err:
            raise MisconfigurationException(f"LayerDrop: {err}") from None
        bad = [i for i in self.keep if i >= n]
        if bad:
            raise MisconfigurationException(f"LayerDrop: keep indices {bad} out of range: the model has {n} layers "
                                            f"(0..{n - 1})")
        from lightning_drop.scoring.selection import droppable_modules, max_droppable

        attn_d, mlp_d = dropped_layers_of(hf_of(pl_module))
        count, removes_all = droppable_modules(n, self.target, self.keep, attn_d, mlp_d)
        limit = max_droppable(n, self.target, self.keep, attn_d, mlp_d)
        why = (f"at least one {'block' if self.target == 'block' else 'sublayer'} must remain" if removes_all
               else f"{count} droppable")
        assert self.total is not None
        if self.total > limit:
            raise MisconfigurationException(
                f"LayerDrop: cannot drop {self.total} {self.target} modules from a {n}-layer model (already dropped: "
                f"attention {attn_d}, MLP {mlp_d}; keep {self.keep}): at most {limit} ({why})")

    def _check_schedule(self, trainer: pl.Trainer) -> None:
        """A drop that the step budget never reaches is a configuration error, not a silent no-op."""
        max_steps = getattr(trainer, "max_steps", -1)
        if max_steps is None or max_steps < 0 or self.total is None:
            return
        if self.when == "step" and self.at_step is not None and self.at_step > max_steps:
            raise MisconfigurationException(
                f"LayerDrop: at_step={self.at_step} is after the last step of this fit (max_steps={max_steps}): "
                "the drop would never happen")
        rounds = len(self._schedule.sizes(self.total, self.step))
        if self.every_n_steps and rounds > 1:
            first = self.at_step if self.when == "step" else 0
            last = first + (rounds - 1) * self.every_n_steps
            if last > max_steps:
                rank_zero_warn(f"LayerDrop: the last of {rounds} rounds would be at step {last}, after max_steps="
                               f"{max_steps}: this fit drops fewer than {self.total} modules")

    def _resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: str) -> None:
        """Take this callback's state from the checkpoint and re-apply its recorded drops (no scoring)."""
        from lightning_drop.core.modeling_dropped import apply_drop

        meta = checkpoint_meta(path)
        if meta is None:
            raise MisconfigurationException(f"LayerDrop: cannot read the callback states of {path} before the "
                                            "restore (not a Lightning checkpoint file or FSDP sharded directory)")
        state = meta["callbacks"].get(self.state_key)
        if state is None:
            if self.when == "fit_start":
                raise MisconfigurationException(
                    f"LayerDrop: resuming from {path}, which has no LayerDrop state: the checkpoint's architecture "
                    "would replace a fit-start drop made now; to drop a trained model, start a new fit from it "
                    "(DropModule.load_from_checkpoint(path).save_pretrained(dir), then DropModule(model=dir))")
            return  # a step / fit-end drop still to come: it happens in this run as configured
        kinds = {m.split(".")[0] for r in state["rounds"] for m in r["modules"]}
        if state["total"] != self.total or not kinds <= ({"attn", "mlp"} if self.target == "joint" else {self.target}):
            raise MisconfigurationException(
                f"LayerDrop: {path} was written by another drop plan ({state['total']} modules, rounds "
                f"{[r['modules'] for r in state['rounds']]}) than this LayerDrop(target={self.target!r}) dropping "
                f"{self.total}: resume with the LayerDrop settings of that fit, or start a new fit")
        self.load_state_dict(state)
        attn, mlp = self.recorded_plan()
        cur_attn, cur_mlp = dropped_layers_of(hf_of(pl_module))
        new_attn, new_mlp = sorted(set(attn) - set(cur_attn)), sorted(set(mlp) - set(cur_mlp))
        if new_attn or new_mlp:
            FitEnd.of(trainer).before_drop(trainer, pl_module)  # the model as it was: a teacher is rebuilt from it
            apply_drop(hf_of(pl_module), attn=new_attn, mlp=new_mlp)
        if self.verbose:
            rank_zero_info(f"LayerDrop: resumed from {path}: {len(self.rounds)} round(s), attention {attn}, MLP {mlp}")

    def recorded_plan(self) -> tuple[list[int], list[int]]:
        """(attention, MLP) indices this callback has dropped so far (its rounds)."""
        attn = sorted({i for r in self.rounds for i in r["attn"]})
        mlp = sorted({i for r in self.rounds for i in r["mlp"]})
        return attn, mlp

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # role `drop` (see `fit_end`): a fit-end drop is a finishing step that measurements run first
        FitEnd.of(trainer).join(self, "drop", finish=self.drop_at_fit_end if self.when == "fit_end" else None)
        self.total = self._resolve_total(pl_module)
        self._check_model(pl_module)
        self._check_schedule(trainer)
        path = resume_path(trainer)
        if path is not None:
            self._resume(trainer, pl_module, path)
            return
        if self.when == "fit_start" and not self.rounds:
            if any(p.is_meta for p in hf_of(pl_module).parameters()):
                raise MisconfigurationException(
                    "LayerDrop(when='fit_start'): the model has no weights before it is sharded "
                    "(DropModule(load_sharded=true)): drop first with `lightning-drop drop --stream`, then recover "
                    "the dropped checkpoint")
            with scoring_device(trainer, hf_of(pl_module)):
                self._drop_rounds_now(trainer, pl_module)  # before optimizers exist: nothing to rebuild

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every restore: the model must hold what this callback says it dropped.
        attn, mlp = self.recorded_plan()
        cur_attn, cur_mlp = dropped_layers_of(hf_of(pl_module))
        if not (set(attn) <= set(cur_attn) and set(mlp) <= set(cur_mlp)):
            raise MisconfigurationException(
                f"LayerDrop: its rounds dropped attention {attn}, MLP {mlp}, but after the checkpoint restore the "
                f"model has attention {cur_attn}, MLP {cur_mlp} dropped: the checkpoint was not written by this "
                "drop schedule")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_seen_step:  # gradient accumulation: no optimizer step happened
            return
        self._last_seen_step = step
        if self.finished or self.next_step is None or step < self.next_step:
            return
        if self._drop_rounds_now(trainer, pl_module):
            rebuild_optimizers(trainer, pl_module)

    def drop_at_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The fit-end drop, now (idempotent; `FitEnd.final_model` runs it so measurements see the final model)."""
        if self.when == "fit_end" and not self.finished:
            self._drop_rounds_now(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.drop_at_fit_end(trainer, pl_module)


def _swaps_layers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether a drop in the sharded model rebuilds only the layers it changes (`DropModule.apply_drop` swaps
    them under FSDP2) rather than making the whole model plain first (`ensure_unsharded`).

    Not when a callback of the fit acts at drops (`FitEndMember.before_drop` / `after_drop`: Distillation merges
    and attaches adapters there), as those changes need the plain model.
    """
    from lightning_drop.lightning.distributed import is_sharded, layer_swap_refusal

    reacting = [cb for cb in trainer.callbacks if isinstance(cb, FitEndMember)
                and (type(cb).before_drop is not FitEndMember.before_drop
                     or type(cb).after_drop is not FitEndMember.after_drop)]
    return (is_sharded(pl_module) and hasattr(pl_module, "unshard") and not reacting
            and layer_swap_refusal(pl_module) is None)


def dropped_layers_of(model: Any) -> tuple[list[int], list[int]]:
    from lightning_drop.core.modeling_dropped import dropped_layers

    return dropped_layers(model)
