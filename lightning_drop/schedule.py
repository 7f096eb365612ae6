"""The one drop schedule: score, drop the lowest, re-score (iterative), repeat.

Every way of dropping by importance (in memory, layer-streamed, the study's cached walk, the `LayerDrop`
callback) runs this schedule and differs only in how a round is scored and what happens to its drops. The
walk is a function of (step, count) alone: round r is scored with the schedule's first `r * step` drops gone
and takes the next `step` lowest, so the set for a count n between two rounds is the set at `step * (n // step)`
plus the `n % step` lowest of that round's scores. A set therefore never depends on which other counts a
caller asks for, and every caller gets the same sets from the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch import nn

from .architectures import get_spec
from .errors import UserError
from .importance import ImportanceScores, compute_importance
from .modeling_dropped import apply_drop, dropped_layers
from .options import METRICS, SCHEDULES, TARGETS
from .selection import require_droppable, select_modules

#: Scores one round: called with the modules this schedule has dropped so far (attention, MLP; on top of
#: what was gone before it started) and the round index (`at // step`: the seed offset of the `random` metric).
ScoreFn = Callable[[list[int], list[int], int], ImportanceScores]


@dataclass
class DropRound:
    """One round: where it was scored, its scores and what it drops."""

    at: int  # how many `target` modules the schedule had dropped when this round was scored
    size: int  # how many `target` modules this round drops
    scores: ImportanceScores
    attn: list[int]  # attention sublayers this round drops
    mlp: list[int]  # MLP sublayers this round drops
    before_attn: list[int]  # the schedule's drops when the round was scored
    before_mlp: list[int]
    target: str
    keep: tuple[int, ...] = ()

    @property
    def dropped_attn(self) -> list[int]:
        """Every attention sublayer the schedule has dropped after this round."""
        return sorted(set(self.before_attn) | set(self.attn))

    @property
    def dropped_mlp(self) -> list[int]:
        return sorted(set(self.before_mlp) | set(self.mlp))

    def set_at(self, n: int) -> tuple[list[int], list[int]]:
        """The schedule's set at count `n` (`at < n`): this round's `n - at` lowest on top of what it was scored
        with. Also valid past this round's own size (a partial last round), since the picks are a prefix."""
        if n <= self.at:
            raise ValueError(f"count {n} is not after this round's start ({self.at})")
        attn, mlp = select_modules(self.scores, self.target, n - self.at, self.keep)
        return sorted(set(self.before_attn) | set(attn)), sorted(set(self.before_mlp) | set(mlp))


def check_schedule(target: str, schedule: str, step: int) -> None:
    """One line for an unknown target or schedule or a step below 1 (before anything is scored)."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule '{schedule}'; choose from {', '.join(SCHEDULES)}")
    if step < 1:
        raise UserError(f"step must be at least 1, got {step}")


def drop_rounds(score: ScoreFn, target: str, num: int, num_layers: int, schedule: str = "one-shot", step: int = 1,
                keep: Sequence[int] = (), dropped_attn: Sequence[int] = (), dropped_mlp: Sequence[int] = (),
                start: int = 0, walked: tuple[Sequence[int], Sequence[int]] = ((), ())) -> Iterator[DropRound]:
    """The rounds that drop `num` `target` modules: one round (one-shot) or `step` at a time (iterative).

    `dropped_attn`/`dropped_mlp` were gone before the schedule (never counted, never passed to `score`).
    `start` continues a walk whose first `start` modules (`walked`) are already dropped: the rounds are the
    ones the full walk would make from there. The caller applies each round's drops to whatever it scores
    before asking for the next round (a generator: nothing is scored before it is asked for). Bad arguments
    and a count the model cannot take are refused here, before the first round is scored.
    """
    check_schedule(target, schedule, step)
    if not 0 <= start <= num:
        raise ValueError(f"start must be in [0, {num}], got {start}")
    if schedule == "one-shot" and start:
        raise ValueError("a one-shot schedule is a single round: there is no walk to continue")
    walk_attn, walk_mlp = sorted(walked[0]), sorted(walked[1])
    require_droppable(num - start, num_layers, target, keep, sorted(set(dropped_attn) | set(walk_attn)),
                      sorted(set(dropped_mlp) | set(walk_mlp)))
    return _rounds(score, target, num, schedule, step, tuple(keep), start, walk_attn, walk_mlp)


def _rounds(score: ScoreFn, target: str, num: int, schedule: str, step: int, keep: tuple[int, ...], at: int,
            walk_attn: list[int], walk_mlp: list[int]) -> Iterator[DropRound]:
    while at < num:
        k = num - at if schedule == "one-shot" else min(step, num - at)
        scores = score(list(walk_attn), list(walk_mlp), at // step)
        attn, mlp = select_modules(scores, target, k, keep)
        rnd = DropRound(at, k, scores, attn, mlp, walk_attn, walk_mlp, target, keep)
        yield rnd
        walk_attn, walk_mlp = rnd.dropped_attn, rnd.dropped_mlp
        at += k


@dataclass
class DropResult:
    """What was dropped (original layer indices) and the scores of every round."""

    attn: list[int]
    mlp: list[int]
    rounds: list[ImportanceScores] = field(default_factory=list)
    round_drops: list[dict[str, list[int]]] = field(default_factory=list)

    def record(self, scores: ImportanceScores, attn: list[int], mlp: list[int]) -> None:
        """Add one round: its scores and the modules it dropped."""
        self.rounds.append(scores)
        self.round_drops.append({"drop_attn": attn, "drop_mlp": mlp})

    def to_dict(self) -> dict[str, Any]:
        return {"drop_attn_list": self.attn, "drop_mlp_list": self.mlp,
                "rounds": [{"scores": r.to_dict(), **d} for r, d in zip(self.rounds, self.round_drops)]}


def drop_by_importance(model: nn.Module, batches: Iterable[Any] | Callable[[], Iterable[Any]], target: str,
                       num: int, metric: str = "cosine", schedule: str = "one-shot", step: int = 1,
                       keep: Sequence[int] = (), seed: int = 0, progress: bool = False) -> DropResult:
    """Score, select and drop `num` modules of `model` in place (`drop_rounds`).

    One-shot scores once. Iterative drops `step` modules, re-scores the dropped model, and repeats.
    `batches` may be a callable returning a fresh iterable (needed when it is a one-pass generator).
    """
    check_schedule(target, schedule, step)
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    get_batches = batches if callable(batches) else (lambda data=list(batches): data)

    def score(attn: list[int], mlp: list[int], index: int) -> ImportanceScores:
        return compute_importance(model, get_batches(), metric=metric, seed=seed + index, progress=progress)

    result = DropResult([], [])
    for rnd in drop_rounds(score, target, num, len(get_spec(model).get_layers(model)), schedule, step, keep,
                           *dropped_layers(model)):
        apply_drop(model, attn=rnd.attn, mlp=rnd.mlp)  # the next round scores the dropped model
        result.record(rnd.scores, rnd.attn, rnd.mlp)
    result.attn, result.mlp = dropped_layers(model)
    return result
