"""Tensor parallelism under FSDP2 (`DropModule(tp_plan=...)` with `tensor_parallel_size` 2) on 2 CPU processes
(gloo), through the real command line and tests/test_sharded.py's runs and helpers.

- The shipped overlay `configs/sharded/tensor_parallel.yaml` (the plan transformers ships, `tp_plan: auto`)
  on a full-weight fit with a fit-start and a mid-fit drop, the importance tracker and a fit-end perplexity
  gives the drops, losses (within float tolerance), scores, perplexity and saved checkpoint of the same fit on
  one process (both ranks of the tensor-parallel run see every batch, as the one process does).
- What cannot run split (LoRA, Distillation, `load_sharded`) and plans that do not fit the model end every
  rank with one line at setup, none left waiting.
- The overlay composes with a full-weight config as docs/scale.md shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_ddp import CONFIGS, assert_clean_ddp_run, run_ddp
from test_sharded import DROP_LINE, FSDP2_FLAGS, assert_same_checkpoint, losses, tiny_config

TP_OVERLAY = CONFIGS / "sharded" / "tensor_parallel.yaml"
TP_FLAGS = ("--config", str(TP_OVERLAY))  # the shipped overlay: cpu, 2 devices, tensor parallelism over both
CB = "lightning_drop.callbacks."
CALIBRATION = {"calibration_seq_len": 32, "calibration_samples": 4, "calibration_batch_size": 2}


def tp_fit_config(tmp_path: Path, c4_path: Path) -> Path:
    """4 full-weight steps: attention drops at steps 0 (fit start) and 2, tracked, measured at fit end, saved.

    SGD with momentum and gradient norm clipping below every step's norm: the clipped step is the total norm
    over all processes' splits (Adam would hide a wrong norm by normalizing it away)."""
    path = tiny_config(tmp_path, c4_path, [
        {"class_path": CB + "PerplexityCallback",
         "init_args": {"data": str(c4_path), "seq_len": 32, "num_windows": 4, "output": "ppl.json"}},
        {"class_path": CB + "LayerDrop", "init_args": {"target": "attn", "num": 2, "schedule": "iterative",
                                                        "every_n_steps": 2, **CALIBRATION}},
        {"class_path": CB + "ImportanceTracker", "init_args": {"every_n_steps": 2, "output_dir": "tracker",
                                                                "heatmap": False, **CALIBRATION}}], max_steps=4,
        optimizer="sgd", lr=0.5)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["gradient_clip_val"] = 0.1
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.xdist_group("processes")  # two processes: one such test at a time
def test_tensor_parallel_fit_equals_one_process(tmp_path, c4_path):
    import torch

    config = tp_fit_config(tmp_path, c4_path)
    # the reference: the same fit on one process (data-parallel size 1, as the tensor-parallel run's)
    one = run_ddp(tmp_path / "one", ["--config", str(config)], timeout=240,
                  flags=(*FSDP2_FLAGS, "--trainer.devices", "1"))
    tp = run_ddp(tmp_path / "tp", ["--config", str(config)], timeout=240, flags=TP_FLAGS)
    assert one.returncode == 0 and "Traceback" not in one.log, one.log[-3000:]
    assert_clean_ddp_run(tp)
    for run in (one, tp):
        assert run.count("saved the dropped model to saved") == 1
    assert "tensor parallelism over 2 processes: split " in tp.log and "tensor parallelism" not in one.log
    rounds = DROP_LINE.findall(tp.log)
    assert rounds == DROP_LINE.findall(one.log)
    assert [r.split(" at step ")[1].split(":")[0] for r in rounds] == ["0", "2"]
    assert tp.count("dropped inside the sharded model: rebuilt only the changed layers [") == 1
    loss_one, loss_tp = losses(one.cwd), losses(tp.cwd)
    assert sorted(loss_one) == sorted(loss_tp) == [0, 1, 2, 3] and len(set(loss_one.values())) == 4
    torch.testing.assert_close(torch.tensor(list(loss_tp.values())), torch.tensor(list(loss_one.values())),
                               atol=1e-5, rtol=1e-5)
    history = {name: json.loads((run.cwd / "tracker" / "importance_history.json").read_text())["history"]
               for name, run in (("one", one), ("tp", tp))}
    assert [e["step"] for e in history["tp"]] == [e["step"] for e in history["one"]] == [0, 2, 4]
    for a, b in zip(history["tp"], history["one"]):
        assert [v is None for v in a["attn"]] == [v is None for v in b["attn"]]
        assert [x for x in a["attn"] if x is not None] == pytest.approx([x for x in b["attn"] if x is not None],
                                                                          abs=1e-4)
    ppl_one, ppl_tp = (json.loads((run.cwd / "ppl.json").read_text())["perplexity"] for run in (one, tp))
    assert ppl_tp == pytest.approx(ppl_one, rel=1e-5) and ppl_one > 1
    # a rowwise layer sums its processes' partial products, in another order than one process's matmul; Adam's
    # normalized steps carry such last-bit differences into the weights (measured: one weight of 8192, 1.3e-5)
    assert_same_checkpoint(one.cwd / "saved", tp.cwd / "saved", atol=5e-5)


# ------------------------------------------------------------------------------------ bad plans, refused
def tp_module(model: str = "tiny-llama", **kwargs: object):
    """A DropModule under a constructed (not launched) FSDP2Strategy with data-parallel size 1, tensor size 2."""
    from types import SimpleNamespace

    from lightning_drop.lightning.distributed import FSDP2Strategy
    from lightning_drop.lightning.module import DropModule

    module = DropModule(model, **kwargs)
    module._trainer = SimpleNamespace(strategy=FSDP2Strategy(data_parallel_size=1, tensor_parallel_size=2),
                                      datamodule=None, callbacks=[], max_steps=10, ckpt_path=None, global_step=0)
    return module


@pytest.mark.parametrize("kwargs, tp, message", [
    ({}, 2, "tensor parallelism needs a plan: set model.init_args.tp_plan: auto (the plan transformers ships"),
    ({"model": "tiny-gpt2", "tp_plan": "auto"}, 2,
     "tp_plan: auto, but transformers ships no tensor-parallel plan for gpt2: give tp_plan as a mapping"),
    ({"model": "tiny-qwen3", "tp_plan": "auto"}, 2,
     "the qwen3 plan transformers ships uses the style(s) replicated_with_grad_allreduce; only colwise and rowwise"),
    ({"tp_plan": {"layers.*.self_attn.q_proj": "colwise_rep"}}, 2, "tp_plan uses the style(s) colwise_rep;"),
    ({"tp_plan": {"layers.*.attn.q_proj": "colwise"}}, 2,
     "tp_plan: 'layers.*.attn.q_proj' matches no module of the model (names are relative to its base model, e.g. "
     "layers.0.self_attn.q_proj)"),
    ({"tp_plan": {"layers.*.self_attn": "colwise"}}, 2,
     "tp_plan: 'layers.*.self_attn' matches layers.0.self_attn, a LlamaAttention: colwise and rowwise split linear"),
    ({"tp_plan": "auto"}, 3, "tensor_parallel_size=3 does not divide the model's num_attention_heads=4"),
    ({"tp_plan": "auto"}, 4, "tensor_parallel_size=4 does not divide the model's num_key_value_heads=2"),
    ({"tp_plan": "auto", "init_config": {"intermediate_size": 129}}, 2,
     "tensor_parallel_size=2 does not divide the model's intermediate_size=129"),
])
def test_a_plan_that_does_not_fit_is_one_line_at_setup(kwargs, tp, message):
    """Checked on the model before anything is split (every rank computes the same answer, no collective)."""
    from lightning_drop.errors import UserError

    module = tp_module(**kwargs)
    module.trainer.strategy._tensor_parallel_size = tp
    with pytest.raises(UserError) as err:
        module.setup("fit")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_what_cannot_run_split_is_refused_at_setup(tmp_path):
    """LoRA adapters, Distillation and `load_sharded` name `tensor_parallel_size: 1`; the plan is ignored (and the
    model set up as usual) without a tensor-parallel dimension."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_drop import save_dropped
    from lightning_drop.callbacks import Distillation, LayerDrop, LoRARecovery
    from lightning_drop.errors import UserError
    from lightning_drop.io.model_loading import tiny_model

    module = tp_module(tp_plan="auto")
    module.setup("fit")  # the plan fits
    for callback, what in ((LoRARecovery(r=2), "LoRARecovery"), (Distillation(), "Distillation")):
        module.trainer.callbacks = [LayerDrop(num=1), callback]
        with pytest.raises(MisconfigurationException, match=rf"^{what} \(.*\) cannot run with tensor parallelism "
                                                           r"\(tensor_parallel_size=2\): use tensor_parallel_size: 1$"):
            callback.setup(module.trainer, module, "fit")
    assert module.lora_config is None
    model, tokenizer = tiny_model("llama")
    save_dropped(model, tmp_path / "whole", tokenizer=tokenizer)
    with pytest.raises(UserError, match="load_sharded reads each process's data-parallel rows, not tensor-parallel "
                                        r"splits: load the model whole \(load_sharded: false\) or use "
                                        "tensor_parallel_size: 1"):
        tp_module(str(tmp_path / "whole"), load_sharded=True, tp_plan="auto").setup("fit")
    plain = tp_module(tp_plan={"nothing.*": "colwise"})
    plain.trainer.strategy._tensor_parallel_size = 1
    plain.setup("fit")


@pytest.mark.xdist_group("processes")  # two processes: one such test at a time
@pytest.mark.parametrize("extra, message", [
    (("--trainer.callbacks+=lightning_drop.callbacks.LoRARecovery",),
     "LoRARecovery (LoRA adapters on tensor-parallel layers) cannot run with tensor parallelism "
     "(tensor_parallel_size=2): use tensor_parallel_size: 1"),
    (("--model.init_args.init_config", "{num_key_value_heads: 1}"),
     "tensor_parallel_size=2 does not divide the model's num_key_value_heads=1"),
])
def test_bad_tensor_parallel_setups_end_every_rank_in_one_line(tmp_path, c4_path, extra, message):
    """Through the command line with the shipped overlay: one line on each rank that started, none left waiting."""
    config = tiny_config(tmp_path, c4_path, [
        {"class_path": CB + "LayerDrop", "init_args": {"target": "attn", "num": 1, **CALIBRATION}}])
    run = run_ddp(tmp_path / "run", ["--config", str(config), *extra], timeout=180, flags=TP_FLAGS)
    assert run.returncode == 2, run.log[-3000:]
    errors = [line for line in run.log.splitlines() if "error: " in line]
    assert errors and all(message in line for line in errors), run.log[-3000:]
    assert "Traceback (most recent call last)" not in run.log and not (run.cwd / "saved").exists()


def test_overlay_composes_with_a_full_weight_config(capsys):
    """The command docs/scale.md shows: the overlay gives the module the shipped plan and Lightning's layout."""
    from lightning_drop.lightning.cli import run_lightning_cli

    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(CONFIGS / "track_random_init.yaml"), *TP_FLAGS, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["tp_plan"] == "auto" and printed["model"]["init_args"]["model"] == "tiny-llama"
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_drop.lightning.distributed.FSDP2Strategy"
    assert strategy["init_args"]["tensor_parallel_size"] == strategy["init_args"]["data_parallel_size"] == "auto"
