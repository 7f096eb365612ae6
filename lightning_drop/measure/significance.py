"""Whether two accuracies differ beyond sampling noise, using that they were measured on the same questions.

Two models scored on the same multiple-choice questions are paired: most questions are answered alike by
both, so the standard error of the difference of their accuracies is far smaller than the two standard errors
combined, which assume independent samples. With each question's correctness kept (a string of '0'/'1' in
question order), the paired standard error is exact; without it, the independent one is the fallback.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

Z = 2.0  # a difference counts when it exceeds Z standard errors of the difference (about 95%, two-sided)


def correctness(samples: Iterable[Mapping[str, Any]], metric: str) -> str | None:
    """'0'/'1' per question in document order, from lm-eval's logged samples of one task; None when the
    metric is not a 0/1 score per question (an F1, a perplexity)."""
    values = [s.get(metric) for s in sorted(samples, key=lambda s: s["doc_id"])]
    if not values or any(v not in (0, 1) for v in values):
        return None
    return "".join(str(int(v)) for v in values)


def paired_stderr(a: str, b: str, ratio: float = 1.0) -> float:
    """Standard error of mean(a_i - ratio * b_i) over the same questions (sample variance, n - 1, as lm-eval)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired correctness needs two equal lengths >= 2, got {len(a)} and {len(b)}")
    d = [int(x) - ratio * int(y) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))


def _paired(a: Mapping[str, Any], b: Mapping[str, Any], suffix: str) -> tuple[str, str] | None:
    ca, cb = a.get(f"mc_correct{suffix}"), b.get(f"mc_correct{suffix}")
    return (ca, cb) if isinstance(ca, str) and isinstance(cb, str) and len(ca) == len(cb) >= 2 else None


def diff_stderr(a: Mapping[str, Any], b: Mapping[str, Any], task: str | None = None) -> float | None:
    """Standard error of `a`'s accuracy minus `b`'s (rows with `mc_acc`, `mc_stderr`, `mc_correct`, or their
    `[task]` forms): paired when both kept each question's correctness, else the independent one."""
    suffix = f"[{task}]" if task else ""
    pair = _paired(a, b, suffix)
    if pair:
        return paired_stderr(*pair)
    ea, eb = a.get(f"mc_stderr{suffix}"), b.get(f"mc_stderr{suffix}")
    return None if ea is None or eb is None else math.hypot(ea, eb)


def relative_loss_stderr(row: Mapping[str, Any], base: Mapping[str, Any], task: str | None = None) -> float | None:
    """Standard error of the relative loss 1 - acc/acc0 (delta method; paired when both rows kept correctness)."""
    suffix = f"[{task}]" if task else ""
    a, a0 = row.get(f"mc_acc{suffix}"), base.get(f"mc_acc{suffix}")
    if a is None or not a0:
        return None
    pair = _paired(row, base, suffix)
    if pair:  # 1 - a/a0 varies as (a - (a/a0) a0) / a0: one paired mean
        return paired_stderr(*pair, ratio=a / a0) / a0
    e, e0 = row.get(f"mc_stderr{suffix}"), base.get(f"mc_stderr{suffix}")
    return None if e is None or e0 is None else math.hypot(e / a0, a * e0 / a0 ** 2)


def within_noise(a: Mapping[str, Any], b: Mapping[str, Any], z: float = Z, task: str | None = None) -> bool:
    """Whether two rows' accuracies differ by less than `z` standard errors of their difference (False when
    either has no accuracy or no error: nothing can be said to tie)."""
    suffix = f"[{task}]" if task else ""
    se = diff_stderr(a, b, task)
    if a.get(f"mc_acc{suffix}") is None or b.get(f"mc_acc{suffix}") is None or se is None:
        return False
    return abs(a[f"mc_acc{suffix}"] - b[f"mc_acc{suffix}"]) <= z * se
