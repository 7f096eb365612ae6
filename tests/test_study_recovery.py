"""The study's recovery comparison on a tiny model: disjoint training text, rows, controls, heal-between-rounds,
cache reuse, report, and config errors."""

from __future__ import annotations

import pytest
import torch

from lightning_drop.errors import UserError
from lightning_drop.jobs.study import Study, StudyConfig
from lightning_drop.jobs.study.recovery import RecoveryRunner

torch.set_num_threads(1)


def config(out, c4, **over) -> dict:
    cfg = {
        "name": "tiny-recovery", "model": "tiny-llama", "output": str(out),
        "calibration": {"source": str(c4), "num_samples": 2, "seq_len": 32},
        "eval": {"perplexity": {"num_windows": 2, "seq_len": 32}, "mc": None, "domains": ["wiki-sample"]},
        "speed": {"enabled": False},
        "sweeps": [{"name": "main", "targets": ["attn"], "nums": [0, 1, 2]}],
        "recovery": {
            "points": [{"target": "attn", "num": 2}, {"target": "attn", "num": 1, "recipes": ["lora-lm"]}],
            "train": {"seq_len": 32, "batch_size": 2, "steps": 4, "eval_every": 2}, "save": True,
            "recipes": [
                {"name": "lora-lm", "lr": 1e-2, "distillation": {"alpha": 0.0, "trainable": "lora", "r": 2},
                 "control": True},
                {"name": "full-kd", "lr": 1e-3, "distillation": {"alpha": 1.0, "trainable": "all"}},
                {"name": "heal-rounds", "lr": 1e-3, "rounds": 2,
                 "distillation": {"alpha": 0.5, "trainable": "lora", "r": 2}},
            ],
        },
    }
    cfg.update(over)
    return cfg


def test_training_windows_never_share_a_document_with_held_out_or_calibration_text(tmp_path, c4_path):
    study = Study(StudyConfig.from_dict(config(tmp_path / "o", c4_path)), verbose=False)
    runner = RecoveryRunner(study.inputs, study.cache, study.keys, study.points, study.drops, study.out)
    docs = study.inputs.docs(str(c4_path), "text")
    first = study.points.heldout_end_document()
    assert 0 < first < len(docs) and runner.train_documents() == docs[first:]
    tok = study.inputs.tokenizer
    # the documents before `first` cover every calibration and held-out token
    covered = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs[:first])
    assert covered >= study.points.heldout_offset_tokens() + study.points.heldout_windows().numel()
    # and no 16-token span of a training window occurs in the held-out windows
    held = study.points.heldout_windows().tolist()
    spans = {tuple(w[i:i + 16]) for w in held for i in range(len(w) - 15)}
    train = runner.train_windows().tolist()
    assert len(train) == 4 * 2
    assert not any(tuple(w[i:i + 16]) in spans for w in train for i in range(len(w) - 15))


def test_recovery_rows_controls_rounds_cache_and_report(tmp_path, c4_path):
    out = tmp_path / "out"
    cfg = config(out, c4_path)
    doc = Study(StudyConfig.from_dict(cfg), verbose=False).run()
    rows = {(r["point"], r["recipe"]): r for r in doc["recovery"]}
    assert set(rows) == {("attn-2", "none"), ("attn-2", "lora-lm"), ("attn-2", "full-kd"),
                         ("attn-2", "heal-rounds"), ("attn-1", "none"), ("attn-1", "lora-lm"), ("control", "lora-lm")}
    dropped = next(r for r in doc["rows"] if r["num"] == 2)
    base = next(r for r in doc["rows"] if r["num"] == 0)
    none = rows[("attn-2", "none")]
    assert none["perplexity"] == dropped["perplexity"] and none["gap_recovered"] == pytest.approx(0.0)
    for name in ("lora-lm", "full-kd"):
        r = rows[("attn-2", name)]
        assert r["drop_attn"] == dropped["drop_attn"] and r["tokens"] == 4 * 2 * 32
        assert r["perplexity"] != dropped["perplexity"]  # it trained
        gap = (dropped["perplexity"] - r["perplexity"]) / (dropped["perplexity"] - base["perplexity"])
        assert r["gap_recovered"] == pytest.approx(gap)
        assert r["perplexity[wiki-sample]"] > 0 and "gap_recovered[wiki-sample]" in r
        # the curve: step 0 (the dropped model), every 2 steps, the end (the final, merged model)
        assert [p["step"] for p in r["curve"]] == [0, 2, 4]
        assert r["curve"][0]["perplexity"] == pytest.approx(dropped["perplexity"], rel=1e-4)
        assert r["curve"][-1]["perplexity"] == r["perplexity"]
    control = rows[("control", "lora-lm")]
    assert control["drop_attn"] == [] and control["curve"][0]["perplexity"] == pytest.approx(base["perplexity"],
                                                                                              rel=1e-4)
    assert "ppl_change_vs_base" in control
    lm = rows[("attn-2", "lora-lm")]
    vs = (dropped["perplexity"] - lm["perplexity"]) / (dropped["perplexity"] - control["perplexity"])
    assert lm["gap_recovered_vs_control"] == pytest.approx(vs)
    # heal between rounds: the fit dropped 2 attention layers itself, one per round
    heal = rows[("attn-2", "heal-rounds")]
    assert len(heal["drop_attn"]) == 2 and heal["drop_mlp"] == []
    assert doc["computed_this_run"]["recovery"] == 5
    report = (out / "report.md").read_text()
    assert "## Recovery" in report and "heal-rounds" in report and (out / "figures" / "recovery.png").is_file()
    # a re-run trains nothing
    # the recovered models are dropped checkpoints that load and hold what was measured
    from lightning_drop.measure.evaluation import perplexity
    from lightning_drop.io.model_loading import load_model

    assert rows[("control", "lora-lm")]["checkpoint"] is None
    model, _ = load_model(rows[("attn-2", "full-kd")]["checkpoint"])
    study = Study(StudyConfig.from_dict(cfg), verbose=False)
    assert perplexity(model, study.points.heldout_windows(), batch_size=2) == pytest.approx(
        rows[("attn-2", "full-kd")]["perplexity"], rel=1e-4)
    again = Study(StudyConfig.from_dict(cfg), verbose=False).run()
    assert again["computed_this_run"]["recovery"] == 0 and again["reused_this_run"]["recovery"] == 5
    assert again["recovery"] == doc["recovery"]


@pytest.mark.parametrize("recovery, message", [
    ({"recipes": []}, "recovery.recipes: give at least one recipe"),
    ({"recipes": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
    ({"recipes": [{"name": "a", "distillation": {"alpha": 2}}]}, "alpha must be in [0, 1]"),
    ({"recipes": [{"name": "a", "distillation": {"temperature": 0}}]}, "temperature must be > 0"),
    ({"recipes": [{"name": "a", "distillation": {"trainable": "layers", "layers": []}}]}, "empty trainable set"),
    ({"recipes": [{"name": "a", "distillation": {"teacher": "x"}}]}, "set by the study"),
    ({"recipes": [{"name": "a", "distillation": {"nope": 1}}]}, "unexpected keyword argument 'nope'"),
    ({"recipes": [{"name": "a", "control": True, "distillation": {"trainable": "layers", "layers": "near_drops"}}]},
     "no layers near drops"),
    ({"recipes": [{"name": "a"}], "points": [{"target": "attn", "num": 2, "sweep": "x"}]}, "no sweep named 'x'"),
    ({"recipes": [{"name": "a", "rounds": 9}], "train": {"steps": 4}}, "9 rounds need at least as many"),
    ({"recipes": [{"name": "a"}], "points": [{"target": "attn", "num": 2, "recipes": ["b"]}]},
     "no recipe named ['b']"),
])
def test_bad_recovery_configs_are_one_line_errors(tmp_path, c4_path, recovery, message):
    cfg = config(tmp_path / "o", c4_path, recovery=recovery)
    with pytest.raises(UserError) as err:
        StudyConfig.from_dict(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_training_on_a_held_out_domain_is_refused(tmp_path, c4_path):
    cfg = config(tmp_path / "o", c4_path)
    cfg["calibration"]["source"] = "wiki-sample"
    cfg["eval"]["domains"] = ["wiki-sample"]
    with pytest.raises(UserError, match="wiki-sample is also in eval.domains"):
        StudyConfig.from_dict(cfg)


def test_too_little_training_text_is_refused_before_training(tmp_path, c4_path):
    cfg = config(tmp_path / "o", c4_path)
    cfg["recovery"]["train"]["steps"] = 100_000
    with pytest.raises(UserError, match="need 200000 windows"):
        Study(StudyConfig.from_dict(cfg), verbose=False).run()
