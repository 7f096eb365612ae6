"""`configs/study/methods.yaml` shrunk to a tiny model and run end to end through the command line: every rule of
the config reaches the rules table, ranked per target and count with accuracy standard errors (paired against
the rank-1 rule) and the selection cost of every rule; healed rows come from the same token budget."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from lightning_drop.cli import main
from lightning_drop.jobs.study.rules_report import rules_table

REPO = Path(__file__).resolve().parents[1]
METHODS = REPO / "configs" / "study" / "methods.yaml"


def shrunk(out: Path, c4: Path, shared: Path) -> dict:
    cfg = yaml.safe_load(METHODS.read_text())
    cfg = copy.deepcopy(cfg)
    cfg.update(model="tiny-llama", output=str(out))
    cfg["calibration"] = {"source": str(c4), "num_samples": 2, "seq_len": 32}
    cfg["eval"]["perplexity"].update(num_windows=1, seq_len=32)
    cfg["eval"]["mc"].update(data=str(shared / "data" / "hellaswag_val_first1000.jsonl"), limit=4, batch_size=4)
    cfg["speed"] = {"enabled": False}  # timed in tests/test_study.py; here the rules, errors and costs
    sweeps = cfg["sweeps"]
    for s in sweeps:  # a 4-layer model: 1 or 2 of each kind, spans of 2
        if "nums_per_target" in s:
            s["nums_per_target"] = {"attn": [2], "mlp": [1], "block": [2]}
        if "span" in s:
            s["nums"] = [2]
    cfg["sweeps"] = sweeps
    names = {s["name"] for s in sweeps}
    rec = cfg["recovery"]
    rec["train"].update(seq_len=32, batch_size=2, steps=2)
    rec["points"] = [dict(p, num=2) for p in rec["points"] if p["sweep"] in names][:3]
    rec["recipes"] = [dict(r, lr=1e-2) for r in rec["recipes"]]
    for r in rec["recipes"]:
        if r["distillation"].get("trainable") == "last_layers":
            r["distillation"]["last_k"] = 1
    return cfg


def test_methods_config_names_every_rule():
    from lightning_drop.jobs.study import load_config

    loaded = load_config(METHODS)
    assert {s.rule for s in loaded.sweeps} == {"cosine", "relative-magnitude", "angular-span", "loss-greedy",
                                               "reverse", "random"}
    assert {s.seed for s in loaded.sweeps if s.rule == "random"} == {0, 1, 2}
    assert loaded.eval.mc[0].limit >= 400 and loaded.eval.domains == ["wiki-sample"]


def test_shrunk_methods_study_ranks_every_rule_with_errors_and_costs(tmp_path, c4_path, shared_dir):
    out = tmp_path / "methods"
    cfg = shrunk(out, c4_path, shared_dir)
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["study", "--config", str(path)]) == 0
    doc = json.loads((out / "results.json").read_text())
    rules = {s.get("rule") or s["name"] for s in cfg["sweeps"]}
    assert {"cosine", "relative-magnitude", "reverse", "random"} <= rules
    header, table = rules_table(doc)
    assert {"hellaswag_sample acc ± s.e.", "Δ acc vs rank 1 ± paired s.e.", "selection passes",
            "selection s"} <= set(header)
    col = {h: i for i, h in enumerate(header)}
    assert {line[col["rule"]] for line in table} == rules
    # at each target's largest count every rule has an accuracy with its error, the others a paired difference
    largest = [line for line in table if (line[col["target"]], line[col["n"]]) in {("attn", "2"), ("block", "2")}]
    assert largest and all(" ± " in line[col["hellaswag_sample acc ± s.e."]] for line in largest)
    assert all(" ± " in line[col["Δ acc vs rank 1 ± paired s.e."]] for line in largest if line[col["rank"]] != "1")
    by_rule = {}
    for line in table:
        by_rule.setdefault(line[col["rule"]], []).append(float(line[col["selection passes"]]))
    assert all(p == 0 for p in by_rule["reverse"] + by_rule["random"])  # positional rules run no forward pass
    assert all(p > 0 for p in by_rule["cosine"] + by_rule["relative-magnitude"])
    assert all(line[col["selection s"]] != "-" for line in table)
    # the ranking is by perplexity within each (target, count)
    for key in {(line[col["target"]], line[col["n"]]) for line in table}:
        ppl = [float(line[col["perplexity"]]) for line in table if (line[col["target"]], line[col["n"]]) == key]
        assert ppl == sorted(ppl)
    rows = {(r["sweep"], r["target"], r["num"]) for r in doc["rows"]}
    assert {("random-0", "block", 2), ("random-1", "block", 2), ("random-2", "block", 2)} <= rows
    seeds = {r["sweep"]: (r["drop_attn"], r["drop_mlp"]) for r in doc["rows"] if r["target"] == "block" and r["num"] == 2
             and r["sweep"].startswith("random")}
    assert len(set(map(str, seeds.values()))) > 1  # three seeds, not one drawn three times
    healed = [r for r in doc["recovery"] if r["recipe"] != "none"]
    assert healed and {r["tokens"] for r in healed} == {2 * 2 * 32}  # one token budget for every recipe
    assert {r["sweep"] for r in doc["recovery"]} == {p["sweep"] for p in cfg["recovery"]["points"]}
    report = (out / "report.md").read_text()
    assert "## Selection rules compared" in report and (out / "figures" / "rules.png").stat().st_size > 1000
