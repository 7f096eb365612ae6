"""The peers' healing recipes as `Distillation` / `LoRARecovery` settings, on a tiny random-init model and the C4
sample: the output head plus the last K remaining layers ("Reassessing Layer Pruning"), LoRA on a frozen
low-precision base (QLoRA-style), and the one-line refusals of settings that cannot run here."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.callbacks import Distillation, LoRARecovery
from lightning_drop.lightning.module import DropModule
from test_distillation import data, drop, trainer

torch.set_num_threads(1)


class Snapshot(pl.Callback):
    """What the model held and what could train when training started (after the recipe was applied)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        self.dtypes = {n: p.dtype for n, p in pl_module.named_parameters()}


def changed(module: pl.LightningModule, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in module.named_parameters() if n in before and not torch.equal(p.to(before[n].dtype), before[n])}


@pytest.mark.parametrize("last_k, layers", [(2, (1, 2)), (0, ())])
def test_last_layers_trains_the_head_and_the_last_remaining_layers(tmp_path, c4_path, last_k, layers):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    snap = Snapshot()
    d = Distillation(trainable="last_layers", last_k=last_k, alpha=0.5)
    # block 3 dropped whole: the last remaining layers are 2 and 1, not 3 and 2
    tr = trainer(tmp_path, max_steps=2, callbacks=[drop(target="block", keep=[0, 1, 2]), d, snap])
    tr.fit(module, data(c4_path))
    assert module.drop_plan() == ([3], [3])
    expected = {n for n in snap.params
                if n.endswith("lm_head.weight") or any(f".layers.{i}." in n for i in layers)}
    assert snap.trainable == expected
    assert changed(module, snap.params) == expected


def test_lora_on_a_bfloat16_base_trains_float32_adapters_and_merges_back(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.hf_model.named_parameters()}
    snap = Snapshot()
    recovery = LoRARecovery(r=4, alpha=8, dropout=0.0, base_dtype="bfloat16")
    tr = trainer(tmp_path, max_steps=3, callbacks=[drop(keep=[0, 2, 3]), recovery, snap])  # drops attention 1
    tr.fit(module, data(c4_path))
    assert snap.trainable and all("lora_" in n for n in snap.trainable)
    assert {snap.dtypes[n] for n in snap.trainable} == {torch.float32}  # the adapters
    assert {d for n, d in snap.dtypes.items() if n not in snap.trainable} == {torch.bfloat16}  # the frozen base
    assert recovery.merged and module.lora_config is None
    after = dict(module.hf_model.named_parameters())
    assert {p.dtype for p in after.values()} == {torch.float32}  # back in the model's own dtype
    moved = {n for n, p in after.items() if not torch.equal(p, before[n])}
    adapted = {n for n in moved if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                                 "gate_proj.weight", "up_proj.weight", "down_proj.weight"))}
    assert adapted and all(".layers.1.self_attn." not in n for n in adapted)  # dropped attention 1 has no weights
    # everything else only went through the bfloat16 round trip
    for n in moved - adapted:
        torch.testing.assert_close(after[n], before[n].to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("make, message", [
    (lambda: Distillation(trainable="last_layers"), "trainable='last_layers' needs last_k"),
    (lambda: Distillation(trainable="last_layers", last_k=-1), "needs last_k, an integer >= 0"),
    (lambda: Distillation(trainable="lora", last_k=3), "last_k is only used with trainable='last_layers'"),
    (lambda: Distillation(trainable="all", base_dtype="bfloat16"), "base_dtype is the frozen base of LoRA"),
    (lambda: LoRARecovery(base_dtype="int3"), "unknown base_dtype 'int3'"),
])
def test_bad_recipe_arguments_fail_at_construction(make, message):
    with pytest.raises(MisconfigurationException, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(),
                    reason="a machine with bitsandbytes and CUDA can hold a 4-bit base")
def test_a_4bit_base_is_refused_naming_what_is_missing():
    for make in (lambda: LoRARecovery(base_dtype="nf4"), lambda: Distillation(base_dtype="nf4")):
        with pytest.raises(MisconfigurationException) as err:
            make()
        text = str(err.value)
        assert "\n" not in text and "nf4" in text
        if importlib.util.find_spec("bitsandbytes") is None:
            assert "bitsandbytes (not installed)" in text
        if not torch.cuda.is_available():
            assert "a CUDA device (none visible)" in text


def test_last_k_beyond_the_model_is_refused_before_training(tmp_path, c4_path):
    module = DropModule("tiny-llama")
    tr = trainer(tmp_path, max_steps=1, callbacks=[drop(), Distillation(trainable="last_layers", last_k=5)])
    with pytest.raises(MisconfigurationException, match=r"last_k=5 asks for more than the model's 4 layers"):
        tr.fit(module, data(c4_path))


def test_a_resumed_fit_puts_the_restored_adapters_base_back_in_low_precision():
    """On resume DropModule rebuilds the adapters from its checkpoint record before the recipe applies: the
    base must still become bfloat16 (the checkpoint's weights then load into it), and the merge returns it."""
    from lightning_drop.callbacks.trainable import LoRASettings, TrainableSet

    module = DropModule("tiny-llama")
    module.add_lora(r=4, alpha=8, dropout=0.0)  # what a resume rebuilds
    recipe = TrainableSet("LoRARecovery", "lora", lora=LoRASettings(r=4, alpha=8, dropout=0.0, base_dtype="bfloat16"))
    recipe.apply(module)
    dtypes = {n: p.dtype for n, p in module.hf_model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert recipe.merge(module) and {p.dtype for p in module.hf_model.parameters()} == {torch.float32}
