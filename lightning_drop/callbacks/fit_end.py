"""How the callbacks cooperate: roles declared on one per-fit record kept on the trainer (`FitEnd`).

A fit-end measurement must see the model as the fit leaves it (fit-end drops done, LoRA merged) and may need
another measurement's result (the SDR needs lm-eval's average), whatever the order of `trainer.callbacks`.
Instead of searching `trainer.callbacks` for concrete classes, every cooperating callback joins the fit's
record in `setup("fit")` with a role:

- `drop`: changes the model's structure (`LayerDrop`). It exposes `when` (`fit_start`, `step`, `fit_end`)
  and `finished`; a fit-end drop registers its idempotent `finish` step.
- `adapters`: recovery training of the dropped model (`LoRARecovery`, `Distillation`); `finish` merges
  adapters. It recovers from the drops listed before it, so a drop that would change the model under
  adapters already attached is refused when it joins (the list order of drops and adapters is the user's
  pipeline).
- `measure`: provides a named result (`lm_eval`, `perplexity`, `speed`, `quantize`) through `measure`.
  The measurement callbacks share `FitEndMeasurement`, which joins and publishes for them.

At fit end, `final_model()` runs every registered `finish` step in joining order (the setup order, i.e.
the pipeline order the user wrote; each step is idempotent, so the member's own `on_train_end` does nothing
after it) and returns the plain transformers model; `result(key)` returns a published result, measuring
it now if its provider has not run yet. Both are collectives: call them on every rank (a drop scores and
broadcasts; a result is measured on rank zero and broadcast, so every rank holds the same `results`).
Nothing here needs a `DropModule`: the model is found with `_common.hf_of`, adapters with peft's own API.

Just before a drop changes the model, the drop member calls `before_drop`, and `after_drop` just after it:
every `FitEndMember` of the trainer hears them, joined or not, because a fit-start drop happens in its own
`setup`, before the callbacks listed after it have joined. A distillation teacher is copied from the model
as it was; a recovery that heals between the rounds of a schedule merges its adapters before a round and
makes the new model trainable after it.

The record lives on the trainer from the first join of a fit until a member's `teardown` or
`on_exception` (`FitEndMember`), so a second `fit` with the same trainer starts afresh.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_drop.lightning.distributed import is_sharded

from ._common import hf_of

Role = Literal["drop", "adapters", "measure"]
Step = Callable[[pl.Trainer, pl.LightningModule], Any]
_ATTR = "_lightning_drop_fit_end"


@dataclass
class Member:
    owner: Any
    role: Role
    finish: Step | None = None  # drop / adapters: bring the model to its final state (idempotent)
    key: str | None = None  # measure: the result it provides
    measure: Step | None = None  # measure: the value on rank zero (None elsewhere); called on every rank


class FitEnd:
    """The cooperating callbacks of one fit, in joining order, and the results published so far."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.results: dict[str, Any] = {}
        self._measured: set[int] = set()
        self._running: set[int] = set()
        self._gathered: tuple[str, nn.Module] | None = None  # rank zero's plain copy of a sharded model

    @staticmethod
    def of(trainer: pl.Trainer) -> FitEnd:
        """This fit's record (created on first use)."""
        record = getattr(trainer, _ATTR, None)
        if record is None:
            record = FitEnd()
            setattr(trainer, _ATTR, record)
        return record

    @staticmethod
    def close(trainer: pl.Trainer) -> None:
        """Forget the record (end of fit): the next fit's members join a new one."""
        if getattr(trainer, _ATTR, None) is not None:
            setattr(trainer, _ATTR, None)

    # ----------------------------------------------------------------------------------------- joining
    def join(self, owner: Any, role: Role, *, finish: Step | None = None, key: str | None = None,
             measure: Step | None = None) -> FitEnd:
        """Register `owner` once (a second join keeps its first place); returns the record."""
        if role not in ("drop", "adapters", "measure"):
            raise ValueError(f"unknown role {role!r}")
        if role == "measure" and (key is None or measure is None):
            raise ValueError("a measure member needs `key` and `measure`")
        if any(m.owner is owner for m in self.members):
            return self
        if role == "drop":
            self._check_drop_order(owner)
        self.members.append(Member(owner, role, finish, key, measure))
        return self

    def _check_drop_order(self, drop: Any) -> None:
        """Adapters recover from the drops listed before them: a drop listed after adapters that are (or will
        be, `when='after_drop'`) attached before it acts would change the model under them."""
        for m in self.of_role("adapters"):
            waits = getattr(m.owner, "when", None) == "after_drop"
            if waits or getattr(drop, "when", None) == "fit_start":
                name, drop_name = type(m.owner).__name__, type(drop).__name__
                raise MisconfigurationException(
                    f"{name} must come after the {drop_name} callbacks in `trainer.callbacks`: "
                    + ("it attaches its adapters once the drops listed before it are done"
                       if waits else "a fit-start drop has to happen before the adapters are attached"))

    def of_role(self, role: Role) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def drops(self) -> list[Any]:
        """The `drop` members (their callbacks), in joining order."""
        return [m.owner for m in self.of_role("drop")]

    def drops_finished(self) -> bool:
        """Every joined drop has done all its rounds (vacuously true without drops)."""
        return all(getattr(d, "finished", True) for d in self.drops())

    def before_drop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A drop is about to remove sublayers: tell every `FitEndMember` of the trainer (`before_drop`).

        All of `trainer.callbacks` hear it through the base class's hook, not only the members that joined:
        a fit-start drop happens in `setup`, before the callbacks listed after it join. Call on every rank.
        """
        for callback in trainer.callbacks:
            if isinstance(callback, FitEndMember):
                callback.before_drop(trainer, pl_module)

    def after_drop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A drop round has just removed sublayers (not called when recorded drops are re-applied on resume):
        tell every `FitEndMember` of the trainer (`after_drop`), as `before_drop`. Call on every rank."""
        for callback in trainer.callbacks:
            if isinstance(callback, FitEndMember):
                callback.after_drop(trainer, pl_module)

    # ----------------------------------------------------------------------------------------- fit end
    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run every `finish` step in joining order (each idempotent). Call on every rank."""
        for m in self.members:
            if m.finish is not None:
                m.finish(trainer, pl_module)

    def final_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged_copy: bool = False) -> nn.Module:
        """The transformers model as this fit leaves it. Call on every rank.

        Adapters that stay attached (no merge) still act inside the returned model; `merged_copy=True` returns
        a merged deep copy then (for what must see a plain checkpoint: quantization, speed of the deployable
        model), leaving the module's adapters in place.
        """
        self.finalize(trainer, pl_module)
        wrapped = getattr(pl_module, "model", None)
        if isinstance(wrapped, nn.Module) and is_sharded(wrapped):
            return self._gathered_model(trainer, pl_module)
        if merged_copy and _has_adapters(wrapped):
            return copy.deepcopy(wrapped).merge_and_unload()
        return hf_of(pl_module)

    def _gathered_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """Under FSDP2: the whole model gathered (adapters merged) on rank zero, loaded on CPU, once per model
        state; other ranks take part in the gathers and get the sharded model (they measure nothing)."""
        from lightning_drop.lightning.sharded_weights import load_gathered

        gather = getattr(pl_module, "gathered_dir", None)
        if gather is None:
            raise MisconfigurationException(f"{type(pl_module).__name__} cannot gather its sharded model for fit-end "
                                            "measurements: use lightning_drop.DropModule")
        directory = gather()
        if directory is None:
            return hf_of(pl_module)
        if self._gathered is None or self._gathered[0] != directory:
            self._gathered = (directory, load_gathered(directory))
        return self._gathered[1]

    def publish(self, trainer: pl.Trainer, key: str, value: Any) -> Any:
        """Record `value` (rank zero's, broadcast: every rank holds the same results). Call on every rank."""
        value = trainer.strategy.broadcast(value, src=0)
        self.results[key] = value
        return value

    def result(self, trainer: pl.Trainer, pl_module: pl.LightningModule, key: str) -> Any:
        """The result `key`, measured now by its providers that have not run yet (None when nobody provides
        it). With several providers of one key the last one listed wins. Call on every rank."""
        for m in self.of_role("measure"):
            if m.key == key and id(m.owner) not in self._measured and id(m.owner) not in self._running:
                self.run_measure(trainer, pl_module, m.owner)
        return self.results.get(key)

    def run_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, owner: Any) -> Any:
        """Run `owner`'s measurement once per fit and publish it; later calls return the published value."""
        m = next((m for m in self.of_role("measure") if m.owner is owner), None)
        if m is None:
            raise MisconfigurationException(f"{type(owner).__name__} did not join this fit's record as a measure")
        if id(owner) in self._measured:
            return self.results.get(m.key)
        self._running.add(id(owner))
        try:
            value = m.measure(trainer, pl_module)  # type: ignore[misc]
        finally:
            self._running.discard(id(owner))
        self._measured.add(id(owner))
        assert m.key is not None
        return self.publish(trainer, m.key, value)


def _has_adapters(model: Any) -> bool:
    from lightning_drop.lightning.module import is_peft

    return isinstance(model, nn.Module) and is_peft(model) and hasattr(model, "merge_and_unload")


def final_model(trainer: pl.Trainer, pl_module: pl.LightningModule, merged_copy: bool = False) -> nn.Module:
    """`FitEnd.of(trainer).final_model(...)`: the model as this fit leaves it. Call on every rank."""
    return FitEnd.of(trainer).final_model(trainer, pl_module, merged_copy=merged_copy)


class FitEndMember(Callback):
    """Base of the cooperating callbacks: the fit's record is dropped when the fit ends or fails."""

    def before_drop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called (on every rank) just before a drop removes sublayers of the model; nothing by default."""

    def after_drop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called (on every rank) just after a drop round, before the optimizers are rebuilt; nothing by default."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            FitEnd.close(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        FitEnd.close(trainer)


class FitEndMeasurement(FitEndMember):
    """Base of the fit-end measurements: each publishes one named result (`result_key`) on the fit's record.

    A subclass implements `_measure(trainer, pl_module)`, which runs on every rank (reaching the final model
    may be collective) and returns the result on rank zero; every rank then holds the broadcast result in
    the attribute named by `result_attr`. A sharded model is gathered to rank zero first (`final_model`).
    """

    result_key: str
    result_attr: str = "results"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            FitEnd.of(trainer).join(self, "measure", key=self.result_key, measure=self._measure)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        member = FitEnd.of(trainer).join(self, "measure", key=self.result_key, measure=self._measure)
        setattr(self, self.result_attr, member.run_measure(trainer, pl_module, self))

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement _measure")

    def state_dict(self) -> dict[str, Any]:
        """The last result, kept in Lightning checkpoints under the attribute's name."""
        return {self.result_attr: getattr(self, self.result_attr, None)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        setattr(self, self.result_attr, state_dict.get(self.result_attr))
