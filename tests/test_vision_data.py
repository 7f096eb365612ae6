"""ImageDataModule sources and the shipped digits config (a few steps through LightningCLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_drop.vision.image_data import ImageDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "vision_digits.yaml"


def test_digits_split_is_fixed_disjoint_and_normalized():
    dm = ImageDataModule(image_size=16, batch_size=32, seed=3)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == sizes["val"] == 270
    assert dm.num_classes == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert -1.0 - 1e-6 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-6
    again = ImageDataModule(image_size=16, seed=3)
    again.setup()
    assert torch.equal(again.splits["test"].tensors[0], dm.splits["test"].tensors[0])
    other = ImageDataModule(image_size=16, seed=4)
    other.setup()
    assert not torch.equal(other.splits["test"].tensors[1], dm.splits["test"].tensors[1])
    calib = list(dm.calibration_dataloader())
    assert sum(len(b[0]) for b in calib) == 256


def test_image_folder_source(tmp_path):
    from PIL import Image

    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (10, 12), color).save(tmp_path / c / f"{i}.png")
    dm = ImageDataModule(source=str(tmp_path), image_size=8, batch_size=4, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and sum(len(s) for s in dm.splits.values()) == 10
    x, y = dm.splits["train"].tensors
    red = x[y == 0][0]
    assert red.shape == (3, 8, 8) and red[0].mean() > red[2].mean()


def test_bad_sources_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageDataModule(source=str(tmp_path / "nope")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageDataModule(source=str(tmp_path / "empty")).setup()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load Hugging Face dataset 'surely-not/a-dataset'"):
        ImageDataModule(source="hf:surely-not/a-dataset").setup()
    with pytest.raises(ValueError, match="val_fraction"):
        ImageDataModule(val_fraction=0.6, test_fraction=0.5)


def test_digits_config_runs_a_few_steps(tmp_path, monkeypatch):
    """The documented command, `lightning-drop fit --config configs/vision_digits.yaml`, on the shipped YAML
    unedited and shrunk only by command-line overrides: train, track, drop 2 attention layers, fine-tune the
    head, report. Runs the console script's function (`lightning_drop.cli:main`) in this process, from a
    scratch directory so that the YAML's relative output paths land there."""
    from importlib.metadata import entry_points

    from lightning_drop.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-drop"]
    assert script.value == "lightning_drop.cli:main"
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["model"]["init_args"]["family"] == "vit"
    assert [c["class_path"].rsplit(".", 1)[1] for c in cfg["trainer"]["callbacks"]] == \
        ["ImportanceTracker", "LayerDrop", "ImageDropReport"]
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(CONFIG), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 # `trainer.callbacks.init_args.*` sets the last callback's arguments (ImageDropReport)
                 "--trainer.callbacks.init_args.head_epochs", "1", "--trainer.callbacks.init_args.speed_iters", "1",
                 "--trainer.callbacks.init_args.speed_batch_size", "8"]) == 0
    out = tmp_path / "logs" / "vision_digits"
    report, history = out / "drop_report.json", out / "importance_history.json"
    r = json.loads(report.read_text())
    assert r["speed"]["batch_size"] == 8  # the overrides reached the callback
    assert len(r["drop_attn_list"]) == 2 and r["drop_mlp_list"] == []
    for key in ("test_acc_before", "test_acc_after_drop", "test_acc_after_head_finetune"):
        assert 0.0 <= r[key] <= 1.0
    assert r["speed"]["flops_ratio"] < 1.0
    for row in r["sublayer_calls"]:
        assert (row["attn_flops"] == 0) == row["attn_dropped"] and row["mlp_flops"] > 0
    # the one ImportanceTracker, on the image datamodule's calibration images, capped at calibration_limit
    # (128 images x (16 patches + CLS) tokens), with its CSV and heatmap beside the history
    h = json.loads(history.read_text())["history"]
    assert [e["event"] for e in h][0] == "fit_start" and h[-1]["step"] == 3
    assert all(len(e["attn"]) == 4 and e["num_tokens"] == 128 * 17 for e in h)
    assert (out / "importance_history.csv").is_file() and (out / "importance_heatmap.png").is_file()
    from lightning_drop import load_dropped

    assert load_dropped(out / "dropped_model").config.drop_attn_list == r["drop_attn_list"]
