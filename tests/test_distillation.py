"""`Distillation` on tiny random-init models and the C4 sample: the loss, what trains, the teacher (copied before
fit-start, step and iterative drops, or loaded), bad input, resume through real checkpoint files; and on
SmolLM2-135M (slow) that distillation lowers held-out perplexity after dropping 8 attention layers."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_drop.callbacks import Distillation, LayerDrop, LoRARecovery
from lightning_drop.callbacks.distill_loss import hidden_loss, kd_and_lm_loss, kd_loss
from lightning_drop.lightning.datamodule import TextDataModule
from lightning_drop.lightning.module import DropModule
from lightning_drop.core.modeling_dropped import dropped_layers
from lightning_drop.io.text_data import load_documents, make_windows

torch.set_num_threads(1)
TRAIN_DOCS = 60  # the training windows come from the first documents, held-out ones from documents after them


def data(c4_path, **kw) -> TextDataModule:
    args = dict(tokenizer="tiny-llama", source=str(c4_path), seq_len=32, batch_size=4, limit_documents=TRAIN_DOCS,
                calibration_samples=4)
    args.update(kw)
    return TextDataModule(**args)


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


def drop(**kw) -> LayerDrop:
    args = dict(target="attn", num=1, calibration_batch_size=2, verbose=False)
    args.update(kw)
    return LayerDrop(**args)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value.float(), b[k].float(), rtol=0, atol=0, msg=k)


class Started(pl.Callback):
    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = True


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, c4_path) -> str:
    """A tiny Llama trained for 40 steps on the training documents: a teacher whose predictions matter."""
    out = tmp_path_factory.mktemp("pretrained")
    pl.seed_everything(0)
    base = DropModule("tiny-llama", lr=5e-3)
    trainer(out, max_steps=40).fit(base, data(c4_path, batch_size=8))
    return base.save_pretrained(out / "model")


# ------------------------------------------------------------------------------------------------ the loss
def test_kl_is_zero_when_student_equals_teacher_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for t in (0.5, 1.0, 4.0):
        assert float(kd_loss(logits, logits.clone(), real, t)) == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[0, 3:] = torch.randn(2, 11) * 5  # differs only at padding
    assert float(kd_loss(logits, other, real)) == pytest.approx(0.0, abs=1e-6)
    other[1, 0] += torch.randn(11)
    assert float(kd_loss(logits, other, real)) > 1e-3
    states = [torch.randn(2, 5, 8) for _ in range(4)]
    assert float(hidden_loss(states, [s.clone() for s in states], real, [0, 1, 2])) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_losses_equal_their_definitions_with_gradients(temperature):
    """KL and LM loss from one pass with a hand-written backward: values and gradients of the definitions
    (`kd_loss`, transformers' shifted cross-entropy), with padding and ignored labels."""
    torch.manual_seed(0)
    batch, length, vocab = 2, 6, 13
    s = torch.randn(batch, length, vocab, dtype=torch.float64, requires_grad=True)
    t = torch.randn(batch, length, vocab, dtype=torch.float64) * 2
    real = torch.ones(batch, length, dtype=torch.bool)
    real[0, 4:] = False
    labels = torch.randint(0, vocab, (batch, length)).masked_fill(~real, -100)
    labels[1, 2] = -100
    kd, lm = kd_and_lm_loss(s, t, labels, real, temperature)
    ref_kd = kd_loss(s, t, real, temperature)
    ref_lm = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    torch.testing.assert_close((kd, lm), (ref_kd, ref_lm))
    grad = torch.autograd.grad(0.3 * kd + 0.7 * lm, s)[0]
    ref = torch.autograd.grad(0.3 * ref_kd + 0.7 * ref_lm, s)[0]
    torch.testing.assert_close(grad, ref)
    assert torch.autograd.gradcheck(lambda x: kd_and_lm_loss(x, t, labels, real, temperature), (s,))
    low, _ = kd_and_lm_loss(s.detach().float(), t.bfloat16(), labels, real, temperature)  # a bf16 teacher
    assert abs(float(low) - float(ref_kd)) < 0.05


def test_objective_of_an_undropped_copy_has_zero_kl(c4_path):
    module = DropModule("tiny-llama")
    d = Distillation(alpha=0.5, hidden_weight=1.0)
    d._adopt(copy.deepcopy(module.hf_model), 0, None, None)  # the teacher before any drop: the student itself
    dm = data(c4_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch["attention_mask"][:, -5:] = 0  # padding must not count either
    loss, parts = d.objective(module, batch)
    assert float(parts["kd_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["hidden_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss) == pytest.approx(0.5 * float(parts["lm_loss"]), rel=1e-5)
    assert float(parts["lm_loss"]) == pytest.approx(float(module._loss(batch)), rel=1e-5)


def test_distillation_lowers_the_kl_on_held_out_windows(tmp_path, c4_path, pretrained):
    """Drop 2 blocks of a trained tiny model; 15 steps of distillation bring its held-out KL down."""
    docs = load_documents(str(c4_path))
    train_docs, held_docs = docs[:TRAIN_DOCS], docs[200:260]
    assert not set(train_docs) & set(held_docs)  # held-out text never overlaps the training windows
    module = DropModule(pretrained, lr=1e-3)
    held = make_windows(module.tokenizer, held_docs, 32, 16)
    d = Distillation(alpha=0.5, trainable="all")
    kl = {}

    def held_out_kl(student) -> float:
        with torch.no_grad():
            return float(kd_loss(student(input_ids=held).logits, d.teacher(input_ids=held).logits, None))

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            kl["dropped"] = held_out_kl(pl_module.model)

    pl.seed_everything(0)
    tr = trainer(tmp_path, max_steps=15, callbacks=[drop(target="block", num=2), d, Probe()])
    tr.fit(module, data(c4_path, batch_size=8))
    kl["recovered"] = held_out_kl(module.model)
    assert kl["dropped"] > 0.05  # the drop hurt
    assert kl["recovered"] < 0.3 * kl["dropped"], kl
    logged = tr.callback_metrics
    assert {"train/kd_loss", "train/lm_loss", "train/loss"} <= set(logged)
    assert float(logged["train/loss"]) == pytest.approx(
        0.5 * float(logged["train/kd_loss"]) + 0.5 * float(logged["train/lm_loss"]), rel=1e-4)


# --------------------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("trainable, layers, expected", [
    ("lora", None, lambda n: "lora_" in n),
    ("all", None, lambda n: True),
    ("layers", [2, 3], lambda n: ".layers.2." in n or ".layers.3." in n),
    ("layers", "near_drops", lambda n: any(f".layers.{i}." in n for i in (0, 1, 2))),
    ("layers", "last:1", lambda n: ".layers.3." in n),
])
def test_only_the_trainable_set_learns_and_the_teacher_stays(tmp_path, c4_path, trainable, layers, expected):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    d = Distillation(trainable=trainable, layers=layers, merge=False, hidden_weight=0.1)
    seen = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["params"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            seen["trainable"] = {n for n, p in pl_module.named_parameters() if p.requires_grad}
            seen["teacher"] = weights(d.teacher)

    tr = trainer(tmp_path, max_steps=2, callbacks=[drop(keep=[0, 2, 3]), d, Snapshot()])  # drops attention 1
    tr.fit(module, data(c4_path))
    assert module.drop_plan() == ([1], [])
    assert seen["trainable"] == {n for n in seen["params"] if expected(n)} and seen["trainable"]
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, seen["params"][n])}
    assert changed == seen["trainable"]
    teacher = d.teacher
    assert dropped_layers(teacher) == ([], []) and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert_same(weights(teacher), seen["teacher"])
    assert not any(p is q for p in teacher.parameters() for q in module.parameters())


# --------------------------------------------------------------------------------------- the teacher
@pytest.mark.parametrize("when", ["fit_start", "step", "iterative"])
def test_the_teacher_is_the_model_before_the_first_drop(tmp_path, c4_path, when):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    initial = weights(module.hf_model)
    layer_drop = {"fit_start": drop(), "step": drop(when="step", at_step=2),
                  "iterative": drop(num=2, schedule="iterative", step=1, every_n_steps=2)}[when]
    d = Distillation(trainable="all")
    seen = {}

    class BeforeTheStepDrop(pl.Callback):  # listed first: sees the weights after step 2, before the drop
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                seen["step2"] = weights(pl_module.hf_model)

    tr = trainer(tmp_path, max_steps=4, callbacks=[BeforeTheStepDrop(), layer_drop, d])
    tr.fit(module, data(c4_path))
    assert layer_drop.finished and dropped_layers(d.teacher) == ([], [])
    assert_same(weights(d.teacher), seen["step2"] if when == "step" else initial)
    assert d.teacher_step == (2 if when == "step" else 0)
    assert d.started_at == {"fit_start": 0, "step": 2, "iterative": 2}[when]  # once every round is done
    state = d.state_dict()
    assert (state["teacher_weights"] is not None) == (when == "step")  # trained weights found nowhere else


def test_teacher_in_lower_precision_and_lm_only_control(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    d = Distillation(teacher_dtype="bfloat16", teacher_device="cpu", trainable="all")
    tr = trainer(tmp_path, max_steps=2, callbacks=[drop(), d])
    tr.fit(module, data(c4_path))
    assert {p.dtype for p in d.teacher.parameters()} == {torch.bfloat16}
    assert module.training_objective is None  # the fit is over: a later fit trains on the LM loss again
    assert math.isfinite(float(tr.callback_metrics["train/kd_loss"]))
    assert next(module.parameters()).dtype == torch.float32
    # alpha = hidden_weight = 0: the LM loss alone on the same trainable set, no teacher copied
    control = Distillation(alpha=0.0, trainable="layers", layers="near_drops")
    tr = trainer(tmp_path, max_steps=2, callbacks=[drop(), control])
    tr.fit(DropModule("tiny-llama"), data(c4_path))
    assert control.teacher is None and "train/kd_loss" not in tr.callback_metrics
    assert float(tr.callback_metrics["train/loss"]) == pytest.approx(float(tr.callback_metrics["train/lm_loss"]))


def test_teacher_reference_for_a_dropped_model(tmp_path, c4_path, pretrained):
    """A model dropped earlier (a dropped checkpoint) recovers from a teacher given by reference."""
    dropped = DropModule(pretrained)
    dropped.apply_drop(attn=[1, 2])
    dropped_dir = dropped.save_pretrained(tmp_path / "dropped")
    module = DropModule(dropped_dir, lr=1e-3)
    d = Distillation(teacher=pretrained, trainable="layers", layers="near_drops", hidden_weight=0.5)
    tr = trainer(tmp_path, max_steps=2, callbacks=[d])
    tr.fit(module, data(c4_path))
    assert dropped_layers(d.teacher) == ([], []) and module.drop_plan() == ([1, 2], [])
    assert_same(weights(d.teacher), weights(DropModule(pretrained).hf_model))
    assert {"train/kd_loss", "train/hidden_loss"} <= set(tr.callback_metrics)


class RoundProbe(pl.Callback):
    """What the model looked like at each step: dropped attention layers, LoRA attached, trainable count."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int], bool, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        in_optimizer = sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])
        assert in_optimizer == trainable, "the optimizer must hold exactly the trainable set after each round"
        self.seen.append((trainer.global_step, pl_module.drop_plan().attn, pl_module.lora_config is not None,
                          trainable))


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_heal_between_rounds_trains_after_every_round_and_scores_the_healed_model(tmp_path, c4_path, trainable):
    """Drop 1 attention layer per round every 2 steps, healing in between: the teacher is the undropped model,
    recovery trains from the first round on, LoRA is merged before each later round (the scores of round 2 are
    those of the healed model) and fresh adapters are trained after it."""
    from lightning_drop.scoring import importance

    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    undropped = weights(module.hf_model)
    scored_with_lora: list[bool] = []
    real_compute = importance.compute_importance

    def spy(model, *args, **kw):
        scored_with_lora.append(any("lora_" in name for name, _ in model.named_parameters()))
        return real_compute(model, *args, **kw)

    layer_drop = drop(num=2, schedule="iterative", step=1, every_n_steps=2)
    d = Distillation(alpha=0.5, trainable=trainable, r=2, start="first_drop")
    probe = RoundProbe()
    tr = trainer(tmp_path, max_steps=5, callbacks=[layer_drop, d, probe])
    import unittest.mock

    with unittest.mock.patch.object(importance, "compute_importance", spy):
        tr.fit(module, data(c4_path))
    assert [len(attn) for _, attn, _, _ in probe.seen] == [1, 1, 2, 2, 2]  # round 2 after step 2
    assert d.started_at == 0 and layer_drop.finished
    assert_same(weights(d.teacher), undropped)  # the teacher: the model before the first round
    # the trainable set follows the model: one attention layer less to train (or adapt) after round 2
    assert probe.seen[0][3] == probe.seen[1][3] > probe.seen[2][3] == probe.seen[4][3]
    if trainable == "lora":
        assert all(lora for _, _, lora, _ in probe.seen) and d.merged
        assert scored_with_lora == [False, True]  # round 2 scored the healed model, adapters still on
    else:
        assert scored_with_lora == [False, False] and not any(lora for _, _, lora, _ in probe.seen)
    assert module.drop_plan().attn == sorted(module.drop_plan().attn) and len(module.drop_plan().attn) == 2


def test_first_drop_start_needs_a_drop_schedule(tmp_path, c4_path):
    tr = trainer(tmp_path, max_steps=2, callbacks=[Distillation(start="first_drop", teacher="tiny-llama")])
    with pytest.raises(MisconfigurationException, match="start='first_drop' heals between the rounds"):
        tr.fit(DropModule("tiny-llama"), data(c4_path))


def test_teacher_given_as_a_model_object(tmp_path, c4_path):
    """From Python the teacher may be a model: used as it is, frozen; a student dropped beforehand recovers,
    and an undropped student (a control) trains on the same loss."""
    teacher = DropModule("tiny-llama").hf_model
    reference = weights(teacher)
    for drop_attn in ([1], []):
        module = DropModule("tiny-llama", lr=1e-2)
        module.model.load_state_dict(reference)
        module.apply_drop(attn=drop_attn)
        d = Distillation(alpha=1.0, trainable="all", teacher=teacher)
        tr = trainer(tmp_path, max_steps=2, callbacks=[d])
        tr.fit(module, data(c4_path))
        assert d.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
        assert_same(weights(teacher), reference)
        assert module.drop_plan().attn == drop_attn and "train/kd_loss" in tr.callback_metrics
    from lightning_drop.io.tiny_models import tiny_model

    other, _ = tiny_model("llama", vocab_size=400)
    tr = trainer(tmp_path, max_steps=2, callbacks=[Distillation(teacher=other)])
    with pytest.raises(MisconfigurationException, match="has a vocabulary of 400 tokens, the student 320"):
        tr.fit(DropModule("tiny-llama"), data(c4_path))


def test_one_training_objective_at_a_time():
    module = DropModule("tiny-llama")
    first, second = Distillation(), Distillation()
    module.set_training_objective(first.objective)
    module.set_training_objective(first.objective)  # the same one again is fine
    with pytest.raises(MisconfigurationException, match="only one recovery callback may set the training loss"):
        module.set_training_objective(second.objective)
    module.set_training_objective(None)
    module.set_training_objective(second.objective)
    assert module.training_objective == second.objective


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"alpha": True}, "alpha must be a finite number"),
    ({"temperature": 0}, "temperature must be > 0"),
    ({"temperature": -2.0}, "temperature must be > 0"),
    ({"hidden_weight": -1}, "hidden_weight must be >= 0"),
    ({"trainable": "heads"}, "unknown trainable 'heads'"),
    ({"trainable": "layers"}, "the empty trainable set"),
    ({"trainable": "layers", "layers": []}, "the empty trainable set"),
    ({"trainable": "layers", "layers": "last:0"}, "the empty trainable set"),
    ({"trainable": "layers", "layers": "middle"}, "unknown layers 'middle'"),
    ({"trainable": "layers", "layers": [-1]}, "indices >= 0"),
    ({"layers": [1]}, "only used with trainable='layers'"),
    ({"teacher": ""}, "teacher must be a model reference"),
    ({"teacher_dtype": "int8"}, "teacher_dtype must name a floating torch dtype"),
    ({"teacher_device": "gpu0"}, "teacher_device must name a device"),
    ({"r": 0}, "r must be an integer >= 1"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"start": "later"}, "unknown start 'later'"),
])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match) as err:
        Distillation(**kwargs)
    assert "\n" not in str(err.value)


def _other_vocabulary_teacher(path) -> str:
    from lightning_drop.io.tiny_models import tiny_model

    model, tok = tiny_model("llama", vocab_size=400)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("missing", "teacher '.*missing' does not load: "),
    ("vocabulary", "has a vocabulary of 400 tokens, the student 320"),
    ("tokenizer", r"another tokenizer than the student \(2 tokens map to other ids\)"),
    ("no_drop", "no drop configured: list a LayerDrop before it"),
    ("listed_first", "no drop configured"),
    ("fit_end", "nothing to recover"),
    ("two_recoveries", "use one recovery callback"),
    ("layers", r"layers \[7\] out of range: the model has 4 layers"),
    ("last", r"layers='last:5' asks for more than the model's 4 layers"),
])
def test_bad_setups_fail_before_training(tmp_path, c4_path, monkeypatch, case, match):
    callbacks = [drop(), Distillation()]
    if case == "missing":
        callbacks[1] = Distillation(teacher=str(tmp_path / "missing"))
    elif case == "vocabulary":
        callbacks[1] = Distillation(teacher=_other_vocabulary_teacher(tmp_path / "big"))
    elif case == "tokenizer":
        from lightning_drop.io import model_loading

        real = model_loading.load_model

        def swapped_tokens(ref, **kw):
            model, tok = real("tiny-llama", **kw)
            vocab = dict(tok.get_vocab())
            a, b = "a", "b"
            vocab[a], vocab[b] = vocab[b], vocab[a]
            return model, type("Tok", (), {"get_vocab": lambda self: vocab})()

        monkeypatch.setattr(model_loading, "load_model", swapped_tokens)
        callbacks[1] = Distillation(teacher="tiny-llama")
    elif case == "no_drop":
        callbacks = [Distillation()]
    elif case == "listed_first":
        callbacks = callbacks[::-1]
    elif case == "fit_end":
        callbacks[0] = drop(when="fit_end")
    elif case == "two_recoveries":
        callbacks.append(LoRARecovery())
    elif case == "layers":
        callbacks[1] = Distillation(trainable="layers", layers=[1, 7])
    elif case == "last":
        callbacks[1] = Distillation(trainable="layers", layers="last:5")
    started = Started()
    tr = trainer(tmp_path, max_steps=2, callbacks=[*callbacks, started])
    with pytest.raises(MisconfigurationException, match=match) as err:
        tr.fit(DropModule("tiny-llama"), data(c4_path))
    assert "\n" not in str(err.value) and not started.started and tr.global_step == 0


# --------------------------------------------------------------------------------------------- resume
def _fit_with_checkpoint(tmp_path, c4_path, layer_drop, **kw) -> tuple[Distillation, DropModule, str]:
    pl.seed_everything(0)
    module = DropModule("tiny-llama", lr=1e-2)
    d = Distillation(**kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    tr = trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[layer_drop, d, ckpt])
    tr.fit(module, data(c4_path))
    return d, module, str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")


@pytest.mark.parametrize("path_known", [True, False])
def test_resume_rebuilds_a_fit_start_teacher_from_the_source_model(tmp_path, c4_path, path_known):
    first, _, path = _fit_with_checkpoint(tmp_path, c4_path, drop(), trainable="layers", layers="near_drops")
    assert first.state_dict()["teacher_weights"] is None  # the source model is the teacher: nothing stored
    d = Distillation(trainable="layers", layers="near_drops")
    tr = trainer(tmp_path, max_steps=4, callbacks=[drop(), d])
    pl.seed_everything(0)  # DropModule("tiny-llama") is a random init: the same seed rebuilds the same model
    module = DropModule("tiny-llama", lr=1e-2)
    if path_known:  # as `lightning-drop fit --ckpt_path` does
        tr.ckpt_path = path
        tr.fit(module, data(c4_path))
    else:
        tr.fit(module, data(c4_path), ckpt_path=path)
    assert tr.global_step == 4 and d.started_at == 0 and d.teacher_step == 0
    assert_same(weights(d.teacher), weights(first.teacher))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".layers.{i}." in n for i in d.trainable.layer_indices(module.hf_model))
                             for n in trainable)


def test_resume_loads_a_teacher_copied_during_training(tmp_path, c4_path):
    first, _, path = _fit_with_checkpoint(tmp_path, c4_path, drop(when="step", at_step=1), trainable="all",
                                          teacher_dtype="bfloat16")
    saved = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]["Distillation"]
    assert saved["teacher_step"] == 1 and saved["teacher_weights"] is not None
    d = Distillation(trainable="all", teacher_dtype="bfloat16")
    layer_drop = drop(when="step", at_step=1)
    tr = trainer(tmp_path, max_steps=4, callbacks=[layer_drop, d])
    module = DropModule("tiny-llama", lr=1e-2)
    tr.fit(module, data(c4_path), ckpt_path=path)
    assert tr.global_step == 4 and d.started_at == 1 and d.teacher_step == 1
    assert dropped_layers(d.teacher) == ([], []) and not d.teacher.training
    assert_same(weights(d.teacher), weights(first.teacher))
    assert not any(p.requires_grad for p in d.teacher.parameters())


def test_resume_refuses_a_teacher_that_cannot_be_rebuilt(tmp_path, c4_path):
    pl.seed_everything(0)
    module = DropModule(init_config={"model_type": "llama"}, lr=1e-2)  # random init: seeded here only
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    tr = trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[drop(), Distillation(), ckpt])
    tr.fit(module, data(c4_path))
    pl.seed_everything(1)
    other = DropModule(init_config={"model_type": "llama"})
    started = Started()
    tr = trainer(tmp_path, max_steps=4, callbacks=[drop(), Distillation(), started])
    with pytest.raises(MisconfigurationException, match="teacher rebuilt from the module's source model differs"):
        tr.fit(other, data(c4_path), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert not started.started


# ------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_distillation_lowers_held_out_perplexity_of_smollm2_with_8_attention_layers_dropped(tmp_path, c4_path):
    """SmolLM2-135M, the 8 most redundant attention layers dropped, 10 steps (4 x 128 tokens) of LoRA on half
    KL, half LM loss over C4 documents 0-99; perplexity on documents 250-299 (never in a training window)
    falls by at least half the gap the drop opened (-s prints the numbers)."""
    from lightning_drop.measure.evaluation import perplexity

    docs = load_documents(str(c4_path))
    assert not set(docs[:100]) & set(docs[250:])
    module = DropModule("smollm2-135m", lr=1e-3)
    held = make_windows(module.tokenizer, docs[250:], 128, 24)
    ppl = {"base": perplexity(module.hf_model, held)}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            ppl["dropped"] = perplexity(pl_module.hf_model, held)

    pl.seed_everything(0)
    dm = data(c4_path, tokenizer="smollm2-135m", seq_len=128, batch_size=4, limit_documents=100,
              calibration_samples=8)
    d = Distillation(alpha=0.5, temperature=1.0, trainable="lora", r=16, lora_alpha=32, lora_dropout=0.0)
    tr = trainer(tmp_path, max_steps=10, callbacks=[drop(num=8, calibration_batch_size=4), d, Probe()])
    tr.fit(module, dm)
    ppl["recovered"] = perplexity(module.hf_model, held)
    print(f"SmolLM2-135M held-out perplexity: base {ppl['base']:.2f}, 8 attention layers dropped "
          f"{ppl['dropped']:.2f}, after 10 steps of distillation {ppl['recovered']:.2f} "
          f"({(ppl['dropped'] - ppl['recovered']) / (ppl['dropped'] - ppl['base']):.0%} of the gap recovered)")
    assert len(module.drop_plan()[0]) == 8 and d.merged
    assert ppl["dropped"] > ppl["base"] * 1.2, ppl
    assert ppl["recovered"] < ppl["dropped"] - 0.5 * (ppl["dropped"] - ppl["base"]), ppl
