"""ImageDataModule sources and the shipped digits config (a few steps through LightningCLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_drop.vision.data import ImageDataModule

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


def test_digits_config_runs_a_few_steps(tmp_path):
    """The shipped YAML, shortened: train, track, drop 2 attention layers, fine-tune the head, report."""
    from lightning_drop.vision.run import main

    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["model"]["init_args"]["family"] == "vit"
    report = tmp_path / "report.json"
    tracker, drop = cfg["trainer"]["callbacks"]
    tracker["init_args"]["output"] = str(tmp_path / "history.json")
    drop["init_args"].update(report_path=str(report), save_dir=str(tmp_path / "dropped"), head_epochs=1,
                             speed_iters=1, speed_batch_size=8)
    cfg["trainer"].update(max_steps=3, limit_val_batches=1, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp_path))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    small = tmp_path / "config.yaml"
    small.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(small)])
    r = json.loads(report.read_text())
    assert len(r["drop_attn_list"]) == 2 and r["drop_mlp_list"] == []
    for key in ("test_acc_before", "test_acc_after_drop", "test_acc_after_head_finetune"):
        assert 0.0 <= r[key] <= 1.0
    assert r["speed"]["flops_ratio"] < 1.0
    assert all(row["attn_calls"] == 0 for row in r["sublayer_calls"] if row["attn_dropped"])
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == 3
    from lightning_drop.vision import load_vision_dropped

    assert load_vision_dropped(tmp_path / "dropped").config.drop_attn_list == r["drop_attn_list"]
