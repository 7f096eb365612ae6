"""DropModule: training from random init, saving, LoRA, and resume after a drop (tiny models, few steps)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.callbacks import ImportanceTracker, LayerDrop, LoRARecovery
from lightning_drop.lightning.datamodule import TextDataModule
from lightning_drop.lightning.module import DropModule

torch.set_num_threads(1)  # 2 shared cores: avoid oversubscription


class OrderedData(TextDataModule):
    """Training windows in a fixed order that starts at the current step, so a resumed run sees the batches
    an uninterrupted one would (Lightning restarts a plain DataLoader from its beginning on resume)."""

    def train_dataloader(self):
        start = self.trainer.global_step * self.batch_size if self.trainer is not None else 0
        return self._loader(torch.roll(self.train_windows, -start, dims=0), shuffle=False)


def data(c4_path, **kw) -> TextDataModule:
    args = dict(tokenizer="tiny-llama", source=str(c4_path), seq_len=32, batch_size=4, limit_documents=30,
                calibration_samples=4)
    args.update(kw)
    return OrderedData(**args)


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2,
                default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def val_loss(tmp_path, module, dm) -> float:
    return trainer(tmp_path).validate(module, dm, verbose=False)[0]["val/loss"]


def test_loss_falls_from_random_init(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=3e-3, scheduler="cosine", warmup_steps=3)
    dm = data(c4_path)
    before = val_loss(tmp_path, module, dm)
    assert before == pytest.approx(math.log(320), abs=0.5)  # uniform over the vocabulary at init
    trainer(tmp_path, max_steps=25).fit(module, dm)
    after = val_loss(tmp_path, module, dm)
    assert after < before - 1.0, (before, after)


def test_random_init_from_config_and_bad_arguments():
    m = DropModule(init_config={"model_type": "qwen3", "num_hidden_layers": 3, "hidden_size": 32,
                                "intermediate_size": 64})
    assert type(m.hf_model).__name__ == "Qwen3ForCausalLM" and m.hf_model.config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="needs `model`"):
        DropModule()
    with pytest.raises(ValueError, match="unknown optimizer"):
        DropModule("tiny-llama", optimizer="lion")
    with pytest.raises(ValueError, match="model_type"):
        DropModule(init_config={"hidden_size": 32})
    with pytest.raises(ValueError, match="only for random init"):
        DropModule("some/dir", init_config={"hidden_size": 32})


def test_save_pretrained_dropped_and_lora_merged(tmp_path):
    from lightning_drop.io.model_loading import load_model

    pl.seed_everything(0)
    m = DropModule("tiny-llama")
    m.apply_drop(attn=[1], mlp=[2])
    m.add_lora(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # make the adapters do something
        for name, p in m.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 12))
    expected = m(ids).logits
    out = m.save_pretrained(tmp_path / "merged")
    assert m.lora_config is not None  # saving merges a copy; training may go on
    loaded, _ = load_model(out)
    assert type(loaded).__name__ == "DroppedLlamaForCausalLM"
    assert loaded.config.drop_attn_list == [1] and loaded.config.drop_mlp_list == [2]
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=1e-4)
    m.merge_lora()
    assert type(m.model).__name__ == "DroppedLlamaForCausalLM" and m.drop_plan() == ([1], [2])
    torch.testing.assert_close(m(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_resume_after_drop_equals_uninterrupted(tmp_path, c4_path):
    """Drop at step 2 (+LoRA after it), checkpoint at the epoch end (step 4), resume: steps 5-8 match."""

    def run(ckpt=None, max_steps=8):
        pl.seed_everything(0)
        module = DropModule("tiny-llama", lr=3e-3, scheduler="cosine", warmup_steps=2, max_steps=8)
        losses = Losses()
        cbs = [LayerDrop(target="attn", num=1, when="step", at_step=2, calibration_batch_size=4),
               LoRARecovery(r=4, dropout=0.0, merge=False), ImportanceTracker(every_n_steps=2, heatmap=False),
               ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4), losses]
        tr = trainer(tmp_path, max_steps=max_steps, callbacks=cbs, enable_checkpointing=True,
                     check_val_every_n_epoch=100)
        tr.fit(module, data(c4_path), ckpt_path=ckpt)
        return module, losses.losses, cbs

    full, full_losses, full_cbs = run()
    assert full.drop_plan()[0] and full.lora_config is not None
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt.is_file()
    resumed, resumed_losses, cbs = run(ckpt=str(ckpt))
    assert resumed.drop_plan() == full.drop_plan()
    assert sorted(resumed.state_dict()) == sorted(full.state_dict())
    assert cbs[0].rounds == full_cbs[0].rounds and cbs[0].finished
    assert [e["step"] for e in cbs[2].history] == [e["step"] for e in full_cbs[2].history] == [0, 2, 4, 6, 8]
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-4), step
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)


def test_load_from_checkpoint_rebuilds_dropped_model(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama")
    tr = trainer(tmp_path, max_steps=2, callbacks=[LayerDrop(target="block", num=1, calibration_batch_size=4)])
    tr.fit(module, data(c4_path))
    tr.save_checkpoint(tmp_path / "m.ckpt")
    again = DropModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert again.drop_plan() == module.drop_plan() and len(again.drop_plan()[0]) == 1
    ids = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(again(ids).logits, module(ids).logits)


# --------------------------------------------------------------------------- resume after a fit-start drop
def fit_start_run(tmp_path, c4_path, ckpt=None, known=True, max_steps=4, callbacks=None):
    """Drop 1 attention layer at fit start, LoRA after it, checkpoint every 2 steps."""
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=3e-3)
    losses = Losses()
    cbs = callbacks if callbacks is not None else [
        LayerDrop(target="attn", num=1, calibration_batch_size=4), LoRARecovery(r=4, dropout=0.0, merge=False)]
    cbs = cbs + [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2), losses]
    tr = trainer(tmp_path, max_steps=max_steps, callbacks=cbs, enable_checkpointing=True, check_val_every_n_epoch=100)
    if ckpt is not None and known:
        tr.ckpt_path = str(ckpt)  # what `lightning-drop fit --ckpt_path` does
        ckpt = None
    tr.fit(module, data(c4_path), ckpt_path=ckpt)
    return module, losses.losses, cbs


def test_resume_after_fit_start_drop_does_not_drop_again(tmp_path, c4_path, scoring_passes):
    full, full_losses, full_cbs = fit_start_run(tmp_path, c4_path)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.is_file() and len(full.drop_plan()[0]) == 1 and full.lora_config is not None
    before = scoring_passes()
    assert before > 0  # the first fit scored its drop
    resumed, losses, cbs = fit_start_run(tmp_path / "again", c4_path, ckpt=ckpt)
    assert scoring_passes() == before  # not scored again on resume
    assert resumed.drop_plan() == full.drop_plan() and resumed.lora_config == full.lora_config
    assert cbs[0].rounds == full_cbs[0].rounds and cbs[0].finished
    assert sorted(losses) == [3, 4]
    for step in (3, 4):
        assert losses[step] == pytest.approx(full_losses[step], abs=1e-4), step


def test_resume_with_path_given_only_to_fit_is_still_correct(tmp_path, c4_path):
    """`fit(ckpt_path=...)` hides the path from setup: the fit-start drop is redone, then reconciled."""
    full, full_losses, full_cbs = fit_start_run(tmp_path, c4_path)
    resumed, losses, cbs = fit_start_run(tmp_path / "again", c4_path, ckpt=tmp_path / "ckpt" / "epoch=0-step=2.ckpt",
                                         known=False)
    assert resumed.drop_plan() == full.drop_plan() and cbs[0].rounds == full_cbs[0].rounds
    assert losses[4] == pytest.approx(full_losses[4], abs=1e-4)


def test_resume_from_a_checkpoint_without_drop_state(tmp_path, c4_path):
    """A fit-start drop cannot be combined with a checkpoint that never had one: refused, not undone."""
    fit_start_run(tmp_path, c4_path, max_steps=2, callbacks=[])
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    drop = [LayerDrop(target="attn", num=1, calibration_batch_size=4)]
    with pytest.raises(MisconfigurationException, match="has no LayerDrop state"):
        fit_start_run(tmp_path / "a", c4_path, ckpt=ckpt, callbacks=drop)
    # path unknown at setup: the drop is made, the checkpoint's architecture replaces it -> caught before training
    with pytest.raises(MisconfigurationException, match="not written by this drop schedule"):
        fit_start_run(tmp_path / "b", c4_path, ckpt=ckpt, known=False,
                      callbacks=[LayerDrop(target="attn", num=1, calibration_batch_size=4)])


def test_configure_model_rebuilds_the_plan_before_fsdp_shards(tmp_path, c4_path):
    """Sharded strategies restore after setup: configure_model applies the checkpoint's drops and LoRA from
    trainer.ckpt_path (a strategy that restores late, constructed; the sharded resume runs in test_sharded.py)."""
    from types import SimpleNamespace

    late = SimpleNamespace(restore_checkpoint_after_setup=True)

    full, _, _ = fit_start_run(tmp_path, c4_path, max_steps=2)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    module = DropModule("tiny-llama")
    module._trainer = SimpleNamespace(strategy=late, ckpt_path=str(ckpt))
    module.configure_model()
    assert module.drop_plan() == full.drop_plan() and module.lora_config == full.lora_config
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    module.on_load_checkpoint(saved)  # the plan matches: nothing to change after sharding
    assert sorted(module.state_dict()) == sorted(saved["state_dict"])
    other = DropModule("tiny-llama")  # path not known before sharding: a mismatch is refused, not patched
    other._trainer = SimpleNamespace(strategy=late, ckpt_path=None)
    other.configure_model()
    assert other.drop_plan() == ([], [])
    with pytest.raises(MisconfigurationException, match="set `trainer.ckpt_path` before `fit`"):
        other.on_load_checkpoint(saved)
