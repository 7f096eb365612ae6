"""Choosing what to drop from importance scores: ranking, limits, per kind or jointly."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import UserError
from .importance import ImportanceScores
from ..core.options import TARGETS
from .registry import Registry, check_arity

#: A selection rule: (scores, target, how many, kept layers) -> (attention indices, MLP indices) to drop.
RuleFn = Callable[[ImportanceScores, str, int, Sequence[int]], tuple[list[int], list[int]]]


def target_kinds(target: str) -> tuple[str, ...]:
    """The score rows a target ranks (joint: attention and MLP together)."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
    return {"block": ("block",), "attn": ("attn",), "mlp": ("mlp",), "joint": ("attn", "mlp")}[target]


def candidates(scores: ImportanceScores, target: str, keep: Sequence[int] = ()) -> list[tuple[float, int, str, int]]:
    """Sort keys (score, kind order, layer, kind) of droppable modules: lowest score first, ties by kind then layer."""
    kinds = target_kinds(target)
    protected = set(keep)
    out = []
    for order, kind in enumerate(kinds):
        for i, s in enumerate(scores.row(kind)):
            if s is not None and i not in protected:
                out.append((float(s), order, i, kind))
    return sorted(out)


def resolve_num(total: int, num: int | None, ratio: float | None) -> int:
    """Number of modules to drop from `num` or `ratio` of `total` (exactly one of them)."""
    if (num is None) == (ratio is None):
        raise UserError("give exactly one of num or ratio")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise UserError(f"ratio must be in (0, 1), got {ratio}")
        num = max(1, round(ratio * total))
    assert num is not None
    if num < 1:
        raise UserError(f"num must be at least 1, got {num}")
    return num


def droppable_modules(num_layers: int, target: str, keep: Sequence[int] = (), dropped_attn: Sequence[int] = (),
                      dropped_mlp: Sequence[int] = ()) -> tuple[int, bool]:
    """(how many `target` modules are still there and not kept, whether dropping all of them would remove
    every sublayer the model has left). Known before any scoring."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
    protected, da, dm = set(keep), set(dropped_attn), set(dropped_mlp)
    free_attn = [i for i in range(num_layers) if i not in da and i not in protected]
    free_mlp = [i for i in range(num_layers) if i not in dm and i not in protected]
    surviving = 2 * num_layers - len(da) - len(dm)  # sublayers still in the model
    if target == "block":
        blocks = [i for i in range(num_layers) if not (i in da and i in dm) and i not in protected]
        return len(blocks), sum((i not in da) + (i not in dm) for i in blocks) == surviving
    count = {"attn": len(free_attn), "mlp": len(free_mlp), "joint": len(free_attn) + len(free_mlp)}[target]
    return count, count == surviving


def max_droppable(num_layers: int, target: str, keep: Sequence[int] = (), dropped_attn: Sequence[int] = (),
                  dropped_mlp: Sequence[int] = ()) -> int:
    """How many more `target` modules can go without removing every sublayer of the model."""
    count, removes_all = droppable_modules(num_layers, target, keep, dropped_attn, dropped_mlp)
    return count - 1 if removes_all and count else count


def require_droppable(num: int, num_layers: int, target: str, keep: Sequence[int] = (),
                      dropped_attn: Sequence[int] = (), dropped_mlp: Sequence[int] = (), where: str = "") -> None:
    """Refuse, before the calibration pass, a request for more modules than `max_droppable`.

    `where` names the option or config key the count came from, for the message.
    """
    limit = max_droppable(num_layers, target, keep, dropped_attn, dropped_mlp)
    if num > limit:
        head = f"{where}: " if where else ""
        if keep and droppable_modules(num_layers, target, (), dropped_attn, dropped_mlp)[0] and \
                not droppable_modules(num_layers, target, keep, dropped_attn, dropped_mlp)[0]:
            raise UserError(f"{head}cannot drop {num} {target} modules: keep {sorted(set(keep))} protects every "
                            f"{target} module the model has left")
        raise UserError(f"{head}cannot drop {num} {target} modules: at most {limit} can go"
                        f"{' (after keep)' if keep else ''} without removing every sublayer "
                        f"(the model has {num_layers} layers)")


def check_span(span: int | None, metric: str, target: str, num_layers: int | None = None,
               num: int | None = None, where: str = "--span") -> None:
    """One line, before any model work, for a span the span rule cannot take: Gromov's rule compares the input
    of a span of blocks with its output by angular distance, so it needs the angular metric and the block
    target, a span within the model, and drops exactly the span."""
    if span is None:
        return
    if isinstance(span, bool) or not isinstance(span, int) or span < 1:
        raise UserError(f"{where} must be an integer >= 1, got {span!r}")
    if metric != "angular":
        raise UserError(f"{where} scores spans by angular distance: it needs the angular metric, not '{metric}'")
    if target != "block":
        raise UserError(f"{where} drops consecutive blocks: it needs the block target, not '{target}'")
    if num_layers is not None and span >= num_layers:
        raise UserError(f"{where} {span} is not smaller than the model's {num_layers} layers")
    if num is not None and num != span:
        raise UserError(f"{where} {span} drops {span} blocks, but the count asked for is {num}")


def select_span(scores: ImportanceScores, num: int, keep: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """The blocks of the lowest-scoring span (the block row of span scores holds one score per first block)."""
    span = int(scores.extra["span"])
    if num != span:
        raise UserError(f"span scores of {span} blocks cannot drop {num} blocks")
    starts = [(float(v), i) for i, v in enumerate(scores.block)
              if v is not None and not set(keep) & set(range(i, i + span))]
    if not starts:
        raise UserError(f"no span of {span} blocks can be dropped{' (after --keep)' if keep else ''}")
    first = min(starts)[1]
    gone_attn, gone_mlp = gone(scores, "attn"), gone(scores, "mlp")
    return ([i for i in range(first, first + span) if i not in gone_attn],
            [i for i in range(first, first + span) if i not in gone_mlp])


def gone(scores: ImportanceScores, kind: str) -> set[int]:
    """Sublayers of `kind` already dropped when `scores` were taken. Scores that leave rows unscored (spans,
    a `loss` round scoring only its target's kind) record them; otherwise they are the None entries."""
    if "dropped" in scores.extra:
        return set(scores.extra["dropped"][kind])
    return {i for i, v in enumerate(scores.row(kind)) if v is None}


def select_modules(scores: ImportanceScores, target: str, num: int, keep: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(attention indices, MLP indices) of the `num` lowest-scoring modules; a block counts as both.

    A block whose one sublayer is already gone contributes only its surviving sublayer. Scores of spans
    (`compute_importance(..., span=n)`) give the lowest-scoring span.
    """
    if scores.extra.get("span") and target == "block":
        return select_span(scores, num, keep)
    ranked = candidates(scores, target, keep)
    if num > len(ranked):
        raise UserError(f"cannot drop {num} {target} modules: only {len(ranked)} can be dropped"
                         f"{' (after --keep)' if keep else ''}")
    attn: list[int] = []
    mlp: list[int] = []
    gone_attn, gone_mlp = gone(scores, "attn"), gone(scores, "mlp")
    for _, _, i, kind in ranked[:num]:
        if kind == "attn" or (kind == "block" and i not in gone_attn):
            attn.append(i)
        if kind == "mlp" or (kind == "block" and i not in gone_mlp):
            mlp.append(i)
    return sorted(attn), sorted(mlp)


def total_modules(num_layers: int, target: str) -> int:
    return 2 * num_layers if target == "joint" else num_layers


def _make_rule(name: str, fn: Any) -> RuleFn:
    check_arity(fn, 4, f"selection rule '{name}'")
    return fn


RULE_REGISTRY: Registry[RuleFn] = Registry("selection rule", _make_rule)
RULE_REGISTRY.register("lowest", select_modules)


def register_rule(name: str, fn: RuleFn) -> RuleFn:
    """Make `fn(scores, target, num, keep) -> (attn, mlp)` a selection rule under `name`."""
    return RULE_REGISTRY.register(name, fn)


def resolve_rule(rule: str | RuleFn) -> RuleFn:
    """A registered name (`lowest`: the `num` lowest scores), a rule callable or an importable name of one."""
    return RULE_REGISTRY.resolve(rule)
