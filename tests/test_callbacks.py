"""ImportanceTracker, LayerDrop and LoRARecovery on tiny models for a few steps."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.callbacks import ImportanceTracker, LayerDrop, LoRARecovery
from lightning_drop.datamodule import TextDataModule
from lightning_drop.module import DropModule

torch.set_num_threads(1)


def data(c4_path, **kw) -> TextDataModule:
    args = dict(tokenizer="tiny-llama", source=str(c4_path), seq_len=32, batch_size=4, limit_documents=30,
                calibration_samples=4)
    args.update(kw)
    return TextDataModule(**args)


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


def test_tracker_history_one_entry_per_interval(tmp_path, c4_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=3e-3)
    tracker = ImportanceTracker(every_n_steps=3, output_dir=str(tmp_path / "imp"), calibration_batch_size=2)
    loggers = [TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "csv")]
    trainer(tmp_path, max_steps=7, callbacks=[tracker], logger=loggers, log_every_n_steps=1).fit(module, data(c4_path))
    steps = [e["step"] for e in tracker.history]
    assert steps == [0, 3, 6, 7]  # fit start, every 3 steps, fit end
    assert [e["event"] for e in tracker.history] == ["fit_start", "step", "step", "fit_end"]
    for e in tracker.history:
        assert all(len(e[k]) == 4 and all(v > 0 for v in e[k]) for k in ("attn", "mlp", "block"))
        assert e["num_tokens"] == 4 * 32
    assert tracker.history[0]["attn"] != tracker.history[-1]["attn"]  # training moved the scores
    saved = json.loads((tmp_path / "imp" / "importance_history.json").read_text())
    assert saved["history"] == tracker.history and saved["num_layers"] == 4
    rows = (tmp_path / "imp" / "importance_history.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[:3] == ["step", "event", "kind"] and len(rows) == 1 + 3 * 4
    assert (tmp_path / "imp" / "importance_heatmap.png").stat().st_size > 1000
    logged = (tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "importance/attn/layer_00" in logged.splitlines()[0]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    again = ImportanceTracker(every_n_steps=3)
    again.load_state_dict(tracker.state_dict())
    assert again.history == tracker.history


def test_layer_drop_iterative_during_training_rebuilds_optimizer(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=3e-3, scheduler="cosine", warmup_steps=2)
    drop = LayerDrop(target="attn", num=2, schedule="iterative", step=1, every_n_steps=2, when="step", at_step=2,
                     calibration_batch_size=2)
    tr = trainer(tmp_path, max_steps=8, callbacks=[drop])
    tr.fit(module, data(c4_path))
    assert tr.global_step == 8 and drop.finished
    assert [r["step"] for r in drop.rounds] == [2, 4]
    attn, mlp = module.drop_plan()
    assert len(attn) == 2 and mlp == [] and attn == sorted(r["attn"][0] for r in drop.rounds)
    # the first round's choice was the lowest attention score at that time
    first = drop.rounds[0]["scores"]["attn"]
    assert drop.rounds[0]["attn"] == [min(range(4), key=lambda i: first[i])]
    assert drop.rounds[1]["scores"]["attn"][drop.rounds[0]["attn"][0]] is None  # re-scored the dropped model
    opt_params = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    live = {id(p) for p in module.parameters() if p.requires_grad}
    assert opt_params == live
    assert not any(f"layers.{i}.self_attn." in n for n, _ in module.named_parameters() for i in attn)
    # the scheduler continued (cosine at step 8 of 8 reaches 0) instead of restarting its warmup
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    # the model trains on: a few more steps lower the training loss on a fixed batch
    batch = tr.datamodule.calibration_batch()
    before = float(module._loss(batch))
    tr2 = trainer(tmp_path, max_steps=6)
    module.hparams.scheduler = "constant"
    module.hparams.warmup_steps = 0
    tr2.fit(module, data(c4_path))
    assert float(module._loss(batch)) < before


def test_layer_drop_at_fit_start_and_state(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama")
    drop = LayerDrop(target="joint", ratio=0.25, metric="reverse")  # 2 of 8 modules, deepest first
    trainer(tmp_path, max_steps=1, callbacks=[drop]).fit(module, data(c4_path))
    assert drop.total == 2 and drop.finished
    assert module.drop_plan() in (([3], [3]), ([], [2, 3]), ([2, 3], []), ([3], [2]), ([2], [3]))
    again = LayerDrop(target="joint", ratio=0.25)
    again.load_state_dict(drop.state_dict())
    assert again.finished and again.rounds == drop.rounds


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "attn"}, "exactly one of"),
    ({"num": 1, "ratio": 0.5}, "exactly one of"),
    ({"num": 1, "target": "heads"}, "unknown target"),
    ({"num": 1, "metric": "l2"}, "unknown metric"),
    ({"num": 1, "when": "step"}, "at_step"),
    ({"num": 1, "at_step": 3}, "only used with when='step'"),
    ({"num": 1, "schedule": "greedy"}, "unknown schedule"),
    ({"ratio": 1.5}, "ratio must be in"),
])
def test_layer_drop_rejects_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        LayerDrop(**kwargs)


def test_bad_tracker_and_lora_arguments():
    with pytest.raises(MisconfigurationException, match="every_n_steps"):
        ImportanceTracker(every_n_steps=0)
    with pytest.raises(MisconfigurationException, match="target_modules"):
        LoRARecovery(target_modules=[])
    with pytest.raises(MisconfigurationException, match="unknown when"):
        LoRARecovery(when="later")


def test_lora_recovery_lowers_held_out_loss(tmp_path, c4_path):
    """Pretrain a tiny model, drop 2 of its attention layers, recover with LoRA: held-out loss goes down."""
    pl.seed_everything(0)
    dm = data(c4_path, seq_len=32, batch_size=8)
    base = DropModule("tiny-llama", lr=5e-3)
    trainer(tmp_path, max_steps=40).fit(base, dm)
    base.save_pretrained(tmp_path / "pretrained")

    module = DropModule(str(tmp_path / "pretrained"), lr=1e-2, save_dir=str(tmp_path / "recovered"))
    drop = LayerDrop(target="attn", num=2, calibration_batch_size=4)
    lora = LoRARecovery(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    tr = trainer(tmp_path, max_steps=30, callbacks=[drop, lora])
    # held-out loss of the dropped model before recovery: validate right after the drop happens in setup
    dropped_loss = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.eval()
                losses = [float(pl_module._loss(b)) for b in trainer.datamodule.val_dataloader()]
                pl_module.train()
            dropped_loss["v"] = sum(losses) / len(losses)

    tr.callbacks.append(Probe())
    tr.fit(module, dm)
    assert module.lora_config is None and lora.merged  # merged at train end
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and not any("lora" in n for n in trainable)
    after = trainer(tmp_path, limit_val_batches=None).validate(module, dm, verbose=False)[0]["val/loss"]
    assert after < dropped_loss["v"] - 0.02, (dropped_loss, after)
    from lightning_drop.models import load_model

    saved, _ = load_model(str(tmp_path / "recovered"))
    assert saved.config.drop_attn_list == module.drop_plan()[0] and type(saved).__name__.startswith("Dropped")
