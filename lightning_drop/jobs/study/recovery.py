"""Recovery of a study's drop sets, measured: each recipe trains the dropped model at the same token budget.

A recipe is a `Distillation` callback's arguments (the LM loss alone is `alpha: 0`) on a `DropModule`, run by
Lightning like any fit: one-shot recipes train the study's own drop set with the undropped model as teacher;
`rounds > 1` lets an iterative `LayerDrop` score and drop during the fit, healing between its rounds. The
control row of a recipe trains the undropped model the same way: what it gains is adaptation to the training
text, not recovery of the drop. Every row holds held-out perplexity in each domain, the MC accuracy with its
standard error, the fraction of the perplexity gap recovered and the curve of held-out perplexity against
training tokens; rows are cached like the sweep's points.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ...errors import UserError
from .cache import Cache, CacheKeys, key_of
from .recovery_config import RecipeSpec, RecoveryPointSpec, RecoverySpec
from .measure import PointEvaluator
from .sweep import DropSets, StudyInputs


class RecoveryRunner:
    """Trains and measures the recovery rows of one study (`recovery:` of its config)."""

    def __init__(self, inputs: StudyInputs, cache: Cache, keys: CacheKeys, points: PointEvaluator,
                 drops: DropSets, out: Path) -> None:
        self.inputs, self.cache, self.keys, self.points, self.drops = inputs, cache, keys, points, drops
        self.out = out
        self.cfg = inputs.cfg
        assert self.cfg.recovery is not None
        self.spec: RecoverySpec = self.cfg.recovery
        self._windows: Any = None
        cache.computed.setdefault("recovery", 0)
        cache.reused.setdefault("recovery", 0)

    # ------------------------------------------------------------------------------------- training text
    def train_documents(self) -> list[str]:
        """Documents of the training source that share nothing with held-out (or calibration) text."""
        train = self.spec.train
        if train.source == "calibration":
            calib = self.cfg.calibration
            docs = self.inputs.docs(calib.source, calib.text_field)
            same = self.cfg.eval.perplexity.source in ("calibration", calib.source)
        else:
            docs = self.inputs.docs(train.source, train.text_field)
            same = self.cfg.eval.perplexity.source == train.source
        if same:
            docs = docs[self.points.heldout_end_document():]
        return docs

    def train_windows(self) -> Any:
        """The first `steps x batch_size` windows of the training documents (refused when there are fewer)."""
        import warnings

        from ...io.text_data import make_windows

        if self._windows is None:
            train = self.spec.train
            need = train.steps * train.batch_size
            docs = self.train_documents()
            with warnings.catch_warnings():  # too few windows is the error below, not a warning
                warnings.simplefilter("ignore")
                windows = make_windows(self.inputs.tokenizer, docs, train.seq_len, need) if docs else None
            if windows is None or windows.shape[0] < need:
                have = 0 if windows is None else windows.shape[0]
                raise UserError(f"recovery.train: {train.steps} steps x {train.batch_size} windows of {train.seq_len} "
                                f"tokens need {need} windows, the text after the held-out part gives {have}: fewer "
                                "steps, a shorter seq_len or another recovery.train.source")
            self._windows = windows[:need]
        return self._windows

    # --------------------------------------------------------------------------------------------- rows
    def rows(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """Per point: the dropped model untrained, then each recipe; then each recipe's control row. The
        recovery runs come first, in that order, the controls after them."""
        trained = []
        for p in self.spec.points:
            sweep = self.cfg.sweep(p.sweep)
            attn, mlp = self.drops.drop_set(sweep, p.target, p.num)
            dropped = self.points.point(attn, mlp)
            # the same target and count under several rules (sweeps) are told apart by the sweep
            where = {"point": f"{p.target}-{p.num}" + ("" if p.sweep == self.cfg.sweeps[0].name else f" [{p.sweep}]"),
                     "sweep": p.sweep, "rule": sweep.rule or sweep.name}
            none = {"recipe": "none", "tokens": 0, "drop_attn": attn, "drop_mlp": mlp, **_quality(dropped), **where}
            trained.append((none, dropped, None))
            trained += [({**self.row(p, r), **where}, dropped, r.name) for r in self.spec.recipes
                        if p.recipes is None or r.name in p.recipes]
        controls = {r.name: self.row(None, r) for r in self.spec.recipes if r.control}
        out = [self._finish(row, base, dropped, controls.get(name) if name else None)
               for row, dropped, name in trained]
        return out + [self._finish(row, base, None, None) for row in controls.values()]

    def row(self, point: RecoveryPointSpec | None, recipe: RecipeSpec) -> dict[str, Any]:
        """One recipe trained on one point (None: the control, the undropped model), cached."""
        key = self.key(point, recipe)
        label = "control" if point is None else f"{point.target}-{point.num}"

        def train() -> dict[str, Any]:
            with self.inputs.timed("recovery", f"recovery {recipe.name} on {label} (its evaluation apart)"):
                return self.train(point, recipe)

        return self.cache.get_or_compute("recovery", key, train)

    def key(self, point: RecoveryPointSpec | None, recipe: RecipeSpec) -> str:
        payload: dict[str, Any] = {"kind": "recovery", **self.keys.model(), "eval": self.points.eval_key(),
                                   "train": dataclasses.asdict(self.spec.train), "recipe": dataclasses.asdict(recipe),
                                   "seed": self.cfg.seed}
        payload["recipe"].pop("control")
        payload["recipe"].pop("name")
        if point is None:
            payload["point"] = None
        elif recipe.rounds > 1:  # the fit scores and drops itself
            sweep = self.cfg.sweep(point.sweep)
            payload["point"] = {"target": point.target, "num": point.num, "metric": sweep.metric,
                                "calibration": self.keys.calibration(self.cfg.calibration_for(sweep))}
        else:
            attn, mlp = self.drops.drop_set(self.cfg.sweep(point.sweep), point.target, point.num)
            payload["point"] = {"attn": sorted(attn), "mlp": sorted(mlp)}
        return key_of(payload)

    def _finish(self, row: dict[str, Any], base: dict[str, Any], dropped: dict[str, Any] | None,
                control: dict[str, Any] | None) -> dict[str, Any]:
        """Fractions of the perplexity gap recovered, per domain: vs the base model and vs the control."""
        row = dict(row)
        for k in [k for k in row if k.startswith("perplexity")]:
            if dropped is not None:
                row[f"gap_recovered{k[len('perplexity'):]}"] = _gap(dropped.get(k), row[k], base.get(k))
            if control is not None and dropped is not None:
                row[f"gap_recovered_vs_control{k[len('perplexity'):]}"] = _gap(dropped.get(k), row[k], control.get(k))
        if dropped is None:
            row["ppl_change_vs_base"] = {k: row[k] / base[k] - 1 for k in row if k.startswith("perplexity")
                                         and base.get(k)}
        return row

    # ----------------------------------------------------------------------------------------- training
    def train(self, point: RecoveryPointSpec | None, recipe: RecipeSpec) -> dict[str, Any]:
        import torch
        from torch.utils.data import DataLoader

        from ...callbacks import Distillation, LayerDrop
        from ...lightning.datamodule import WindowDataset
        from ...lightning.module import DropModule
        from ...core.modeling_dropped import dropped_layers

        train = self.spec.train
        label = "control" if point is None else f"{point.target}-{point.num}"
        self.inputs.log(f"recovery {recipe.name} on {label}: {train.steps} steps x {train.batch_size} x "
                        f"{train.seq_len} tokens")
        t0, c0 = time.perf_counter(), time.process_time()
        windows = self.train_windows()
        pl.seed_everything(self.cfg.seed, verbose=False)
        module = DropModule(model=self.cfg.model, dtype=self.cfg.model_dtype, lr=recipe.lr, scheduler="cosine",
                            warmup_steps=recipe.warmup_steps, max_steps=train.steps)
        module.model.load_state_dict(self.inputs.model.state_dict())  # exactly the study's base (random inits too)
        callbacks: list[Any] = []
        args = dict(recipe.distillation)
        if point is not None and recipe.rounds > 1:
            sweep = self.cfg.sweep(point.sweep)
            calib = self.cfg.calibration_for(sweep)
            callbacks.append(LayerDrop(target=point.target, num=point.num, metric=sweep.metric, schedule="iterative",
                                       step=math.ceil(point.num / recipe.rounds),
                                       every_n_steps=max(1, train.steps // recipe.rounds), when="fit_start",
                                       seed=self.cfg.seed, calibration_source=calib.source,
                                       calibration_samples=calib.num_samples, calibration_seq_len=calib.seq_len,
                                       calibration_batch_size=calib.batch_size, verbose=self.inputs.verbose))
            args["start"] = "first_drop"  # the teacher: Distillation's copy of the model before the first round
        else:
            if point is not None:
                attn, mlp = self.drops.drop_set(self.cfg.sweep(point.sweep), point.target, point.num)
                module.apply_drop(attn=attn, mlp=mlp)
            args["teacher"] = copy.deepcopy(self.inputs.model)  # the undropped model; the study's stays untouched
        curve = Curve(self.points, train.eval_every, train.batch_size * train.seq_len)
        callbacks += [Distillation(**args), curve]
        generator = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(WindowDataset(windows), batch_size=train.batch_size, shuffle=True, generator=generator)
        trainer = pl.Trainer(accelerator="cpu", max_steps=train.steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks)
        trainer.fit(module, train_dataloaders=loader)
        model = module.hf_model
        attn, mlp = dropped_layers(model)
        quality = self.points.quality(model)
        curve.points.append({"step": train.steps, "tokens": train.tokens,
                             **{k: v for k, v in quality.items() if k.startswith("perplexity")}})
        saved = None
        if self.spec.save and point is not None:
            from ...io.dropped_checkpoint import save_dropped

            saved = str(save_dropped(model, self.out / f"recovered-{label}-{recipe.name}", self.inputs.tokenizer,
                                     overwrite=True))
            self.inputs.log(f"recovered model saved to {saved}")
        row = {"point": label, "recipe": recipe.name, "checkpoint": saved,
               "tokens": train.tokens, "drop_attn": attn, "drop_mlp": mlp, **quality,
               "curve": curve.points, "train_seconds": time.perf_counter() - t0,
               "train_cpu_seconds": time.process_time() - c0}
        del module, model
        return row


class Curve(pl.Callback):
    """Held-out perplexity in every domain at step 0 and every `every` steps of a recovery fit."""

    def __init__(self, evaluator: PointEvaluator, every: int, tokens_per_step: int) -> None:
        self.evaluator, self.every, self.tokens_per_step = evaluator, every, tokens_per_step
        self.points: list[dict[str, Any]] = []

    def measure(self, step: int, model: Any) -> None:
        self.points.append({"step": step, "tokens": step * self.tokens_per_step,
                            **self.evaluator.perplexities(model)})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measure(0, pl_module.hf_model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < trainer.max_steps:
            self.measure(step, pl_module.hf_model)


def _quality(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.startswith("perplexity") or k.startswith("mc_")}


def _gap(dropped: float | None, now: float | None, reference: float | None) -> float | None:
    """`(ppl_dropped - ppl_now) / (ppl_dropped - ppl_reference)`; None when there is no gap to recover."""
    if dropped is None or now is None or reference is None or not dropped - reference > 0:
        return None
    return (dropped - now) / (dropped - reference)
