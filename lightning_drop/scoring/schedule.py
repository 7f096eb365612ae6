"""The one drop walk: score, drop the lowest, re-score, repeat; schedules say how much each round drops.

Every way of dropping by importance (in memory, layer-streamed, the study's cached walk, the `LayerDrop`
callback) runs this schedule and differs only in how a round is scored and what happens to its drops. The
walk is a function of (step, count) alone: round r is scored with the schedule's first `r * step` drops gone
and takes the next `step` lowest, so the set for a count n between two rounds is the set at `step * (n // step)`
plus the `n % step` lowest of that round's scores. A set therefore never depends on which other counts a
caller asks for, and every caller gets the same sets from the same scores.

A schedule is a `DropSchedule`: the shipped `one-shot` (one round) and `iterative` (`step` per round), or a
user's own `round_size(remaining, step)` registered with `register_schedule` or given as a callable or an
importable name wherever a schedule is asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch import nn

from ..core.architectures import get_spec
from ..errors import UserError
from .importance import ImportanceScores, compute_importance
from .metrics import ImportanceMetric, resolve_metric
from ..core.modeling_dropped import apply_drop, drop_lists, dropped_layers
from ..core.options import SCHEDULES, TARGETS
from .registry import Registry, check_arity
from .selection import RuleFn, check_span, require_droppable, resolve_rule, target_kinds

#: Scores one round: called with the modules this schedule has dropped so far (attention, MLP; on top of
#: what was gone before it started) and the round index (`at // step`: the seed offset of the `random` metric).
ScoreFn = Callable[[list[int], list[int], int], ImportanceScores]
#: How many modules a round drops, given how many are still to drop and the schedule's step (1..remaining).
RoundSizeFn = Callable[[int, int], int]


@dataclass(frozen=True)
class DropSchedule:
    """How a walk splits `num` drops into rounds; every round after the first is scored on the model
    without the drops before it."""

    name: str
    round_size: RoundSizeFn
    #: False: one round from the scores of the model as it is (nothing is re-scored; the study's one-shot sets)
    rescores: bool = True

    def __post_init__(self) -> None:
        check_arity(self.round_size, 2, f"schedule '{self.name}'")

    def sizes(self, num: int, step: int) -> list[int]:
        """The size of every round that drops `num` modules, in order."""
        out, left = [], num
        while left > 0:
            k = self.round_size(left, step)
            if not isinstance(k, int) or not 1 <= k <= left:
                raise UserError(f"schedule '{self.name}' must drop between 1 and {left} modules in a round, got {k!r}")
            out.append(k)
            left -= k
        return out

    def starts(self, num: int, step: int) -> list[int]:
        """How many modules are gone when each round is scored."""
        sizes = self.sizes(num, step)
        return [sum(sizes[:i]) for i in range(len(sizes))]


def _make(name: str, value: Any) -> DropSchedule:
    return value if isinstance(value, DropSchedule) else DropSchedule(name, value)


SCHEDULE_REGISTRY: Registry[DropSchedule] = Registry("schedule", _make)
SCHEDULE_REGISTRY.register("one-shot", DropSchedule("one-shot", lambda left, step: left, rescores=False))
SCHEDULE_REGISTRY.register("iterative", DropSchedule("iterative", lambda left, step: min(step, left)))
assert SCHEDULE_REGISTRY.names() == SCHEDULES, "options.SCHEDULES lists the shipped schedules for the command line"


def register_schedule(name: str, round_size: RoundSizeFn) -> DropSchedule:
    """Make `round_size(remaining, step) -> modules this round drops` a schedule under `name`."""
    return SCHEDULE_REGISTRY.register(name, DropSchedule(name, round_size))


def resolve_schedule(schedule: str | RoundSizeFn | DropSchedule) -> DropSchedule:
    """A registered name, a `DropSchedule`, a round-size callable or an importable name of either."""
    return SCHEDULE_REGISTRY.resolve(schedule)


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
    rule: RuleFn = field(default=resolve_rule("lowest"), repr=False)

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
        attn, mlp = self.rule(self.scores, self.target, n - self.at, self.keep)
        return sorted(set(self.before_attn) | set(attn)), sorted(set(self.before_mlp) | set(mlp))


def check_schedule(target: str, schedule: str | RoundSizeFn | DropSchedule, step: int) -> DropSchedule:
    """One line for an unknown target or schedule or a step below 1 (before anything is scored)."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
    resolved = resolve_schedule(schedule)
    if step < 1:
        raise UserError(f"step must be at least 1, got {step}")
    return resolved


def drop_rounds(score: ScoreFn, target: str, num: int, num_layers: int,
                schedule: str | RoundSizeFn | DropSchedule = "one-shot", step: int = 1,
                keep: Sequence[int] = (), dropped_attn: Sequence[int] = (), dropped_mlp: Sequence[int] = (),
                start: int = 0, walked: tuple[Sequence[int], Sequence[int]] = ((), ()),
                rule: str | RuleFn = "lowest") -> Iterator[DropRound]:
    """The rounds that drop `num` `target` modules: one round (one-shot), `step` at a time (iterative), or
    as a user's schedule splits them; each round picks its modules from its scores by `rule`.

    `dropped_attn`/`dropped_mlp` were gone before the schedule (never counted, never passed to `score`).
    `start` continues a walk whose first `start` modules (`walked`) are already dropped: the rounds are the
    ones the full walk would make from there. The caller applies each round's drops to whatever it scores
    before asking for the next round (a generator: nothing is scored before it is asked for). Bad arguments
    and a count the model cannot take are refused here, before the first round is scored.
    """
    plan = check_schedule(target, schedule, step)
    pick = resolve_rule(rule)
    if not 0 <= start <= num:
        raise ValueError(f"start must be in [0, {num}], got {start}")
    starts, sizes = plan.starts(num, step), plan.sizes(num, step)
    if start not in (*starts, num):
        raise ValueError(f"no round of the {plan.name} schedule starts at {start}: there is no walk to continue")
    walk_attn, walk_mlp = sorted(walked[0]), sorted(walked[1])
    require_droppable(num - start, num_layers, target, keep, sorted(set(dropped_attn) | set(walk_attn)),
                      sorted(set(dropped_mlp) | set(walk_mlp)))
    rounds = [(at, k) for at, k in zip(starts, sizes) if at >= start]
    return _rounds(score, target, rounds, len(starts) - len(rounds), pick, tuple(keep), walk_attn, walk_mlp)


def _rounds(score: ScoreFn, target: str, rounds: list[tuple[int, int]], index: int, rule: RuleFn,
            keep: tuple[int, ...], walk_attn: list[int], walk_mlp: list[int]) -> Iterator[DropRound]:
    for at, k in rounds:
        scores = score(list(walk_attn), list(walk_mlp), index)
        attn, mlp = rule(scores, target, k, keep)
        rnd = DropRound(at, k, scores, attn, mlp, walk_attn, walk_mlp, target, keep, rule)
        yield rnd
        walk_attn, walk_mlp = rnd.dropped_attn, rnd.dropped_mlp
        index += 1


@dataclass
class DropResult:
    """What was dropped (original layer indices) and the scores of every round."""

    attn: list[int]
    mlp: list[int]
    rounds: list[ImportanceScores] = field(default_factory=list)
    round_drops: list[dict[str, list[int]]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the walk (scoring and dropping)

    def cost(self) -> dict[str, float]:
        """What selecting cost: full forward passes over the calibration text (a `loss` round counts its layer
        forwards as fractions of one pass) and seconds."""
        passes = sum(r.extra.get("cost", {}).get("forward_passes", 1.0 if r.num_tokens else 0.0) for r in self.rounds)
        return {"forward_passes": round(passes, 3), "seconds": round(self.seconds, 3)}

    def record(self, scores: ImportanceScores, attn: list[int], mlp: list[int]) -> None:
        """Add one round: its scores and the modules it dropped."""
        self.rounds.append(scores)
        self.round_drops.append({"drop_attn": attn, "drop_mlp": mlp})

    def to_dict(self) -> dict[str, Any]:
        return {"drop_attn_list": self.attn, "drop_mlp_list": self.mlp,
                "rounds": [{"scores": r.to_dict(), **d} for r, d in zip(self.rounds, self.round_drops)]}


def drop_by_importance(model: nn.Module, batches: Iterable[Any] | Callable[[], Iterable[Any]], target: str,
                       num: int, metric: str | Callable | ImportanceMetric = "cosine",
                       schedule: str | RoundSizeFn | DropSchedule = "one-shot", step: int = 1,
                       keep: Sequence[int] = (), seed: int = 0, progress: bool = False,
                       rule: str | RuleFn = "lowest", span: int | None = None) -> DropResult:
    """Score, select and drop `num` modules of `model` in place (`drop_rounds`).

    One-shot scores once. Iterative drops `step` modules, re-scores the dropped model, and repeats.
    `batches` may be a callable returning a fresh iterable (needed when it is a one-pass generator).
    `span`: drop the `num` consecutive blocks whose input and output are closest (angular metric).
    """
    plan = check_schedule(target, schedule, step)
    measure = resolve_metric(metric)
    check_span(span, measure.name, target, len(get_spec(model).get_layers(model)), num)
    pick = resolve_rule(rule)
    get_batches = batches if callable(batches) else (lambda data=list(batches): data)

    def score(attn: list[int], mlp: list[int], index: int) -> ImportanceScores:
        return compute_importance(model, get_batches(), metric=measure, seed=seed + index, progress=progress,
                                  kinds=target_kinds(target), span=span)

    result, start = DropResult([], []), time.perf_counter()
    for rnd in drop_rounds(score, target, num, len(get_spec(model).get_layers(model)), plan, step, keep,
                           *dropped_layers(model), rule=pick):
        apply_drop(model, attn=rnd.attn, mlp=rnd.mlp)  # the next round scores the dropped model
        result.record(rnd.scores, rnd.attn, rnd.mlp)
    result.attn, result.mlp = drop_lists(model)  # not the sublayers a single-sublayer layer never had
    result.seconds = time.perf_counter() - start
    return result
