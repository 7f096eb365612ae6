"""The stored top-k teacher (`lightning_drop.io.teacher_logits`) and its loss (`distill_loss.topk_*`): the store's
round trip and lookup by content, its errors (a missing row, a mismatching manifest, a foreign directory),
atomic writing; the loss against the dense definition; `Distillation(teacher_logits=...)` on tiny-llama:
the same trained weights as the live teacher when k is the vocabulary, no teacher held while training,
resume from the store, bad input; and rank zero writing the store under DDP."""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.callbacks import Distillation, LayerDrop
from lightning_drop.callbacks.distill_loss import kd_and_lm_loss, kd_loss, topk_kd_and_lm_loss, topk_kd_loss
from lightning_drop.errors import UserError
from lightning_drop.lightning.datamodule import TextDataModule
from lightning_drop.lightning.module import DropModule
from lightning_drop.io.tiny_models import tiny_model
from lightning_drop.io.teacher_logits import (
    MANIFEST,
    StoreMismatch,
    TeacherLogitStore,
    prepare_store,
    read_manifest,
    top_k_logprobs,
    write_store,
)

torch.set_num_threads(1)
VOCAB = 320  # tiny-llama's


def teacher(seed: int = 0) -> torch.nn.Module:
    return tiny_model("llama", seed=seed)[0].eval()


def windows(n: int = 10, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def by_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sorted by token id along k: the top-k set, whatever order topk gave it in."""
    ids, order = ids.long().sort(-1)
    return values.float().gather(-1, order), ids


# ------------------------------------------------------------------------------------------- the store
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("float16", 2e-2)])
def test_store_round_trip_and_lookup_by_shuffled_rows(tmp_path, dtype, atol):
    model, rows = teacher(), windows()
    rows[7] = rows[2]  # a repeated window: one teacher output, found either way
    store = write_store(tmp_path / "store", model, rows, k=6, temperature=2.0, dtype=dtype, batch_size=3)
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert {k: manifest[k] for k in ("k", "temperature", "vocab_size", "dtype", "rows", "seq_len")} == {
        "k": 6, "temperature": 2.0, "vocab_size": VOCAB, "dtype": dtype, "rows": 10, "seq_len": 12}
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    values, ids = store.lookup(rows[perm])
    assert values.shape == ids.shape == (10, 12, 6) and ids.dtype == torch.int64
    with torch.no_grad():
        want_v, want_i = top_k_logprobs(model(input_ids=rows[perm]).logits, 6, 2.0)
    got, want = by_id(values, ids), by_id(want_v, want_i)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol)
    assert (values.float() <= 0).all()
    reopened = TeacherLogitStore(tmp_path / "store")  # a second process opens the same files
    assert reopened.digest == store.digest and torch.equal(reopened.lookup(rows[:3])[1], store.lookup(rows[:3])[1])


def test_a_batch_row_not_in_the_store_is_an_error(tmp_path):
    rows = windows()
    store = write_store(tmp_path / "store", teacher(), rows, k=4)
    other = rows[:3].clone()
    other[1, 5] = (other[1, 5] + 1) % VOCAB
    with pytest.raises(UserError, match="batch row 1 is not one of the 10 windows in the store") as err:
        store.lookup(other)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="batch rows have 8 tokens, the store .* holds windows of 12"):
        store.lookup(rows[:2, :8])


def test_a_store_of_other_inputs_is_refused_naming_what_differs(tmp_path):
    rows, model = windows(), teacher()
    path = tmp_path / "store"
    kw = dict(k=4, temperature=1.0, vocab_size=VOCAB)
    first = prepare_store(path, rows, teacher=model, **kw)
    again = prepare_store(path, rows, teacher=model, **kw)  # the same inputs: reused, not rewritten
    assert again.digest == first.digest
    cases = [({"k": 5}, r"another k \(store 4, now 5\)"),
             ({"temperature": 2.0}, r"another temperature \(store 1.0, now 2.0\)"),
             ({"dtype": "float32"}, "another value dtype"),
             ({"teacher": teacher(seed=1)}, r"another teacher \(its weights differ\)"),
             ({"windows": windows(seed=3)}, r"another training windows \(other token ids\)"),
             ({"windows": rows[:9]}, r"another number of windows \(store 10, now 9\)"),
             ({"teacher": None, "digest": "0" * 64}, "not the one the checkpoint trained with")]
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    for change, match in cases:
        args = {"windows": rows, "teacher": model, **kw, **change}
        with pytest.raises(StoreMismatch, match=match) as err:
            prepare_store(path, args.pop("windows"), **args)
        assert "\n" not in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before  # nothing rewritten
    with pytest.raises(UserError, match="no store at .* and no teacher to write it"):
        prepare_store(tmp_path / "absent", rows, teacher=None, **kw)


def test_writing_is_atomic_and_never_replaces_a_foreign_directory(tmp_path):
    model, rows = teacher(), windows()
    calls = []

    def fail_on_the_second_batch(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the teacher")

    handle = model.register_forward_pre_hook(fail_on_the_second_batch, with_kwargs=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        write_store(tmp_path / "store", model, rows, k=4, batch_size=4)
    handle.remove()
    assert list(tmp_path.iterdir()) == []  # neither the store nor a temporary is left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists and is not empty"):
        write_store(foreign, model, rows, k=4)
    with pytest.raises(UserError, match="already exists and is not empty"):
        prepare_store(foreign, rows, teacher=model, k=4, temperature=1.0, vocab_size=VOCAB)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and read_manifest(foreign) is None
    assert len(write_store(foreign, model, rows, k=4, overwrite=True)) == 10  # only when told


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_loss_with_k_the_vocabulary_is_the_dense_loss_with_its_gradient(temperature):
    torch.manual_seed(0)
    batch, length, vocab = 2, 6, 13
    s = torch.randn(batch, length, vocab, dtype=torch.float64, requires_grad=True)
    t = torch.randn(batch, length, vocab, dtype=torch.float64) * 2
    real = torch.ones(batch, length, dtype=torch.bool)
    real[0, 4:] = False
    labels = torch.randint(0, vocab, (batch, length)).masked_fill(~real, -100)
    logp, ids = top_k_logprobs(t, vocab, temperature)
    logp = logp.double()  # as a float64 store would hold them
    for loss, dense in ((topk_kd_loss(s, logp, ids, real, temperature), kd_loss(s, t, real, temperature)),
                        (topk_kd_and_lm_loss(s, logp, ids, labels, real, temperature)[0],
                         kd_and_lm_loss(s, t, labels, real, temperature)[0])):
        torch.testing.assert_close(loss, dense)
        torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(dense, s)[0])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_topk_losses_equal_their_definitions_with_gradients(temperature):
    torch.manual_seed(0)
    batch, length, vocab, k = 2, 6, 13, 4
    s = torch.randn(batch, length, vocab, dtype=torch.float64, requires_grad=True)
    logp, ids = top_k_logprobs(torch.randn(batch, length, vocab) * 2, k, temperature)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[0, 4:] = False
    labels = torch.randint(0, vocab, (batch, length)).masked_fill(~real, -100)
    labels[1, 2] = -100
    kd, lm = topk_kd_and_lm_loss(s, logp, ids, labels, real, temperature)
    ref_kd = topk_kd_loss(s, logp, ids, real, temperature)
    ref_lm = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    torch.testing.assert_close((kd, lm), (ref_kd, ref_lm))
    grad = torch.autograd.grad(0.3 * kd + 0.7 * lm, s)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(0.3 * ref_kd + 0.7 * ref_lm, s)[0])
    assert torch.autograd.gradcheck(lambda x: topk_kd_and_lm_loss(x, logp, ids, labels, real, temperature), (s,))


def test_small_k_is_close_to_the_dense_loss_for_a_peaked_teacher_and_never_above_it():
    torch.manual_seed(0)
    s, t = torch.randn(4, 16, 256), torch.randn(4, 16, 256) * 8  # the teacher's top 8 hold ~all its mass
    dense = float(kd_loss(s, t, None))
    logp, ids = top_k_logprobs(t, 8, 1.0)
    for values in (logp, logp.half()):
        sparse = float(topk_kd_loss(s, values, ids, None))
        assert 0.98 * dense < sparse <= dense * 1.001, (sparse, dense)
    flat = torch.randn(4, 16, 256) * 0.5  # a flat teacher: the top 8 miss most of what the full KL sees
    logp, ids = top_k_logprobs(flat, 8, 1.0)
    assert float(topk_kd_loss(s, logp, ids, None)) < 0.5 * float(kd_loss(s, flat, None))


def test_the_student_tail_gradient_survives_float32_underflow():
    """A student with e^-150 outside the teacher's top-k: the tail term still pulls, finite, as in float64."""
    torch.manual_seed(0)
    logp, ids = top_k_logprobs(torch.randn(1, 3, 50) * 3, 5, 1.0)
    s = torch.randn(1, 3, 50).scatter(-1, ids, 150.0)
    labels = torch.randint(0, 50, (1, 3))
    grads = []
    for x in (s.double().requires_grad_(), s.clone().requires_grad_()):
        kd, _ = topk_kd_and_lm_loss(x, logp, ids, labels, None)
        grads.append(torch.autograd.grad(kd, x)[0])
    assert torch.isfinite(grads[1]).all() and grads[1].abs().max() > 1e-4
    torch.testing.assert_close(grads[1].double(), grads[0], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------- Distillation
def data(c4_path, **kw) -> TextDataModule:
    args = dict(tokenizer="tiny-llama", source=str(c4_path), seq_len=32, batch_size=4, limit_documents=60,
                calibration_samples=4, max_train_windows=24)
    args.update(kw)
    return TextDataModule(**args)


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


def drop(**kw) -> LayerDrop:
    return LayerDrop(**{"target": "attn", "num": 1, "calibration_batch_size": 2, "verbose": False, **kw})


def fit(tmp_path, c4_path, steps=4, callbacks=(), layer_drop=None, **kw) -> tuple[DropModule, Distillation]:
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2, optimizer="sgd")  # updates proportional to the gradients
    d = Distillation(trainable="all", **kw)
    trainer(tmp_path, max_steps=steps, callbacks=[layer_drop or drop(), d, *callbacks]).fit(module, data(c4_path))
    return module, d


def test_a_store_with_k_the_vocabulary_trains_the_same_weights_as_the_live_teacher(tmp_path, c4_path):
    live, _ = fit(tmp_path, c4_path)
    stored, d = fit(tmp_path, c4_path, teacher_logits=str(tmp_path / "store"), teacher_logits_k=VOCAB,
                    teacher_logits_dtype="float32")
    assert d.teacher is None and len(d._store) == 24
    before = {k: v.clone() for k, v in DropModule("tiny-llama").state_dict().items()}  # a fresh init
    moved = 0.0
    for name, value in live.state_dict().items():
        torch.testing.assert_close(stored.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
        if name in before:
            moved = max(moved, float((value - before[name]).abs().max()))
    assert moved > 1e-3  # training moved the weights far more than the tolerance
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()}
    again, d = fit(tmp_path, c4_path, teacher_logits=str(tmp_path / "store"), teacher_logits_k=VOCAB,
                   teacher_logits_dtype="float32")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()} == written  # reused
    torch.testing.assert_close(again.state_dict(), stored.state_dict(), rtol=0, atol=0)


def test_training_holds_no_teacher_after_the_pre_pass(tmp_path, c4_path):
    seen = {}

    pl.seed_everything(0)
    d = Distillation(trainable="lora", teacher_logits=str(tmp_path / "store"), teacher_logits_k=16)

    class Watch(pl.Callback):  # listed between the drop and Distillation: the copy exists, no store yet
        def setup(self, trainer, pl_module, stage):
            seen["teacher"] = weakref.ref(d.teacher)

        def on_train_start(self, trainer, pl_module):
            gc.collect()
            seen["alive"] = seen["teacher"]() is not None

    tr = trainer(tmp_path, max_steps=2, callbacks=[drop(), Watch(), d])
    tr.fit(DropModule("tiny-llama"), data(c4_path))
    assert seen["alive"] is False and d.teacher is None
    assert torch.isfinite(tr.callback_metrics["train/kd_loss"]) and float(tr.callback_metrics["train/kd_loss"]) > 0


def test_resume_reads_the_store_when_the_teacher_is_gone(tmp_path, c4_path):
    """A teacher copied during training is not in the checkpoint: with a store it need not be."""
    store = str(tmp_path / "store")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    pl.seed_everything(0)
    first = Distillation(trainable="all", teacher_logits=store, teacher_logits_k=8)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True,
            callbacks=[drop(when="step", at_step=1), first, ckpt]).fit(DropModule("tiny-llama", lr=1e-2),
                                                                       data(c4_path))
    path = str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    state = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]["Distillation"]
    assert state["teacher_weights"] is None and state["teacher_logits"] == {"path": store,
                                                                           "digest": first._store.digest}
    d = Distillation(trainable="all", teacher_logits=store, teacher_logits_k=8)
    tr = trainer(tmp_path, max_steps=4, callbacks=[drop(when="step", at_step=1), d])
    tr.fit(DropModule("tiny-llama", lr=1e-2), data(c4_path), ckpt_path=path)
    assert tr.global_step == 4 and d.teacher is None and d._store.digest == first._store.digest
    assert float(tr.callback_metrics["train/kd_loss"]) > 0
    # the store replaced by another one: refused, not silently used
    write_store(store, teacher(seed=5), torch.from_numpy(np.array(first._store.windows)).long(), k=8, overwrite=True)
    d = Distillation(trainable="all", teacher_logits=store, teacher_logits_k=8)
    tr = trainer(tmp_path, max_steps=4, callbacks=[drop(when="step", at_step=1), d])
    with pytest.raises(MisconfigurationException, match="not the one the checkpoint trained with") as err:
        tr.fit(DropModule("tiny-llama", lr=1e-2), data(c4_path), ckpt_path=path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"teacher_logits_k": 0}, "teacher_logits_k must be an integer >= 1"),
    ({"teacher_logits_k": True}, "teacher_logits_k must be an integer >= 1"),
    ({"teacher_logits_k": 2.5}, "teacher_logits_k must be an integer >= 1"),
    ({"teacher_logits_dtype": "bfloat16"}, "teacher_logits_dtype must be one of float16, float32"),
    ({"teacher_logits": ""}, "teacher_logits must be a directory path or null"),
    ({"teacher_logits": 3}, "teacher_logits must be a directory path or null"),
    ({"teacher_logits": "store", "hidden_weight": 0.5}, "hidden_weight > 0 needs its hidden states"),
    ({"teacher_logits": "store", "alpha": 0.0}, "with alpha=0 nothing uses them"),
    ({"teacher_logits": "FOREIGN"}, "already exists and is not empty .*it is not a teacher-logit store"),
    ({"teacher_logits": "FILE"}, "exists and is not a directory"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, match):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    paths = {"FOREIGN": str(tmp_path / "foreign"), "FILE": str(tmp_path / "file"), "store": str(tmp_path / "s")}
    if isinstance(kwargs.get("teacher_logits"), str):
        kwargs = {**kwargs, "teacher_logits": paths.get(kwargs["teacher_logits"], kwargs["teacher_logits"])}
    with pytest.raises(MisconfigurationException, match=match) as err:
        Distillation(**kwargs)
    assert "\n" not in str(err.value) and str(err.value).startswith("Distillation: ")
    assert not (tmp_path / "s").exists()


def test_bad_setups_fail_before_training(tmp_path, c4_path):
    class Started(pl.Callback):
        started = False

        def on_train_start(self, trainer, pl_module):
            self.started = True

    for case, match in (("k", r"k must be an integer in \[1, 320\] \(the vocabulary\), got 400"),
                        ("dataloader", "training windows of a LightningDataModule")):
        started = Started()
        d = Distillation(teacher_logits=str(tmp_path / case), teacher_logits_k=400 if case == "k" else 8)
        layer_drop = drop() if case == "k" else drop(calibration_source=str(c4_path), calibration_samples=2,
                                                       calibration_seq_len=32)
        tr = trainer(tmp_path, max_steps=2, callbacks=[layer_drop, d, started])
        dm = data(c4_path)
        with pytest.raises(MisconfigurationException, match=match) as err:
            if case == "k":
                tr.fit(DropModule("tiny-llama"), dm)
            else:
                dm.setup("fit")
                tr.fit(DropModule("tiny-llama"), train_dataloaders=dm.train_dataloader())
        assert "\n" not in str(err.value) and not started.started and not (tmp_path / case).exists()


# --------------------------------------------------------------------------------------------------- DDP
@pytest.mark.xdist_group("processes")  # two processes: one such test at a time
def test_rank_zero_writes_the_store_and_both_ranks_train_from_it(tmp_path, c4_path, monkeypatch):
    """2 CPU processes: one write (rank zero), a barrier on both, both ranks read it; no teacher while training."""
    from test_ddp import assert_clean_ddp_run, run_ddp

    cb = "lightning_drop.callbacks."
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.lightning.module.DropModule",
                  "init_args": {"model": "tiny-llama", "lr": 3e-3}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
                 "init_args": {"tokenizer": "tiny-llama", "source": str(c4_path), "seq_len": 32, "batch_size": 2,
                               "limit_documents": 20, "calibration_samples": 4, "max_train_windows": 16}},
        "trainer": {"max_steps": 3, "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False, "enable_checkpointing": False,
                    "callbacks": [
                        {"class_path": cb + "LayerDrop",
                         "init_args": {"target": "attn", "num": 1, "calibration_batch_size": 2}},
                        {"class_path": cb + "Distillation",
                         "init_args": {"trainable": "all", "teacher_logits": "store", "teacher_logits_k": 8}},
                        {"class_path": "test_teacher_logits.TeacherFreed"}]}}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    tests = str(Path(__file__).parent)  # where both ranks import `TeacherFreed` from
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    run = run_ddp(tmp_path, ["--config", str(path)], timeout=120)
    assert_clean_ddp_run(run)
    assert run.count("teacher logits: writing the top-8 of 16 windows") == 1
    assert run.count("TEACHER FREED ON RANK") == 2, run.log[-3000:]
    assert read_manifest(tmp_path / "store")["rows"] == 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".store")] == []


class TeacherFreed(pl.Callback):
    """Prints, on each rank, that training started with a store and no teacher (checked by the DDP test)."""

    def on_train_start(self, trainer, pl_module):
        d = next(c for c in trainer.callbacks if isinstance(c, Distillation))
        if d.teacher is None and d._store is not None:
            print(f"TEACHER FREED ON RANK {trainer.global_rank}", flush=True)
