"""How the callbacks cooperate (`callbacks.fit_end`): final model and results whatever the list order, on any
LightningModule; the record's lifetime; the Lightning internals `rebuild_optimizers` relies on (pinned)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_drop.callbacks import (
    LayerDrop,
    LMEvalCallback,
    LoRARecovery,
    PerplexityCallback,
    SpeedBenchmark,
)
from lightning_drop.callbacks._common import rebuild_optimizers
from lightning_drop.callbacks.fit_end import FitEnd, FitEndMember
from lightning_drop.lightning.datamodule import TextDataModule
from lightning_drop.core.modeling_dropped import dropped_layers
from lightning_drop.lightning.module import DropModule
from lightning_drop.lightning.task import build_model

torch.set_num_threads(1)


def data(c4_path) -> TextDataModule:
    return TextDataModule(tokenizer="tiny-llama", source=str(c4_path), seq_len=32, batch_size=4, limit_documents=30,
                          calibration_samples=4)


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


class PlainLM(pl.LightningModule):
    """Not a DropModule: a user's own module holding a Hugging Face causal LM under `.model`."""

    def __init__(self) -> None:
        super().__init__()
        self.model, self.tokenizer = build_model("tiny-llama", None)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class SpyPerplexity(PerplexityCallback):
    def compute(self, model, tokenizer):
        self.seen_plan = dropped_layers(model)
        return super().compute(model, tokenizer)


def test_measurement_before_a_fit_end_drop_on_any_lightning_module(tmp_path, c4_path):
    pl.seed_everything(0)
    module = PlainLM()
    ppl = SpyPerplexity(data=str(c4_path), seq_len=32, num_windows=2)
    drop = LayerDrop(target="attn", num=1, when="fit_end", calibration_batch_size=2, verbose=False)
    tr = trainer(tmp_path, max_steps=2, callbacks=[ppl, drop])
    tr.fit(module, data(c4_path))
    assert drop.finished and len(drop.rounds) == 1  # dropped once, although both hooks asked for it
    assert ppl.seen_plan == dropped_layers(module.model) and len(ppl.seen_plan[0]) == 1
    assert tr._lightning_drop_fit_end is None  # the record ended with the fit


def test_speed_listed_before_lm_eval_gets_its_average(tmp_path, c4_path, monkeypatch):
    """The SDR needs lm-eval's average: it is measured first when SpeedBenchmark asks (once, not twice)."""
    calls = []

    def fake_evaluate(self, model, tokenizer):
        calls.append(type(model).__name__)
        return {"scores": {"t": 0.4}, "average": 0.4}

    monkeypatch.setattr(LMEvalCallback, "evaluate", fake_evaluate)
    speed = SpeedBenchmark(baseline_avg=0.5, prompt_len=4, gen_len=2, repeats=1, warmup=0)
    seen = {}

    def fake_measure(model, base=None, dropped_avg=None):
        seen["dropped_avg"] = dropped_avg
        return {"dropped": {k: 1.0 for k in ("prefill_s", "decode_s", "decode_tokens_per_s", "kv_bytes_per_token",
                                             "params", "weight_bytes")}, "peak_rss_bytes": 1}

    speed.measure = fake_measure
    monkeypatch.setattr("lightning_drop.measure.speed.print_speed", lambda res: None)
    lm = LMEvalCallback(tasks=["t"])
    drop = LayerDrop(target="attn", num=1, when="fit_end", calibration_batch_size=2, verbose=False)
    tr = trainer(tmp_path, max_steps=1, callbacks=[speed, lm, drop])
    captured = {}

    class Results(pl.Callback):  # listed last: reads the record before it closes
        def on_train_end(self, trainer, pl_module):
            captured.update(FitEnd.of(trainer).results)

    tr.callbacks.append(Results())
    tr.fit(DropModule("tiny-llama"), data(c4_path))
    assert seen["dropped_avg"] == 0.4 and calls == ["DroppedLlamaForCausalLM"]
    assert set(captured) == {"lm_eval", "speed"} and captured["lm_eval"]["average"] == 0.4
    assert lm.results["average"] == 0.4 and speed.results["global_step"] == 1


@pytest.mark.parametrize("lora_when, drop_kw, match", [
    ("after_drop", {"when": "step", "at_step": 1}, "attaches its adapters once the drops listed before it"),
    ("fit_start", {"when": "fit_start"}, "a fit-start drop has to happen before the adapters"),
])
def test_a_drop_listed_after_the_adapters_it_would_change_is_refused(tmp_path, c4_path, lora_when, drop_kw, match):
    cbs = [LoRARecovery(r=2, when=lora_when, target_modules=["q_proj"]),
           LayerDrop(target="attn", num=1, calibration_batch_size=2, **drop_kw)]
    with pytest.raises(MisconfigurationException, match="LoRARecovery must come after the LayerDrop callbacks.*" + match):
        trainer(tmp_path, max_steps=2, callbacks=cbs).fit(DropModule("tiny-llama"), data(c4_path))


def test_record_joins_once_and_runs_finishing_steps_in_joining_order():
    order = []
    tr = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
    record = FitEnd.of(tr)
    a, b = SimpleNamespace(when="fit_end", finished=False), SimpleNamespace(when="step", finished=True)
    record.join(a, "drop", finish=lambda t, m: order.append("a"))
    record.join(b, "drop")
    record.join(a, "drop", finish=lambda t, m: order.append("again"))  # no second place
    record.join("lora", "adapters", finish=lambda t, m: order.append("merge"))
    record.finalize(tr, None)
    assert order == ["a", "merge"] and record.drops() == [a, b] and not record.drops_finished()
    a.finished = True
    assert record.drops_finished() and FitEnd.of(tr) is record
    FitEndMember().teardown(tr, None, "fit")
    assert FitEnd.of(tr) is not record and FitEnd.of(tr).members == []


class TwoLayers(pl.LightningModule):
    """A plain module whose second layer a callback removes mid-fit; its schedule reads `lr_step_offset`."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 1)
        self.lr_step_offset = 0

    def training_step(self, batch, batch_idx):
        h = self.first(batch[0])
        return (self.second(h) if self.second is not None else h.sum(-1, keepdim=True)).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)
        offset = self.lr_step_offset
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step + offset))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)


def test_rebuild_optimizers_pins_lightning(tmp_path):
    """What `rebuild_optimizers` relies on in Lightning: after `strategy.setup_optimizers` mid-fit the trainer
    steps the new optimizer over exactly the remaining trainable parameters, the new scheduler replaces the
    old one in `trainer.lr_scheduler_configs` and is stepped from then on, moments carry over, and the step
    count (and with `lr_step_offset` the schedule) continues."""
    seen = {}

    class Remove(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and pl_module.second is not None:
                seen["old_sched"] = trainer.lr_scheduler_configs[0].scheduler
                pl_module.second = None  # the structure changed: its parameters are gone
                rebuild_optimizers(trainer, pl_module)
                opt = trainer.optimizers[0]
                seen["params"] = {id(p) for g in opt.param_groups for p in g["params"]}
                seen["adam_step"] = float(opt.state[pl_module.first.weight]["step"])

    module = TwoLayers()
    tr = trainer(tmp_path, max_steps=7, callbacks=[Remove()])
    tr.fit(module)
    assert seen["params"] == {id(p) for p in module.parameters()} == {id(module.first.weight), id(module.first.bias)}
    assert seen["adam_step"] == 3.0  # Adam's moments and step count carried over
    sched = tr.lr_scheduler_configs[0].scheduler
    assert sched is not seen["old_sched"] and sched.optimizer is tr.optimizers[0]
    assert tr.global_step == 7 and module.lr_step_offset == 3 and sched.last_epoch == 4  # stepped 4 times since
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + 7))  # the schedule continued
    assert float(tr.optimizers[0].state[module.first.weight]["step"]) == 7.0


def test_one_logger_helper_for_scalars_and_figures(tmp_path):
    """`log_to_loggers`: scalars (None skipped) to every logger; a figure to TensorBoard-like loggers
    (`experiment.add_figure`), its PNG file to those with `log_image`."""
    from lightning_drop.callbacks._common import log_to_loggers

    got = []

    class Images:
        experiment = None

        def log_metrics(self, metrics, step):
            got.append(("metrics", metrics, step))

        def log_image(self, key, images, step):
            got.append(("image", key, images, step))

    class Board(Images):
        experiment = SimpleNamespace(add_figure=lambda tag, fig, global_step, close: got.append(("figure", tag)))

    tr = SimpleNamespace(loggers=[Images(), Board()], global_step=4)
    log_to_loggers(tr, {"a": 1, "b": None})
    assert got == [("metrics", {"a": 1.0}, 4)] * 2
    got.clear()
    log_to_loggers(tr, figure=object(), tag="t", image_file=tmp_path / "x.png")
    assert got == [("image", "t", [str(tmp_path / "x.png")], 4), ("figure", "t")]
