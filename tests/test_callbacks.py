"""ImportanceTracker, LayerDrop and LoRARecovery on tiny models for a few steps; fit-end measurements see the
final model whatever the callback order; what sharded strategies refuse (strategy objects, not run)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.callbacks import ImportanceTracker, LayerDrop, LoRARecovery, PerplexityCallback
from lightning_drop.lightning.datamodule import TextDataModule
from lightning_drop.core.modeling_dropped import dropped_layers
from lightning_drop.lightning.module import DropModule

torch.set_num_threads(1)


class Losses(pl.Callback):
    """Training loss per optimizer step (the loss of the batch that led to that step)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class SpyPerplexity(PerplexityCallback):
    """Records what model the fit-end measurement received and the module's LoRA state at that moment."""

    seen: dict

    def compute(self, model, tokenizer):
        self.seen = {"class": type(model).__name__, "lora_attached": self._module.lora_config is not None,
                     "lora_params": [n for n, _ in model.named_parameters() if "lora_" in n],
                     "plan": dropped_layers(model)}
        return super().compute(model, tokenizer)

    def on_train_end(self, trainer, pl_module):
        self._module = pl_module
        super().on_train_end(trainer, pl_module)


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
    tr = trainer(tmp_path, max_steps=7, callbacks=[tracker], logger=loggers, log_every_n_steps=1)
    tr.fit(module, data(c4_path))
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
    # state through a real Lightning checkpoint: a resumed fit at the same step scores nothing new
    ckpt = tmp_path / "tracker.ckpt"
    tr.save_checkpoint(ckpt)
    again = ImportanceTracker(every_n_steps=3, output_dir=str(tmp_path / "imp2"), calibration_batch_size=2)
    resumed = trainer(tmp_path, max_steps=7, callbacks=[again])
    resumed.fit(DropModule("tiny-llama"), data(c4_path), ckpt_path=str(ckpt))
    assert resumed.global_step == 7 and again.history == tracker.history


def test_layer_drop_iterative_during_training_rebuilds_optimizer(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=3e-3, scheduler="cosine", warmup_steps=2)
    drop = LayerDrop(target="attn", num=2, schedule="iterative", step=1, every_n_steps=2, when="step", at_step=2,
                     calibration_batch_size=2)
    losses = Losses()
    tr = trainer(tmp_path, max_steps=8, callbacks=[drop, losses])
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
    # the same run trained on after each drop: every later step has a finite loss, and the loss fell
    after = {k: v for k, v in losses.losses.items() if k > 2}
    assert sorted(after) == [3, 4, 5, 6, 7, 8] and all(math.isfinite(v) for v in after.values())
    assert max(after[7], after[8]) < after[3] - 0.3, after


def test_layer_drop_at_fit_end_is_seen_by_an_earlier_measurement(tmp_path, c4_path):
    """LayerDrop(when=fit_end) listed after a perplexity callback: the measurement still sees the drop."""
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=3e-3)
    ppl = SpyPerplexity(data=str(c4_path), seq_len=32, num_windows=4)
    drop = LayerDrop(target="mlp", num=1, when="fit_end", calibration_batch_size=2)
    losses = Losses()
    tr = trainer(tmp_path, max_steps=3, callbacks=[ppl, drop, losses])
    tr.fit(module, data(c4_path))
    assert sorted(losses.losses) == [1, 2, 3]  # trained undropped, dropped at the end
    assert drop.finished and [r["step"] for r in drop.rounds] == [3]
    attn, mlp = module.drop_plan()
    assert attn == [] and len(mlp) == 1 and mlp == drop.rounds[0]["mlp"]
    assert ppl.seen["plan"] == ([], mlp) and ppl.seen["class"] == "DroppedLlamaForCausalLM"
    assert ppl.value == pytest.approx(ppl.compute(module.hf_model, module.tokenizer), rel=1e-6)


def test_layer_drop_at_fit_start_and_state(tmp_path, c4_path, scoring_passes):
    pl.seed_everything(0)
    module = DropModule("tiny-llama")
    drop = LayerDrop(target="joint", ratio=0.25, metric="reverse")  # 2 of 8 modules, deepest first
    tr = trainer(tmp_path, max_steps=1, callbacks=[drop])
    tr.fit(module, data(c4_path))
    assert drop.total == 2 and drop.finished
    assert module.drop_plan() in (([3], [3]), ([], [2, 3]), ([2, 3], []), ([3], [2]), ([2], [3]))
    # state through a real Lightning checkpoint file, resumed with the path known at setup: no re-scoring
    tr.save_checkpoint(tmp_path / "drop.ckpt")
    before = scoring_passes()
    again = LayerDrop(target="joint", ratio=0.25)  # cosine: scoring it again would run calibration passes
    resumed = trainer(tmp_path, max_steps=1, callbacks=[again])
    resumed.ckpt_path = str(tmp_path / "drop.ckpt")
    fresh = DropModule("tiny-llama")
    resumed.fit(fresh, data(c4_path))
    assert again.finished and again.rounds == drop.rounds and again.total == 2
    assert fresh.drop_plan() == module.drop_plan()
    assert scoring_passes() == before


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
    from lightning_drop.io.model_loading import load_model

    saved, _ = load_model(str(tmp_path / "recovered"))
    assert saved.config.drop_attn_list == module.drop_plan()[0] and type(saved).__name__.startswith("Dropped")


# ------------------------------------------------------------------------ checks before training
@pytest.mark.parametrize("kwargs, match", [
    ({"target": "attn", "num": 5}, r"cannot drop 5 attn .* at most 4 \(4 droppable\)"),
    ({"target": "attn", "num": 3, "keep": [0, 1]}, r"at most 2 \(2 droppable\)"),
    ({"target": "block", "num": 4}, r"at most 3 \(at least one block must remain\)"),
    ({"target": "joint", "num": 8}, r"at most 7 \(at least one sublayer must remain\)"),
    ({"target": "mlp", "num": 1, "keep": [1, 7]}, r"keep indices \[7\] out of range: the model has 4 layers"),
    ({"target": "attn", "num": 2, "when": "step", "at_step": 9}, "at_step=9 is after the last step"),
])
def test_layer_drop_checks_the_model_before_training(tmp_path, c4_path, kwargs, match):
    started = []

    class Started(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            started.append(True)

    tr = trainer(tmp_path, max_steps=4, callbacks=[LayerDrop(calibration_batch_size=2, **kwargs), Started()])
    with pytest.raises(MisconfigurationException, match=match):
        tr.fit(DropModule("tiny-llama"), data(c4_path))
    assert not started and tr.global_step == 0


def test_layer_drop_limits_count_existing_drops(tmp_path, c4_path):
    module = DropModule("tiny-llama")
    module.apply_drop(attn=[0, 1, 2])  # e.g. a dropped checkpoint: one attention layer left to drop
    tr = trainer(tmp_path, max_steps=1, callbacks=[LayerDrop(target="attn", num=2, calibration_batch_size=2)])
    with pytest.raises(MisconfigurationException, match=r"already dropped: attention \[0, 1, 2\].*at most 1"):
        tr.fit(module, data(c4_path))


def test_layer_drop_block_whose_attention_is_gone_counts_as_one_block(tmp_path, c4_path):
    """Dropping block 3 when only its MLP is left is one block: the schedule stops there."""
    module = DropModule("tiny-llama")
    module.apply_drop(attn=[3])
    drop = LayerDrop(target="block", num=1, metric="reverse", calibration_batch_size=2)  # deepest first
    tr = trainer(tmp_path, max_steps=1, callbacks=[drop])
    tr.fit(module, data(c4_path))
    assert drop.finished and [r["modules"] for r in drop.rounds] == [["block.3"]]
    assert module.drop_plan() == ([3], [3])


def test_lora_after_drop_with_fit_end_drop_is_refused(tmp_path, c4_path):
    tr = trainer(tmp_path, max_steps=1, callbacks=[LayerDrop(num=1, when="fit_end"), LoRARecovery()])
    with pytest.raises(MisconfigurationException, match="adapters would never be attached"):
        tr.fit(DropModule("tiny-llama"), data(c4_path))


# ------------------------------------------------------------ measurements see the final model
def test_measurement_listed_before_lora_recovery_sees_the_merged_model(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    ppl = SpyPerplexity(data=str(c4_path), seq_len=32, num_windows=4)
    drop = LayerDrop(target="attn", num=1, calibration_batch_size=2)
    lora = LoRARecovery(r=4, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    tr = trainer(tmp_path, max_steps=3, callbacks=[ppl, drop, lora])
    tr.fit(module, data(c4_path))
    assert ppl.seen["class"] == "DroppedLlamaForCausalLM" and ppl.seen["lora_params"] == []
    assert not ppl.seen["lora_attached"] and lora.merged and module.lora_config is None
    assert ppl.seen["plan"] == module.drop_plan() and len(module.drop_plan()[0]) == 1
    assert ppl.value == pytest.approx(ppl.compute(module.hf_model, module.tokenizer), rel=1e-6)


def test_final_model_with_adapters_kept_gives_a_merged_copy(tmp_path, c4_path):
    from lightning_drop.callbacks.fit_end import final_model

    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    lora = LoRARecovery(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"], merge=False)
    tr = trainer(tmp_path, max_steps=2, callbacks=[lora])
    tr.fit(module, data(c4_path))
    assert module.lora_config is not None  # merge=False: the adapters stay
    ids = torch.randint(0, 256, (1, 12))
    expected = module(ids).logits
    inner = final_model(tr, module)
    assert any("lora_" in n for n, _ in inner.named_parameters())  # adapters act inside the base model
    plain = final_model(tr, module, merged_copy=True)
    assert not any("lora_" in n for n, _ in plain.named_parameters()) and module.lora_config is not None
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------- sharded strategies (constructed here; run: tests/test_sharded.py)
def fsdp2_trainer(callbacks=(), **kw):
    from lightning_drop.lightning.distributed import FSDP2Strategy

    return SimpleNamespace(strategy=FSDP2Strategy(), callbacks=list(callbacks), max_steps=10,
                           ckpt_path=None, datamodule=None, global_step=0, **kw)


def test_callbacks_accept_fsdp2_and_other_shardings_are_refused(tmp_path, c4_path):
    """Under FSDP2 every callback sets up as under DDP; FSDP1 and tensor parallelism without a plan are one-line
    refusals (plans: tests/test_tensor_parallel.py)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_drop.callbacks import LMEvalCallback, SpeedBenchmark
    from lightning_drop.errors import UserError

    module = DropModule("tiny-llama")
    for cb in (LayerDrop(num=1, when="step", at_step=2), LayerDrop(num=1, when="fit_end"), ImportanceTracker(),
               PerplexityCallback(data=str(c4_path)), LMEvalCallback(tasks=["x"]), SpeedBenchmark()):
        cb.setup(fsdp2_trainer([cb]), module, "fit")
    lora = LoRARecovery(r=2, merge=True, target_modules=["q_proj"])
    lora.setup(fsdp2_trainer([lora]), module, "fit")
    assert module.lora_config is not None
    saver = DropModule("tiny-llama", save_dir=str(tmp_path / "out"))
    saver._trainer = fsdp2_trainer(is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    saver._trainer.strategy.broadcast = lambda obj, src=0: obj
    saver.setup("fit")  # the sharded weights are gathered at fit end: no refusal
    assert saver.save_path == str(tmp_path / "out")
    for strategy, match in ((FSDPStrategy(), "FSDPStrategy is not supported: shard with FSDP2"),
                            (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
                             "tensor parallelism needs a plan: set model.init_args.tp_plan: auto")):
        other = DropModule("tiny-llama")
        other._trainer = SimpleNamespace(strategy=strategy, datamodule=None)
        with pytest.raises(UserError, match=match):
            other.setup("fit")


def test_fsdp2_strategy_name_is_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_drop.lightning.distributed import FSDP2Strategy

    assert FSDP2Strategy.strategy_name in StrategyRegistry
    strategy = StrategyRegistry.get("fsdp2")
    assert type(strategy) is FSDP2Strategy and strategy._tensor_parallel_size == 1


def test_quantize_and_speed_listed_first_get_a_plain_model(tmp_path, c4_path, monkeypatch):
    """What QuantizeCallback/SpeedBenchmark receive with adapters kept (merge=False) and LoRARecovery listed after
    them: a merged plain copy that `save_dropped` can write (the quantizer itself needs gptqmodel: stubbed)."""
    import lightning_drop.callbacks.quantize as qcb
    from lightning_drop.callbacks import SpeedBenchmark
    from lightning_drop.io.dropped_checkpoint import save_dropped

    monkeypatch.setattr(qcb, "require_backend", lambda backend: None)
    seen = {}

    def fake_quantize(model, tokenizer):
        seen["quantize"] = (type(model).__name__, [n for n, _ in model.named_parameters() if "lora_" in n])
        save_dropped(model, tmp_path / "plain", tokenizer=tokenizer)  # a PeftModel would not save as a dropped model
        return {"out_dir": str(tmp_path / "q")}

    def fake_measure(model, base=None, dropped_avg=None):
        seen["speed"] = type(model).__name__
        raise RuntimeError("measured")

    quant = qcb.QuantizeCallback(output=str(tmp_path / "q"), calibration=str(c4_path))
    quant.quantize = fake_quantize
    monkeypatch.setattr("lightning_drop.measure.quantize.format_report", lambda result: "report")
    speed = SpeedBenchmark()
    speed.measure = fake_measure
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    cbs = [quant, speed, LayerDrop(target="attn", num=1, calibration_batch_size=2),
           LoRARecovery(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"], merge=False)]
    with pytest.raises(RuntimeError, match="measured"):
        trainer(tmp_path, max_steps=2, callbacks=cbs).fit(module, data(c4_path))
    assert seen["quantize"] == ("DroppedLlamaForCausalLM", []) and seen["speed"] == "DroppedLlamaForCausalLM"
    assert module.lora_config is not None  # the module keeps its adapters (merge=False)
    assert (tmp_path / "plain" / "config.json").is_file()


def test_layer_drop_warns_when_the_schedule_outlasts_the_fit():
    drop = LayerDrop(target="attn", num=3, schedule="iterative", step=1, every_n_steps=5)
    drop.total = 3
    with pytest.warns(UserWarning, match="last of 3 rounds would be at step 10, after max_steps=4"):
        drop._check_schedule(SimpleNamespace(max_steps=4))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rounds at steps 0, 5, 10 fit max_steps=10: no warning
        drop._check_schedule(SimpleNamespace(max_steps=10))


def test_calibration_batches_are_shared_out_across_ranks():
    """Under DDP each rank scores a disjoint share of the calibration batches and together they cover all
    (the synced token-weighted sums then equal one process's: tests/test_ddp.py compares the scores)."""
    from lightning_drop.callbacks._common import CalibrationSource

    ids = torch.arange(7 * 3).view(7, 3)
    dm = SimpleNamespace(calibration_batch=lambda: {"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def rows(rank: int, world: int) -> list[int]:
        src = CalibrationSource(None, 16, 8, 2, "test")
        trainer = SimpleNamespace(datamodule=dm, global_rank=rank, world_size=world)
        return [int(r[0]) for b in src.batches(trainer, None) for r in b["input_ids"]]

    alone = rows(0, 1)
    assert alone == list(range(0, 21, 3))
    for world in (2, 3, 5):
        shares = [rows(r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == alone  # every window once, on exactly one rank
        assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1:])
    assert rows(4, 5) == []  # 4 batches over 5 ranks: the last rank scores nothing and still syncs
