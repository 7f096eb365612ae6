"""The `recovery` section of a study config: the recipes that heal dropped models, the drop sets they heal and
the training text and budget they share (run by `recovery.Recovery`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError
from ...core.options import TARGETS
from .construction import at_least, unique_names


@dataclass
class RecoveryTrainSpec:
    """The recovery training text and budget: `steps` x `batch_size` windows of `seq_len` tokens, cut from the
    documents of `source` (`calibration`: the calibration source) that come after every held-out window, so
    no training window shares a document with held-out text."""

    source: str = "calibration"
    text_field: str = "text"
    seq_len: int = at_least(2, 128)
    batch_size: int = at_least(1, 4)
    steps: int = at_least(1, 40)
    eval_every: int = at_least(0, 0)  # held-out perplexity every N steps (the curve); 0: start and end only

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


@dataclass
class RecipeSpec:
    """One recovery recipe: `distillation` holds the arguments of `lightning_drop.callbacks.Distillation`
    (alpha 0 = the LM loss alone; trainable lora / all / layers); `rounds` > 1 drops in that many rounds with
    `steps / rounds` healing steps after each (drop, heal, re-score the healed model, drop the next)."""

    name: str
    lr: float = 1e-3
    warmup_steps: int = at_least(0, 0)
    rounds: int = at_least(1, 1)
    distillation: dict[str, Any] = field(default_factory=dict)
    control: bool = False  # also train the undropped model so: the control that measures mere adaptation


@dataclass
class RecoveryPointSpec:
    """A drop set to recover: `num` `target` modules of the sweep `sweep`, by `recipes` (None: every recipe)."""

    target: str = "attn"
    num: int = at_least(1, 8)
    sweep: str = "main"
    recipes: list[str] | None = None


@dataclass
class RecoverySpec:
    """Recovery of dropped models, measured: every recipe on every point at the same training budget."""

    recipes: list[RecipeSpec] = field(default_factory=list)
    points: list[RecoveryPointSpec] = field(default_factory=lambda: [RecoveryPointSpec()])
    train: RecoveryTrainSpec = field(default_factory=RecoveryTrainSpec)
    save: bool = False  # write each recovered model to OUTPUT/recovered-<point>-<recipe> (a dropped checkpoint)

    def check(self, where: str, sweeps: list[str]) -> None:
        from lightning.pytorch.utilities.exceptions import MisconfigurationException

        from ...callbacks import Distillation

        if not self.recipes:
            raise UserError(f"{where}.recipes: give at least one recipe")
        names = unique_names(f"{where}.recipes", [r.name for r in self.recipes])
        for i, r in enumerate(self.recipes):
            at = f"{where}.recipes[{i}] ({r.name})"
            if not r.lr > 0:
                raise UserError(f"{at}.lr must be > 0, got {r.lr}")
            if r.rounds > self.train.steps:
                raise UserError(f"{at}.rounds: {r.rounds} rounds need at least as many training steps "
                                f"({where}.train.steps is {self.train.steps})")
            for key in ("teacher", "start"):
                if key in r.distillation:
                    raise UserError(f"{at}.distillation.{key}: set by the study (the teacher is the undropped "
                                    "model; rounds > 1 heals between rounds)")
            if r.control and r.distillation.get("layers") == "near_drops":
                raise UserError(f"{at}.control: an undropped model has no layers near drops; give layer indices "
                                "or set control: false")
            try:
                Distillation(**r.distillation)
            except MisconfigurationException as err:
                raise UserError(f"{at}.distillation: {str(err).removeprefix('Distillation: ')}") from None
            except TypeError as err:
                raise UserError(f"{at}.distillation: {err}") from None
        for i, p in enumerate(self.points):
            at = f"{where}.points[{i}]"
            if p.target not in TARGETS:
                raise UserError(f"{at}.target: unknown target '{p.target}'; choose from {', '.join(TARGETS)}")
            if p.sweep not in sweeps:
                raise UserError(f"{at}.sweep: no sweep named '{p.sweep}'; sweeps: {sweeps}")
            unknown = [n for n in p.recipes or [] if n not in names]
            if unknown:
                raise UserError(f"{at}.recipes: no recipe named {unknown}; recipes: {names}")
