"""`lightning-drop study`: sweep, cache/resume, report, automated selection, config errors (tiny model)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest
import yaml

from lightning_drop.jobs.study import (PointEvaluator, Study, StudyConfig, auto_select, format_table, load_config,
                                       parse_budget, study_main)

REPO = Path(__file__).resolve().parents[1]


def tiny_config(out: Path, c4: Path, **over) -> dict:
    cfg = {
        "name": "tiny", "model": "tiny-llama", "output": str(out),
        "calibration": {"source": str(c4), "num_samples": 2, "seq_len": 32},
        "eval": {"perplexity": {"num_windows": 1, "seq_len": 32}, "mc": None},
        "speed": {"prompt_len": 4, "gen_len": 2, "repeats": 1, "warmup": 0},
        "sweeps": [{"name": "main", "targets": ["attn", "mlp"], "nums": [0, 1, 2]}],
    }
    cfg.update(over)
    return cfg


def run(cfg: dict, **kw):
    study = Study(StudyConfig.from_dict(cfg), verbose=False)
    return study, study.run(**kw)


def test_sweep_writes_everything_and_rerun_recomputes_nothing(tmp_path, c4_path, shared_dir):
    out = tmp_path / "out"
    cfg = tiny_config(out, c4_path, checkpoint={"target": "attn", "num": 2},
                      eval={"perplexity": {"num_windows": 1, "seq_len": 32},
                            "mc": {"data": str(shared_dir / "data" / "hellaswag_val_first1000.jsonl"), "limit": 2,
                                   "batch_size": 2}})
    cfg["sweeps"][0]["nums_per_target"] = {"joint": [2]}
    _, doc = run(cfg)
    # one scoring pass serves every one-shot target and num
    assert doc["computed_this_run"]["scores"] == 1
    labels = {(r["target"], r["num"]) for r in doc["rows"]}
    assert {("attn", 1), ("attn", 2), ("mlp", 1), ("mlp", 2), ("joint", 2), ("baseline", 0)} <= labels
    for name in ("results.json", "results.csv", "report.html", "report.md", "figures/importance.png",
                 "figures/quality_vs_num.png", "figures/quality_vs_speedup.png", "figures/drop_order.png"):
        assert (out / name).is_file(), name
    rows = {(r["target"], r["num"]): r for r in doc["rows"]}
    assert rows[("attn", 2)]["kv_ratio"] == pytest.approx(0.5)
    assert rows[("mlp", 2)]["kv_ratio"] == pytest.approx(1.0)
    assert rows[("baseline", 0)]["mc_acc"] is not None and rows[("baseline", 0)]["mc_n"] == 2
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "attn-2" in html and "baseline" in html
    assert "total speedup" in html and "SDR (ppl, total)" in html  # SDR is on the total speedup, and says so
    assert rows[("attn", 2)]["sdr_ppl"] == pytest.approx(rows[("attn", 2)]["ppl_loss"]
                                                       / (rows[("attn", 2)]["total_speedup"] - 1))
    png = html.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(png)[:4] == b"\x89PNG"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("sweep,target,num") and len(csv_lines) == len(doc["rows"]) + 1
    # the checkpoint loads and is dropped as recorded
    from lightning_drop.core.modeling_dropped import dropped_layers
    from lightning_drop.io.model_loading import load_model

    model, _ = load_model(doc["checkpoint"]["path"])
    assert dropped_layers(model)[0] == rows[("attn", 2)]["drop_attn"]

    cache_files = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")}
    study, doc2 = run(cfg)
    assert doc2["computed_this_run"] == {"scores": 0, "drops": 0, "points": 0}
    assert not study.inputs.loaded  # a fully cached re-run never even loads the model
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")} == cache_files
    assert [r["perplexity"] for r in doc2["rows"]] == [r["perplexity"] for r in doc["rows"]]


def test_hybrid_study_reports_importance_per_mixer_kind(tmp_path, c4_path):
    """A tiny Qwen3-Next (linear attention in three layers, full attention in the fourth): the per-kind section's
    numbers are the per-layer token-mixer scores aggregated over each kind, its drops the rows' attention drops
    sorted by kind, in the results JSON and the report."""
    out = tmp_path / "out"
    cfg = tiny_config(out, c4_path, model="tiny-qwen3_next", speed={"enabled": False})
    cfg["sweeps"][0]["targets"] = ["attn", "block"]
    _, doc = run(cfg)
    summary = doc["importance_by_kind"]
    (label, scores), = doc["scores"].items()
    kinds = scores["extra"]["mixer_kinds"]
    assert set(summary["scores"][label]) == set(kinds) == {"linear_attention", "full_attention"}
    md = (out / "report.md").read_text()
    assert "## Importance per mixer kind" in md
    for kind, entry in summary["scores"][label].items():
        values = [v for v, k in zip(scores["attn"], kinds) if k == kind]
        assert entry["layers"] == [i for i, k in enumerate(kinds) if k == kind]
        assert entry["mean"] == pytest.approx(sum(values) / len(values)) and entry["min"] == min(values)
        assert f"{entry['mean']:.4f}" in md and f"{entry['min']:.4f}" in md
    dropping = [r for r in doc["rows"] if r["num"] > 0 and r["drop_attn"]]
    assert {f"{r['target']}-{r['num']}" for r in dropping} == set(summary["drops"]) == {"attn-1", "attn-2", "block-1",
                                                                                         "block-2"}
    for r in dropping:
        by_kind = summary["drops"][f"{r['target']}-{r['num']}"]
        assert sorted(i for layers in by_kind.values() for i in layers) == r["drop_attn"]
        assert all(kinds[i] == kind for kind, layers in by_kind.items() for i in layers)
        assert f"| {r['target']}-{r['num']} drops |" in md
    assert json.loads((out / "results.json").read_text())["importance_by_kind"] == summary
    assert "Importance per mixer kind" in (out / "report.html").read_text()


def test_extended_sweep_computes_only_new_points(tmp_path, c4_path):
    cfg = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    _, doc = run(cfg)
    assert doc["computed_this_run"]["points"] == 5  # baseline + 2 targets x 2 nums
    cfg["sweeps"][0]["nums"] = [0, 1, 2, 3]
    cfg["sweeps"][0]["targets"] = ["attn", "mlp", "block"]
    _, doc = run(cfg)
    assert doc["computed_this_run"]["scores"] == 0
    # new: attn-3, mlp-3, block-1, block-2, block-3 (distinct drop sets)
    assert doc["computed_this_run"]["points"] == 5
    assert doc["reused_this_run"]["points"] >= 5


def test_interrupted_sweep_resumes(tmp_path, c4_path, monkeypatch):
    cfg = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    calls = {"n": 0}
    original = PointEvaluator.evaluate

    def flaky(self, attn, mlp):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, attn, mlp)

    monkeypatch.setattr(PointEvaluator, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert len(list((tmp_path / "cache").glob("points-*.json"))) == 3
    assert not list((tmp_path / "cache").glob(".*tmp"))  # nothing half-written
    monkeypatch.setattr(PointEvaluator, "evaluate", original)
    _, doc = run(cfg)
    assert doc["computed_this_run"]["points"] == 2 and doc["computed_this_run"]["scores"] == 0


def test_iterative_rescoring_and_ablation_axes(tmp_path, c4_path):
    cfg = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    cfg["sweeps"] = [{"name": "main", "targets": ["attn"], "nums": [0, 2]},
                     {"name": "iter", "targets": ["attn"], "nums": [1, 2], "schedule": "iterative"},
                     {"name": "nores", "targets": ["mlp"], "nums": [1], "metric": "cosine_no_residual"},
                     {"name": "wiki", "targets": ["attn"], "nums": [1], "calibration": {"num_samples": 3}}]
    _, doc = run(cfg)
    assert doc["computed_this_run"]["scores"] == 3  # cosine x2 calibrations, no-residual; iterative re-scores apart
    assert doc["computed_this_run"]["drops"] == 1  # one iterative direction, extended to 2 in one walk
    it = [r for r in doc["rows"] if r["sweep"] == "iter"]
    assert [len(r["drop_attn"]) for r in it] == [1, 2] and it[0]["drop_attn"][0] in it[1]["drop_attn"]
    assert len(doc["scores"]) == 3
    cfg["sweeps"][1]["nums"] = [1, 2, 3]
    _, doc = run(cfg)
    assert doc["computed_this_run"] == {"scores": 0, "drops": 1, "points": 1}


def test_budget_selection_on_synthetic_table():
    table = {  # direction -> n -> (perplexity, decode speedup, param ratio, kv ratio)
        "attn": {2: (10.5, 1.05, .95, .9), 4: (11.0, 1.12, .9, .8), 8: (12.0, 1.25, .8, .6), 12: (20.0, 1.4, .7, .4)},
        "mlp": {2: (12.0, 1.02, .85, 1), 4: (30.0, 1.05, .7, 1), 8: (90.0, 1.1, .4, 1)},
        "block": {2: (13.0, 1.1, .8, .9), 4: (40.0, 1.2, .6, .8), 8: (300.0, 1.45, .3, .6)},
    }
    asked = []

    def evaluate(d, n):
        asked.append((d, n))
        p, s, pr, kv = table[d][n]
        return {"perplexity": p, "decode_speedup": s, "param_ratio": pr, "kv_ratio": kv}

    base = {"perplexity": 10.0}
    dirs = {d: [0] + list(v) for d, v in table.items()}
    res = auto_select(dirs, evaluate, base, budget="speedup=1.2", max_quality_loss=0.3)
    assert (res["best"]["direction"], res["best"]["num"]) == ("attn", 8)
    # mlp stops at n=4 (loss 200% > 30%), block at n=4; attn stops once the budget is met at n=8
    assert ("mlp", 8) not in asked and ("block", 8) not in asked and ("attn", 12) not in asked
    assert "quality floor" in res["directions"]["mlp"]["stopped"]
    res = auto_select(dirs, evaluate, base, budget="params=0.8", max_quality_loss=0.35)
    assert (res["best"]["direction"], res["best"]["num"]) == ("attn", 8)  # 20% loss beats block-2's 30%
    res = auto_select(dirs, evaluate, base, budget="kv=0.5", max_quality_loss=0.5)
    assert res["best"] is None and "no configuration" in res["message"]
    res = auto_select(dirs, evaluate, base, budget=None, max_quality_loss=0.25)
    assert (res["best"]["direction"], res["best"]["num"]) == ("attn", 8)  # fastest within the floor


@pytest.mark.parametrize("text", ["speedup", "speed=1.2", "speedup=abc", "speedup=0.9", "kv=1.5"])
def test_bad_budgets(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


@pytest.mark.parametrize("patch, message", [
    ({"sweeps": [{"targets": ["attention"]}]}, r"sweeps\[0\] \(main\): unknown target 'attention'"),
    ({"sweeps": [{"metric": "cos"}]}, r"unknown metric 'cos'"),
    ({"sweeps": [{"nums": [0, -2]}]}, r"must be >= 0"),
    ({"sweeps": [{"nums": ["four"]}]}, r"sweeps\[0\]\.nums\[0\]: expected an integer"),
    ({"calibration": {"num_samples": 0}}, r"calibration\.num_samples must be >= 1"),
    ({"calibration": {"samples": 4}}, r"calibration: unknown key\(s\) \['samples'\]"),
    ({"speed": {"gen_len": 1}}, r"speed\.gen_len must be >= 2"),
    ({"eval": {"mc": {"limit": 0}}}, r"eval\.mc\.limit"),
    ({"checkpoint": {"target": "attn", "num": 2, "sweep": "nope"}}, r"checkpoint\.sweep: no sweep named 'nope'"),
    ({"selection": {"budget": "fast"}}, r"budget 'fast'"),
    ({"speed": {"enabled": "yes"}}, r"speed\.enabled: expected true/false"),
    ({"speed": {"prompt_lens": []}}, r"speed\.prompt_lens: give at least one length"),
    ({"speed": {"prompt_lens": "64,abc"}}, r"speed\.prompt_lens\[1\]: expected an integer, got 'abc'"),
    ({"speed": {"prompt_lens": [0, 64]}}, r"speed\.prompt_lens: lengths must be integers >= 1, got 0"),
    ({"modle": "x"}, r"unknown key\(s\) \['modle'\]"),
    ({"sweeps": [{"calibration": {"num_samples": 0}}]}, r"sweeps\[0\] \(main\)\.calibration\.num_samples must be >= 1"),
    ({"sweeps": [{"calibration": {"samples": 4}}]}, r"sweeps\[0\] \(main\)\.calibration: unknown key\(s\) \['samples'\]"),
    ({"calibration": {"shuffle": True}}, r"calibration\.shuffle: a shuffled calibration may overlap"),
])
def test_bad_configs_error_clearly(tmp_path, patch, message):
    cfg = {"model": "tiny-llama"}
    cfg.update(patch)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_speed_at_several_prompt_lengths_rows_and_figure(tmp_path, c4_path):
    out = tmp_path / "out"
    cfg = tiny_config(out, c4_path, speed={"prompt_len": 4, "prompt_lens": "4,16", "gen_len": 2, "repeats": 1,
                                           "warmup": 0})
    cfg["sweeps"][0].update(targets=["attn", "mlp", "block"], nums=[0, 2], nums_per_target={"attn": [0, 1, 2]})
    _, doc = run(cfg)
    rows = {(r["target"], r["num"]): r for r in doc["rows"]}
    for target, kv in (("attn", 0.5), ("mlp", 1.0), ("block", 0.5)):
        r = rows[(target, 2)]
        by = r["speed_by_length"]
        assert [(p["prompt_len"], p["context_len"]) for p in by] == [(4, 6), (16, 18)]
        assert by[1]["kv_cache_ratio"] == pytest.approx(kv) and by[1]["base_kv_cache_bytes"] > by[0]["base_kv_cache_bytes"]
        # the table's single-length columns are prompt_len's, timed once
        assert (r["decode_speedup"], r["total_speedup"]) == (by[0]["decode_speedup"], by[0]["total_speedup"])
    assert "speed_by_length" not in rows[("baseline", 0)]
    fig = out / "figures" / "speedup_vs_context.png"
    assert fig.stat().st_size > 0 and fig.read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    section = md.split("## Speedup against context length")[1].split("\n## ")[0]
    assert "| attn-2 | 16 | 18 |" in section and "| block-2 | 4 | 6 |" in section and "| attn-1 |" not in section
    assert "also at prompt lengths 4, 16" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 5
    _, again = run(cfg)  # cached: the lengths are part of the point key
    assert again["computed_this_run"]["points"] == 0
    # a study without prompt_lens keeps its point keys (earlier caches stay valid) and gets no such figure
    single = tiny_config(tmp_path / "single", c4_path)
    assert "prompt_lens" not in Study(StudyConfig.from_dict(single), verbose=False).points.eval_key()["speed"]
    # a context beyond the model's positions is refused before any point is computed
    too_long = tiny_config(tmp_path / "long", c4_path, speed={"prompt_lens": [64, 600], "gen_len": 2})
    with pytest.raises(ValueError, match=r"speed\.prompt_lens: prompt 600 \+ 2 generated tokens = 602 exceeds "
                                         r"tiny-llama's max_position_embeddings \(512\)"):
        run(too_long)
    assert not list((tmp_path / "long" / "cache").glob("points-*.json"))


def test_calibration_is_the_libraries_settings_type_with_the_study_defaults():
    from lightning_drop.core.options import CalibrationConfig

    cfg = StudyConfig.from_dict({"model": "m", "calibration": {"source": "wiki-sample", "batch_size": 2},
                                 "sweeps": [{"calibration": {"seq_len": 64}}]})
    assert type(cfg.calibration) is CalibrationConfig
    # a partial mapping overrides the study's small default calibration, not the paper-sized class defaults
    assert (cfg.calibration.source, cfg.calibration.num_samples, cfg.calibration.seq_len) == ("wiki-sample", 16, 512)
    assert cfg.calibration_for(cfg.sweeps[0]) == CalibrationConfig(source="wiki-sample", num_samples=16,
                                                                    seq_len=64, batch_size=2)
    # shuffling is allowed where the held-out perplexity does not follow the calibration windows
    shuffled = StudyConfig.from_dict({"model": "m", "calibration": {"shuffle": True, "seed": 3},
                                      "eval": {"perplexity": {"source": "wiki-sample"}}})
    assert shuffled.calibration.shuffle and shuffled.calibration.seed == 3


def test_cache_keys_are_those_earlier_studies_wrote():
    """An existing study output must resume without recomputing: the keys of its cache files never change
    (these were written by the study before it moved into `jobs/study/`)."""
    cfg = StudyConfig.from_dict({"model": "tiny-llama", "eval": {"mc": None}, "selection": {"sweep": "it"},
                                 "sweeps": [{"name": "it", "targets": ["attn"], "nums": [0, 2], "step": 2,
                                             "schedule": "iterative", "calibration": {"num_samples": 8}}]})
    from lightning_drop.jobs.study import CacheKeys, PointEvaluator, StudyInputs

    keys = CacheKeys(cfg)
    sweep = cfg.sweeps[0]
    calib = cfg.calibration_for(sweep)
    assert keys.scores(calib, "cosine") == "681100b3ff8c19fe"
    assert keys.drops(sweep, calib, "attn") == "1d06909c12845a8a"
    assert PointEvaluator(StudyInputs(cfg), None, keys).point_key([3, 1], [0]) == "032fc487ddf68978"
    # a shuffled calibration selects other windows, so its scores get a key of their own
    import dataclasses

    assert keys.scores(dataclasses.replace(calib, shuffle=True), "cosine") != "681100b3ff8c19fe"


def test_dtype_auto_follows_the_machine_and_keys_the_cache_by_what_it_chose(tmp_path, c4_path, monkeypatch):
    """`dtype: auto` runs in bfloat16 only where the hardware computes it natively; the cache key and the report
    hold the dtype actually used, so an `auto` cache is not reused on a machine that resolves it differently."""
    from lightning_drop.io import model_loading
    from lightning_drop.jobs.study import CacheKeys

    cpuinfo = tmp_path / "cpuinfo"
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real_read(cpuinfo if str(self) == "/proc/cpuinfo"
                                                                            else self, *a, **k))
    monkeypatch.setattr(model_loading.torch.cuda, "is_available", lambda: False)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert model_loading.native_bf16() is None and model_loading.resolve_dtype("auto") == "float32"
    auto = StudyConfig.from_dict(tiny_config(tmp_path / "out", c4_path, dtype="auto"))
    fp32 = StudyConfig.from_dict(tiny_config(tmp_path / "out", c4_path, dtype="float32"))
    assert CacheKeys(auto).model() == CacheKeys(fp32).model()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n")
    assert model_loading.native_bf16() == "CPU flag amx_bf16"
    assert auto.model_dtype == "bfloat16" and CacheKeys(auto).model() != CacheKeys(fp32).model()
    assert model_loading.resolve_dtype("float16") == "float16"
    assert model_loading.resolve_dtype("auto", "cuda") == "float32"  # the CPU's bf16 says nothing of a GPU's

    study = Study(auto, verbose=False)
    doc = study.run()
    assert doc["dtype"] == "bfloat16" and study.inputs.model.dtype == model_loading.torch.bfloat16
    assert "in bfloat16 (auto: this machine has native bf16, CPU flag amx_bf16)" in \
        (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="dtype: choose from auto, float32"):
        StudyConfig.from_dict(tiny_config(tmp_path / "out", c4_path, dtype="bf16"))


def test_missing_model_and_file_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['model'\]"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="study config not found"):
        load_config(tmp_path / "nope.yaml")
    from lightning_drop.cli import main

    assert main(["study", "--config", str(path)]) == 2
    assert "lightning-drop study: error:" in capsys.readouterr().err
    path.write_text("model: tiny-llama\n")
    with pytest.raises(ValueError, match="--max-quality-loss"):
        study_main(str(path), output=str(tmp_path / "o"), max_quality_loss=-1)


def test_mc_data_missing_is_optional_with_a_note(tmp_path, c4_path, capsys):
    cfg = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    cfg["eval"]["mc"] = {"data": str(tmp_path / "absent.jsonl")}
    cfg["sweeps"][0].update(targets=["attn"], nums=[0])
    _, doc = run(cfg)
    assert doc["rows"][0].get("mc_acc") is None
    assert any("multiple-choice data file not found" in n for n in doc["notes"])
    cfg["eval"]["mc"]["required"] = True
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        run(cfg)


def test_heldout_windows_follow_calibration(tmp_path, c4_path):
    cfg = tiny_config(tmp_path, c4_path)
    study = Study(StudyConfig.from_dict(cfg), verbose=False)
    calib = study.inputs.calibration_batches(study.cfg.calibration)
    held = study.points.heldout_windows()
    from lightning_drop.io.text_data import make_windows

    stream = make_windows(study.inputs.tokenizer, study.inputs.docs(str(c4_path), "text"), 32, 3)
    assert calib[0].tolist() == stream[:2].tolist()
    assert held.tolist() == stream[2:3].tolist()  # the window right after calibration, no overlap


def test_cli_study_with_budget_prints_table_and_selection(tmp_path, c4_path, capsys):
    from lightning_drop.cli import main

    cfg = tiny_config(tmp_path / "out", c4_path)
    cfg["sweeps"][0]["nums"] = [0, 1, 2, 3]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["study", "--config", str(path), "--budget", "kv=0.6", "--max-quality-loss", "100"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "attn-2" in out and "report:" in out
    sel = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert sel["best"]["direction"] == "attn" and sel["best"]["num"] == 2
    assert sel["best"]["kv_ratio"] == pytest.approx(0.5)
    # the search stopped the attention direction once the budget was met: attn-3 was never computed
    assert sel["directions"]["attn"]["visited"] == [1, 2] and "attn-3" not in out
    assert sel["directions"]["mlp"]["visited"] == [1, 2, 3]


def test_format_table_shape():
    rows = [{"sweep": "main", "target": "baseline", "num": 0, "perplexity": 10.0, "params": 1e6},
            {"sweep": "main", "target": "attn", "num": 4, "perplexity": 11.0, "decode_speedup": 1.2,
             "kv_ratio": .5, "params": 9e5, "mc_acc": 0.4, "sdr": 0.3}]
    text = format_table(rows)
    assert text.splitlines()[1].startswith("baseline") and "attn-4" in text and "1.200" in text


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "study").glob("*.yaml")))
def test_shipped_study_configs_parse(name):
    cfg = load_config(REPO / "configs" / "study" / name)
    assert cfg.model and cfg.sweeps[0].plan()


@pytest.mark.slow
def test_quickstart_shape_on_smollm2(tmp_path):
    """A cut-down quickstart on the real model: attention drops hurt perplexity far less than MLP drops."""
    cfg = load_config(REPO / "configs" / "study" / "quickstart.yaml")
    cfg = copy.deepcopy(cfg)
    cfg.sweeps[0].targets, cfg.sweeps[0].nums, cfg.sweeps[0].nums_per_target = ["attn", "mlp"], [0, 4], {}
    cfg.calibration.num_samples, cfg.eval.perplexity.num_windows, cfg.eval.mc = 4, 2, None
    cfg.speed.enabled, cfg.checkpoint, cfg.recovery = False, None, None  # recovery: tests/test_study_recovery.py
    doc = Study(cfg, tmp_path, verbose=False).run()
    rows = {(r["target"], r["num"]): r for r in doc["rows"]}
    assert rows[("attn", 4)]["perplexity"] < rows[("mlp", 4)]["perplexity"]


def test_iterative_counts_off_the_step_get_their_sets(tmp_path, c4_path):
    """nums not multiples of `step`: each count is the walk's set below it plus a prefix of the next round."""
    cfg = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    cfg["sweeps"] = [{"name": "main", "targets": ["attn"], "nums": [0, 1, 2, 3], "schedule": "iterative", "step": 2}]
    study, doc = run(cfg)
    rows = {r["num"]: r for r in doc["rows"] if r["sweep"] == "main"}
    sets = {n: rows[n]["drop_attn"] for n in (1, 2, 3)}
    assert [len(sets[n]) for n in (1, 2, 3)] == [1, 2, 3]
    assert set(sets[1]) < set(sets[2]) < set(sets[3])
    drops = json.loads(next((tmp_path / "cache").glob("drops-*.json")).read_text())
    assert [r["at"] for r in drops["rounds"]] == [0, 2]  # two scoring passes: at 0 and after dropping 2
    first, second = drops["rounds"][0], drops["rounds"][1]
    assert sets[2] == sorted(first["drop_attn"]) and len(first["drop_attn"]) == 2
    assert sets[1] == [min(range(4), key=lambda i: first["scores"]["attn"][i])]
    # the third layer comes from the scores of the model with 2 dropped (re-scored: those two are gone)
    assert [second["scores"]["attn"][i] for i in sets[2]] == [None, None]
    extra = set(sets[3]) - set(sets[2])
    live = {i: v for i, v in enumerate(second["scores"]["attn"]) if v is not None}
    assert extra == {min(live, key=live.get)}
    # a set depends only on (step, n): a sweep that asks [3] alone reuses the walk and gets the same set
    cfg2 = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    cfg2["sweeps"] = [{"name": "main", "targets": ["attn"], "nums": [0, 3, 4], "schedule": "iterative", "step": 2}]
    _, doc2 = run(cfg2)
    rows2 = {r["num"]: r for r in doc2["rows"]}
    assert rows2[3]["drop_attn"] == sets[3] and set(sets[3]) < set(rows2[4]["drop_attn"])
    assert doc2["computed_this_run"]["scores"] == 0


def test_sdr_is_on_total_speedup():
    """SDR uses the prefill + decode speedup (as the paper times and `lightning-drop speed` reports)."""
    from lightning_drop.jobs.study import _derive

    base = {"num": 0, "perplexity": 10.0, "mc_acc": 0.5}
    row = {"num": 4, "perplexity": 11.0, "mc_acc": 0.45, "decode_speedup": 1.5, "total_speedup": 1.25}
    _derive(row, base)
    assert row["sdr_ppl"] == pytest.approx(10 / 25) and row["sdr"] == pytest.approx(10 / 25)
    text = format_table([dict(base, sweep="main", target="baseline", params=1e6),
                         dict(row, sweep="main", target="attn", params=9e5)])
    assert "total x" in text.splitlines()[0] and "1.250" in text


def test_drop_order_figure_follows_an_iterative_main_sweep(tmp_path, c4_path, monkeypatch):
    from lightning_drop.jobs.study import figures

    cfg = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    cfg["sweeps"] = [{"name": "main", "targets": ["attn"], "nums": [0, 1, 2], "schedule": "iterative"}]
    _, doc = run(cfg)
    sets = doc["drop_order"]["sets"]["attn"]
    rows = {r["num"]: r for r in doc["rows"]}
    assert sets["1"][0] == rows[1]["drop_attn"] and sets["2"][0] == rows[2]["drop_attn"]
    grid = figures._iterative_grid(sets, "attn", 4)
    assert [i for i in range(4) if grid[1, i] == 1] == rows[2]["drop_attn"]
    assert all(v != v for v in grid[2]) and all(v != v for v in grid[3])  # counts the walk never reached
    figs = []
    monkeypatch.setattr(figures, "save_png", lambda fig, path: figs.append(fig) or path)
    figures.plot_drop_order(doc, tmp_path / "x.png")
    fig = figs[0]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "iterative" in fig._suptitle.get_text() and "one-shot" not in fig._suptitle.get_text()
    assert titles[0].startswith("attention (iterative, step 1)") and f"layer {rows[1]['drop_attn'][0]}" in titles[0]
    assert "one-shot; not in the iterative sweep" in titles[1]  # MLP: not walked, and labelled so


def test_speed_is_retimed_on_another_machine(tmp_path, c4_path, monkeypatch):
    cfg = tiny_config(tmp_path, c4_path)
    cfg["sweeps"][0].update(targets=["attn"], nums=[0, 1])
    _, doc = run(cfg)
    assert doc["computed_this_run"]["points"] == 2 and doc["retimed_this_run"] == 0
    point = next(p for p in (tmp_path / "cache").glob("points-*.json") if json.loads(p.read_text())["drop_attn"])
    here = json.loads(point.read_text())["speed_machine"]
    assert here == Study(StudyConfig.from_dict(cfg), verbose=False).points.machine()
    assert {"node", "cpus", "torch_threads", "device"} <= set(here)
    _, doc = run(cfg)
    assert doc["retimed_this_run"] == 0  # same machine: all reused
    original = PointEvaluator.machine
    monkeypatch.setattr(PointEvaluator, "machine", lambda self: {**original(self), "node": "elsewhere"})
    study, doc = run(cfg)
    assert doc["computed_this_run"]["points"] == 0 and doc["retimed_this_run"] == 1  # quality reused, speed re-timed
    stored = json.loads(point.read_text())
    assert stored["speed_machine"]["node"] == "elsewhere" and stored["total_speedup"] > 0
    _, doc = run(cfg)
    assert doc["retimed_this_run"] == 0
    del stored["speed_machine"]  # a point cached before the machine was recorded: timed once more
    point.write_text(json.dumps(stored))
    _, doc = run(cfg)
    assert doc["retimed_this_run"] == 1 and "speed_machine" in json.loads(point.read_text())
