"""Token-mixer importance per mixer kind in a study of a hybrid model (full, sliding and linear attention,
Mamba, convolution): every score set aggregated over the layers of each kind (`importance_by_kind`, as `drop`
reports it), and the kinds each drop of the study fell on. Absent for a model whose every token mixer is full
attention."""

from __future__ import annotations

from typing import Any, Mapping

from .figures import LABELS, main_sweep


def _drop_name(r: Mapping[str, Any], main: str) -> str:
    return f"{r['target']}-{r['num']}" + ("" if r["sweep"] == main else f" [{r['sweep']}]")


def kinds_summary(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """{"scores": {score-set label: {kind: layers, mean, min, dropped}}, "drops": {"attn-2": {kind: layers}}}
    for the results JSON; None where no score set names mixer kinds."""
    from ...scoring.importance import importance_by_kind

    scores = {label: importance_by_kind(s) for label, s in doc["scores"].items()}
    scores = {label: by_kind for label, by_kind in scores.items() if by_kind}
    if not scores:
        return None
    label = next(iter(scores))
    main = main_sweep(doc)
    order = list(LABELS)
    rows = sorted((r for r in doc["rows"] if r["num"] > 0 and r.get("drop_attn")),
                  key=lambda r: (r["sweep"] != main, r["sweep"], order.index(r["target"]) if r["target"] in order
                                 else 9, r["num"]))
    drops = {_drop_name(r, main): {kind: e["dropped"] for kind, e in
                                   importance_by_kind(doc["scores"][label], r["drop_attn"]).items()} for r in rows}
    return {"scores": scores, "drops": drops}


KINDS_TITLE = "Importance per mixer kind"
KINDS_CAPTION = ("Token-mixer (attention-row) scores of each score set aggregated over the layers of each mixer "
                 "kind: the mean and the lowest (lower = more redundant), then, for each drop of the study that "
                 "removed token mixers, how many of each kind it dropped (their layers in brackets).")


def kinds_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the report's per-kind table: a column per kind, a row per statistic and per drop."""
    scores = summary["scores"]
    kinds = list(dict.fromkeys(k for by_kind in scores.values() for k in by_kind))
    first = next(iter(scores.values()))
    rows = [["layers"] + [str(len(first[k]["layers"])) if k in first else "-" for k in kinds]]
    for label, by_kind in scores.items():
        suffix = f" [{label}]" if len(scores) > 1 else ""
        for stat, name in (("mean", "mean score"), ("min", "lowest score")):
            rows.append([name + suffix] + ["-" if k not in by_kind or by_kind[k][stat] is None
                                           else f"{by_kind[k][stat]:.4f}" for k in kinds])
    for name, by_kind in summary["drops"].items():
        rows.append([f"{name} drops"] + [f"{len(by_kind.get(k, []))} ({','.join(map(str, by_kind.get(k, [])))})"
                                         if by_kind.get(k) else "0" for k in kinds])
    return [""] + kinds, rows
