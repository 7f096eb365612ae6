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


def _fails(args: list[str], watched, capsys, expect: str) -> None:
    before = {str(p): _fingerprint(p) for p in watched}
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ERROR_LINE in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("lightning-drop track: error: ") and expect in lines[0], lines[0]
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
