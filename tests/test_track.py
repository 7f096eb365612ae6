"""`lightning-drop track` through the command line: a short tiny fit saves training checkpoints with the live
`ImportanceTracker` on; scored offline on the same windows, the saved checkpoints give the live scores at the
same steps. Bad series (another architecture, another vocabulary, a missing file, a revision not in the offline
cache, an existing output) fail in one line before any loading, and nothing is written."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_drop.callbacks import ImportanceTracker
from lightning_drop.cli import main
from lightning_drop.lightning.module import DropModule
from test_bad_inputs import ERROR_LINE, _fingerprint
from test_distillation import data, trainer

torch.set_num_threads(1)
EVERY = 2
WINDOWS = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def fit(tmp_path_factory, c4_path):
    """A 6-step fit of tiny-llama: checkpoints every 2 steps, the tracker scoring every 2 steps."""
    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    tracker = ImportanceTracker(every_n_steps=EVERY, calibration_source=str(c4_path), calibration_samples=4,
                                calibration_seq_len=32, calibration_batch_size=2, output_dir=str(root / "live"),
                                heatmap=False, log_scalars=False)
    saver = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=EVERY, save_top_k=-1,
                            filename="{step}")
    tr = trainer(root, max_steps=6, enable_checkpointing=True, callbacks=[tracker, saver])
    tr.fit(DropModule("tiny-llama", lr=1e-2), data(c4_path))
    ckpts = sorted((root / "ckpts").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    return {"root": root, "ckpts": ckpts, "live": json.loads((root / "live" / "importance_history.json").read_text())}


def test_offline_scores_of_saved_checkpoints_equal_the_live_ones(fit, tmp_path, c4_path, capsys):
    out = tmp_path / "track"
    code = main(["track", "--models", *map(str, fit["ckpts"]), "--output", str(out), "--calibration", str(c4_path),
                 *WINDOWS, "--tokenizer", "tiny-llama"])
    assert code == 0, capsys.readouterr().err
    offline = json.loads((out / "importance_history.json").read_text())
    assert [e["step"] for e in offline["history"]] == [2, 4, 6]
    assert offline["calibration"]["windows_sha256"] == fit["live"]["calibration"]["windows_sha256"]
    live = {e["step"]: e for e in fit["live"]["history"]}
    assert {0, 2, 4, 6} <= set(live)
    moved = False
    for entry in offline["history"]:
        for kind in ("attn", "mlp", "block"):
            torch.testing.assert_close(torch.tensor(entry[kind]), torch.tensor(live[entry["step"]][kind]),
                                       rtol=1e-6, atol=0)
            moved |= entry[kind] != live[0][kind]
        assert entry["num_tokens"] == live[entry["step"]]["num_tokens"]
    assert moved  # the training changed the scores: the equality is not that of one model to itself
    rows = (out / "importance_history.csv").read_text().splitlines()
    assert rows[0].startswith("step,event,checkpoint,kind,layer_0") and len(rows) == 1 + 3 * 3
    assert (out / "importance_heatmap.png").stat().st_size > 1000


def _fails(args: list[str], watched, capsys, expect: str, command: str = "track") -> None:
    before = {str(p): _fingerprint(p) for p in watched}
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ERROR_LINE in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"lightning-drop {command}: error: ") and expect in lines[0], lines[0]
    assert {str(p): _fingerprint(p) for p in watched} == before


def test_bad_series_fail_in_one_line_and_write_nothing(fit, tmp_path, c4_path, capsys, monkeypatch):
    from lightning_drop.io.model_loading import tiny_model

    ckpt = str(fit["ckpts"][0])
    other_vocab = tmp_path / "other-vocab"
    model, tok = tiny_model("llama", vocab_size=300)
    model.save_pretrained(other_vocab)
    tok.save_pretrained(other_vocab)
    out = tmp_path / "out"
    common = ["--output", str(out), "--calibration", str(c4_path), *WINDOWS, "--tokenizer", "tiny-llama"]
    watched = [tmp_path, fit["root"]]
    _fails(["track", "--models", ckpt, "tiny-qwen2", *common], watched, capsys,
           "tiny-qwen2 is another model than")
    _fails(["track", "--models", ckpt, str(other_vocab), *common], watched, capsys, "vocab_size")
    _fails(["track", "--models", ckpt, str(tmp_path / "missing.ckpt"), *common], watched, capsys,
           "checkpoint not found")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _fails(["track", "--models", "EleutherAI/pythia-14m@step1000", *common], watched, capsys,
           "EleutherAI/pythia-14m at revision step1000 is not in the local Hugging Face cache")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails(["track", "--models", ckpt, *common], watched, capsys, "already exists and is not empty")
    assert not (out / "importance_history.json").exists()


# --------------------------------------------------------------------------------------- the study's track axis
def _study(tmp_path, c4_path, models: list[str]) -> dict:
    from test_study import tiny_config

    cfg = tiny_config(tmp_path / "study", c4_path, speed={"enabled": False},
                      sweeps=[{"name": "main", "targets": ["attn"], "nums": [0, 1]}], track={"models": models})
    cfg["calibration"] = {"source": str(c4_path), "num_samples": 4, "seq_len": 32, "batch_size": 2}  # as WINDOWS
    return cfg


def test_study_track_axis_gives_the_track_command_scores(fit, tmp_path, c4_path, capsys):
    from test_study import run

    ckpts = [str(p) for p in fit["ckpts"]]
    _, doc = run(_study(tmp_path, c4_path, ckpts))
    assert main(["track", "--models", *ckpts, "--output", str(tmp_path / "track"), "--calibration", str(c4_path),
                 *WINDOWS, "--tokenizer", "tiny-llama"]) == 0
    cli = json.loads((tmp_path / "track" / "importance_history.json").read_text())
    out = tmp_path / "study"
    files = json.loads((out / "track" / "importance_history.json").read_text())
    assert files["calibration"] == cli["calibration"] == doc["track"]["calibration"]  # the same windows
    for history in (doc["track"]["history"], files["history"]):
        assert [(e["step"], e["checkpoint"]) for e in history] == [(e["step"], e["checkpoint"]) for e in cli["history"]]
        for got, want in zip(history, cli["history"]):
            for kind in ("attn", "mlp", "block"):
                torch.testing.assert_close(torch.tensor(got[kind]), torch.tensor(want[kind]), rtol=1e-6, atol=0)
    assert (out / "track" / "importance_history.csv").read_text().splitlines()[0].startswith("step,event,checkpoint")
    report = (out / "report.md").read_text()
    assert "## Importance across checkpoints" in report and "![Importance across checkpoints]" in report
    for e in cli["history"]:
        for kind in ("attn", "mlp", "block"):
            assert "| " + " | ".join([str(e["step"]), kind, *(f"{v:.4g}" for v in e[kind])]) + " |" in report
    assert (out / "figures" / "track_heatmap.png").stat().st_size > 1000
    assert "Importance across checkpoints" in (out / "report.html").read_text()
    assert doc["computed_this_run"]["track"] == 3
    _, again = run(_study(tmp_path, c4_path, ckpts))  # a rerun reads every checkpoint's scores from the cache
    assert again["computed_this_run"].get("track", 0) == 0 and again["reused_this_run"]["track"] == 3
    assert again["track"]["history"] == doc["track"]["history"]


def test_study_with_a_bad_series_fails_in_one_line_and_writes_nothing(fit, tmp_path, c4_path, capsys):
    import yaml

    ckpt = str(fit["ckpts"][0])
    watched = [tmp_path, fit["root"]]
    for models, expect in (([ckpt, "tiny-qwen2"], "track.models: tiny-qwen2 is another model than tiny-llama"),
                           ([ckpt, str(tmp_path / "missing.ckpt")], "track.models: checkpoint not found"),
                           ([], "track.models: give at least one checkpoint")):
        config = tmp_path / "study.yaml"
        config.write_text(yaml.safe_dump(_study(tmp_path, c4_path, models)))
        _fails(["study", "--config", str(config)], watched, capsys, expect, "study")
        assert not (tmp_path / "study").exists()
