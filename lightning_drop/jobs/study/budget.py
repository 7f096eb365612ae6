"""The automated selection: budgets (`speedup=1.2`, `params=0.8`, `kv=0.5`) and the largest allowed quality
loss, searched by walking each direction of a sweep with increasing n (points computed only as walked)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from ...errors import UserError
from ...measure.significance import diff_stderr, relative_loss_stderr, within_noise

BUDGET_KINDS = ("speedup", "params", "kv")


def parse_budget(text: str) -> tuple[str, float]:
    """`speedup=1.2` (decode speedup >= 1.2), `params=0.8` (params <= 0.8 x base), `kv=0.5` (KV <= 0.5 x base)."""
    kind, sep, value = str(text).partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS:
        raise UserError(f"budget '{text}': expected KIND=VALUE with KIND in {', '.join(BUDGET_KINDS)} "
                         "(e.g. speedup=1.2, params=0.8, kv=0.5)")
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"budget '{text}': '{value}' is not a number") from None
    if kind == "speedup" and v <= 1.0:
        raise UserError(f"budget '{text}': a speedup target must be > 1")
    if kind in ("params", "kv") and not 0.0 <= v < 1.0:
        raise UserError(f"budget '{text}': a {kind} ratio must be in [0, 1)")
    return kind, v


def meets_budget(row: Mapping[str, Any], kind: str, value: float) -> bool:
    if kind == "speedup":
        s = row.get("decode_speedup")
        return s is not None and s >= value
    r = row.get("param_ratio" if kind == "params" else "kv_ratio")
    return r is not None and r <= value


def quality_loss(row: Mapping[str, Any], base: Mapping[str, Any], quality: str = "perplexity") -> float | None:
    """Relative quality loss vs the baseline: ppl/ppl0 - 1 (perplexity), 1 - acc/acc0 (mc)."""
    if quality == "perplexity":
        p, p0 = row.get("perplexity"), base.get("perplexity")
        return None if p is None or not p0 else p / p0 - 1.0
    a, a0 = row.get("mc_acc"), base.get("mc_acc")
    return None if a is None or not a0 else 1.0 - a / a0


def loss_stderr(row: Mapping[str, Any], base: Mapping[str, Any], quality: str) -> float | None:
    """Standard error of the MC quality loss 1 - acc/acc0, paired over the same questions where both rows kept
    each one's correctness (None for perplexity, whose windows are the same for every point)."""
    return relative_loss_stderr(row, base) if quality == "mc" else None


def auto_select(directions: Mapping[str, Sequence[int]], evaluate: Callable[[str, int], Mapping[str, Any]],
                base: Mapping[str, Any], budget: str | None = None, max_quality_loss: float | None = None,
                quality: str = "perplexity") -> dict[str, Any]:
    """Walk each direction with increasing n; stop it once it falls below the quality floor or meets the budget.

    `evaluate(direction, n)` returns a result row (computed lazily, so directions stopped early cost nothing
    more). The best configuration is the one meeting the budget with the least quality loss (ties: larger
    decode speedup); without a budget, the one with the largest decode speedup within the quality floor.
    """
    kind, value = parse_budget(budget) if budget else (None, None)
    floor = math.inf if max_quality_loss is None else max_quality_loss
    visited, walks, candidates = [], {}, []
    for direction, nums in directions.items():
        walk = {"visited": [], "stopped": "end of sweep"}
        for n in sorted(n for n in nums if n > 0):
            row = evaluate(direction, n)
            loss = quality_loss(row, base, quality)
            entry = {"direction": direction, "num": n, "quality_loss": loss,
                     "quality_loss_stderr": loss_stderr(row, base, quality),
                     "decode_speedup": row.get("decode_speedup"), "param_ratio": row.get("param_ratio"),
                     "kv_ratio": row.get("kv_ratio"), "row": dict(row)}
            walk["visited"].append(n)
            visited.append(entry)
            if loss is None or loss > floor:
                walk["stopped"] = f"quality floor at n={n} (loss {_fmt_loss(loss)} > {floor:g})"
                break
            if kind is None or meets_budget(row, kind, value):
                candidates.append(entry)
                if kind is not None:
                    walk["stopped"] = f"budget met at n={n}"
                    break
        walks[direction] = walk
    if kind is not None:
        key = lambda e: (e["quality_loss"], -(e["decode_speedup"] or 0.0))  # noqa: E731
    else:
        key = lambda e: (-(e["decode_speedup"] or 0.0), e["quality_loss"])  # noqa: E731
    best = min(candidates, key=key) if candidates else None
    ties = []
    if best is not None and kind is not None and quality == "mc":
        # an accuracy edge within noise is no win: of the candidates that the best one does not beat by more
        # than the noise, the fastest is chosen, and the message says which were tied
        ties = [e for e in candidates if e is not best and within_noise(e["row"], best["row"])]
        if ties:
            group = [best] + ties
            best = max(group, key=lambda e: e["decode_speedup"] or 0.0)
            ties = [e for e in group if e is not best]
    message = _selection_message(best, budget, max_quality_loss, quality)
    if ties:
        tied = ", ".join(f"{e['direction']}-{e['num']}" for e in ties)
        message += (f"; the MC accuracies of {tied} and the choice are within two standard errors of their difference, "
                    "so the faster one was chosen")
    return {"budget": budget, "max_quality_loss": max_quality_loss, "quality": quality, "best": best,
            "directions": walks, "evaluated": len(visited), "tied_within_noise": [f"{e['direction']}-{e['num']}"
                                                                                 for e in ties], "message": message}


def _fmt_loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{100 * loss:+.1f}%"


def _selection_message(best: Mapping[str, Any] | None, budget: str | None, max_loss: float | None,
                       quality: str) -> str:
    cond = " and ".join(x for x in (f"budget {budget}" if budget else "",
                                    f"{quality} loss <= {100 * max_loss:g}%" if max_loss is not None else "") if x)
    if best is None:
        return f"no configuration of the sweep meets {cond or 'the request'}"
    r = best["row"]
    return (f"best under {cond or 'no constraint'}: {best['direction']} drop {best['num']} "
            f"(attention {r.get('drop_attn')}, MLP {r.get('drop_mlp')}): {quality} loss {_fmt_loss(best['quality_loss'])}"
            + (f" ± {100 * best['quality_loss_stderr']:.1f}% (one standard error)"
               if best.get("quality_loss_stderr") is not None else "")
            + f", decode speedup {fmt_or_na(r.get('decode_speedup'), '.3f')}x, params {fmt_or_na(r.get('param_ratio'), '.3f')}, "
            f"KV {fmt_or_na(r.get('kv_ratio'), '.3f')} of base")


def fmt_or_na(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def derive(row: dict[str, Any], base: Mapping[str, Any]) -> None:
    """Relative quality and SDR vs the baseline row (gamma = dAvg% / dSpeedup%, lower is better).

    The speedup is the total one (prefill + decode time), as the paper times both phases and as
    `lightning-drop speed` reports SDR; every cached point has it, so no cache entry changes.
    """
    row["ppl_loss"] = quality_loss(row, base, "perplexity")
    row["mc_loss"] = quality_loss(row, base, "mc")
    for key in [k for k in row if k == "mc_acc" or k.startswith("mc_acc[")]:  # each task: the change vs base
        suffix = key[len("mc_acc"):]
        if row[key] is not None and base.get(key) is not None and row is not base:
            row[f"mc_diff{suffix}"] = row[key] - base[key]
            row[f"mc_diff_stderr{suffix}"] = diff_stderr(row, base, suffix[1:-1] or None)
    sp = row.get("total_speedup")
    row["sdr"] = None
    # the same ratio on perplexity (dPPL% / dSpeedup%): meaningful even when a small MC sample is at chance
    row["sdr_ppl"] = (100 * row["ppl_loss"]) / (100 * (sp - 1.0)) \
        if row["num"] > 0 and row.get("ppl_loss") is not None and sp is not None and abs(sp - 1.0) > 1e-9 else None
    if row.get("mc_acc") is not None and base.get("mc_acc") and sp is not None and abs(sp - 1.0) > 1e-9 \
            and row["num"] > 0:
        from ...measure.speed import sdr

        row["sdr"] = sdr(base["mc_acc"], row["mc_acc"], sp)

