"""Paired comparisons of accuracies: two points scored on the same questions differ beyond noise or not."""

from __future__ import annotations

import math
import random

import pytest

from lightning_drop.jobs.study.budget import auto_select, derive, loss_stderr
from lightning_drop.jobs.study.figures import pareto_front
from lightning_drop.measure.significance import (
    correctness,
    diff_stderr,
    paired_stderr,
    relative_loss_stderr,
    within_noise,
)


def _row(bits: str, **extra) -> dict:
    n, acc = len(bits), bits.count("1") / len(bits)
    return {"mc_acc": acc, "mc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)), "mc_correct": bits, **extra}


def _flip(bits: str, k: int, to: str) -> str:
    """`bits` with its first k questions not already `to` set to `to`."""
    out, left = list(bits), k
    for i, b in enumerate(out):
        if left and b != to:
            out[i], left = to, left - 1
    return "".join(out)


_RNG = random.Random(0)
BASE = "".join(_RNG.choice("01") for _ in range(400))  # about half the questions right


def test_correctness_in_document_order_and_only_for_0_1_metrics():
    samples = [{"doc_id": 2, "acc_norm": 1.0}, {"doc_id": 0, "acc_norm": 0.0}, {"doc_id": 1, "acc_norm": 1.0}]
    assert correctness(samples, "acc_norm") == "011"
    assert correctness([{"doc_id": 0, "f1": 0.4}], "f1") is None and correctness([], "acc") is None


def test_paired_error_is_the_error_of_the_per_question_differences():
    a, b = "1101", "1001"  # differences 0, 1, 0, 0: mean 0.25, sample variance 0.25
    assert paired_stderr(a, b) == pytest.approx(math.sqrt(0.25 / 4))
    assert paired_stderr(a, a) == 0.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_stderr("10", "101")


def test_a_consistent_loss_of_3_points_is_resolved_paired_but_not_independent():
    """12 of 400 questions lost and none gained: 0.03 of accuracy. Independent errors (0.035 combined) call it
    noise; on the same questions it is 3.5 paired standard errors."""
    base, dropped = _row(BASE), _row(_flip(BASE, 12, "0"))
    assert base["mc_acc"] - dropped["mc_acc"] == pytest.approx(0.03)
    independent = math.hypot(base["mc_stderr"], dropped["mc_stderr"])
    paired = diff_stderr(dropped, base)
    assert paired < independent / 3 and 0.03 > 2 * paired and 0.03 < 2 * independent
    assert not within_noise(dropped, base)
    # rows without each question's correctness (an older cache) fall back to independent errors
    old = {k: v for k, v in dropped.items() if k != "mc_correct"}
    assert diff_stderr(old, base) == pytest.approx(independent) and within_noise(old, base)
    # 12 lost and 12 other questions gained: the same accuracy, a tie
    churn = _row(_flip(_flip(BASE, 12, "0")[::-1], 12, "1")[::-1])
    assert within_noise(churn, base)


def test_relative_loss_error_matches_the_delta_method_and_derive_fills_paired_changes():
    base, dropped = _row(BASE), _row(_flip(BASE, 20, "0"))
    se = relative_loss_stderr(dropped, base)
    # by simulation: resample questions, recompute 1 - a/a0 on the same resampled questions
    rng, losses, n = random.Random(1), [], len(BASE)
    for _ in range(2000):
        idx = [rng.randrange(n) for _ in range(n)]
        a0 = sum(int(BASE[i]) for i in idx)
        losses.append(1 - sum(int(dropped["mc_correct"][i]) for i in idx) / a0)
    mean = sum(losses) / len(losses)
    boot = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
    assert se == pytest.approx(boot, rel=0.15)
    assert loss_stderr(dropped, base, "mc") == se and loss_stderr(dropped, base, "perplexity") is None
    row = {**dropped, "num": 4, "mc_acc[t]": dropped["mc_acc"], "mc_stderr[t]": dropped["mc_stderr"],
           "mc_correct[t]": dropped["mc_correct"]}
    base_row = {**base, "num": 0, "mc_acc[t]": base["mc_acc"], "mc_stderr[t]": base["mc_stderr"],
                "mc_correct[t]": base["mc_correct"]}
    derive(row, base_row)
    assert row["mc_diff"] == pytest.approx(-0.05) and row["mc_diff_stderr"] == pytest.approx(
        paired_stderr(dropped["mc_correct"], BASE))
    assert row["mc_diff_stderr[t]"] == row["mc_diff_stderr"]


def test_pareto_and_budget_use_the_paired_error():
    base = _row(BASE)
    slow, fast = _row(_flip(BASE, 4, "0")), _row(_flip(BASE, 16, "0"))  # 0.01 and 0.04 below the base
    rows = [slow, fast]
    pts = [(1.1, -slow["mc_acc"], slow["mc_stderr"]), (1.3, -fast["mc_acc"], fast["mc_stderr"])]
    assert pareto_front(pts) == [(1.3, -fast["mc_acc"])]  # independent errors: the slower one's edge is noise
    paired = pareto_front(pts, diff_se=lambda i, j: diff_stderr(rows[i], rows[j]))
    assert paired == sorted([(1.1, -slow["mc_acc"]), (1.3, -fast["mc_acc"])])
    slow["decode_speedup"], fast["decode_speedup"] = 1.1, 1.3
    res = auto_select({"attn": [4], "mlp": [4]}, lambda t, n: {"attn": slow, "mlp": fast}[t], base,
                      budget="speedup=1.05", quality="mc")
    assert res["best"]["direction"] == "attn" and res["tied_within_noise"] == []
