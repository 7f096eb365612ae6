"""FSDP2 (Lightning's ModelParallelStrategy, `--trainer.strategy fsdp2`) on 2 CPU processes (gloo), through the
real command line, under the hard timeouts of tests/test_ddp.py's runner (a hang kills the process group and
fails the test).

- The same 5-step fit (fixed seed, fit-start drop, LoRA, a fit-end perplexity, saved dropped checkpoint) under
  DDP and under FSDP2 with the shipped overlay `configs/sharded/recover_fsdp2.yaml` makes the same drop, the
  same losses within floating-point tolerance, the same perplexity and the same saved checkpoint.
- Mid-training drops rebuild only the layers they change and give DDP's drops, losses and checkpoint.
- (slow) A mid-training iterative drop with the tracker and distillation runs sharded to the end; a sharded
  checkpoint resumes with the same losses, also on 1 process; a resume from another drop plan is refused.
- The dropped checkpoint written from sharded weights with large tensors gathered in row slices equals the
  unsharded model's.
- Bad setups end every started rank with one line, none left waiting.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from test_ddp import CONFIGS, assert_clean_ddp_run, run_ddp

# several processes each: pytest-xdist (`--dist loadgroup`) runs these one at a time on one worker
pytestmark = pytest.mark.xdist_group("processes")

OVERLAY = CONFIGS / "sharded" / "recover_fsdp2.yaml"
FSDP2_FLAGS = ("--config", str(OVERLAY))  # the shipped overlay: cpu, 2 devices, FSDP2Strategy
DROP_LINE = re.compile(r"LayerDrop round \d+ at step \d+: dropped attention \[[^\]]*\], MLP \[[^\]]*\]")


def tiny_config(tmp_path: Path, c4_path: Path, callbacks: list[dict], max_steps: int = 5, **model: object) -> Path:
    """A 5-step fit of tiny-llama on C4 windows, logging every step's loss to a CSV file."""
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.lightning.module.DropModule",
                  "init_args": {"model": "tiny-llama", "lr": 1.0e-3, "save_dir": "saved", **model}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
                 "init_args": {"tokenizer": "tiny-llama", "source": str(c4_path), "seq_len": 32, "batch_size": 2,
                               "limit_documents": 40, "calibration_samples": 4}},
        "trainer": {"max_steps": max_steps, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_checkpointing": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": "logs", "name": "run"}},
                    "callbacks": callbacks},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def drop_and_lora() -> list[dict]:
    cb = "lightning_drop.callbacks."
    return [{"class_path": cb + "LayerDrop", "init_args": {"target": "attn", "num": 2, "calibration_seq_len": 32,
                                                            "calibration_samples": 4, "calibration_batch_size": 2}},
            {"class_path": cb + "LoRARecovery", "init_args": {"r": 4, "alpha": 8, "dropout": 0.0}}]


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step from the CSV logger of the one run under `run_dir/logs/run`."""
    versions = sorted((run_dir / "logs" / "run").iterdir())
    assert len(versions) == 1, versions
    with (versions[0] / "metrics.csv").open() as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


def saved_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_checkpoint(a: Path, b: Path, atol: float = 1e-5) -> None:
    import torch

    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert config_a == config_b
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert sorted(ta) == sorted(tb) and not [k for k in ta if "lora_" in k]
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=1e-5, msg=key)


# ------------------------------------------------------------------------------ DDP == FSDP2 (5 steps)
def test_fsdp2_fit_equals_ddp(tmp_path, c4_path, monkeypatch):
    import torch

    scratch = tmp_path / "scratch"  # the processes' TMPDIR: where rank zero gathers the sharded weights
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    measure = {"class_path": "lightning_drop.callbacks.PerplexityCallback",  # listed first: it asks for the merge
               "init_args": {"data": str(c4_path), "seq_len": 32, "num_windows": 4, "output": "ppl.json"}}
    config = tiny_config(tmp_path, c4_path, [measure, *drop_and_lora()])
    ddp = run_ddp(tmp_path / "ddp", ["--config", str(config)], timeout=240)
    fsdp = run_ddp(tmp_path / "fsdp2", ["--config", str(config)], timeout=240, flags=FSDP2_FLAGS)
    for run in (ddp, fsdp):
        assert_clean_ddp_run(run)
        assert "`Trainer.fit` stopped: `max_steps=5` reached." in run.log
        assert run.count("saved the dropped model to saved") == 1  # rank zero writes, once
    assert "FSDPPeftModelForCausalLM" in fsdp.log and "FSDP" not in ddp.log  # the model really was sharded
    assert DROP_LINE.findall(fsdp.log) == DROP_LINE.findall(ddp.log) and len(DROP_LINE.findall(ddp.log)) == 1
    loss_ddp, loss_fsdp = losses(ddp.cwd), losses(fsdp.cwd)
    assert sorted(loss_ddp) == sorted(loss_fsdp) == [0, 1, 2, 3, 4]
    assert len(set(loss_ddp.values())) == 5  # it trained: every step's loss differs
    torch.testing.assert_close(torch.tensor(list(loss_fsdp.values())), torch.tensor(list(loss_ddp.values())),
                               atol=1e-5, rtol=1e-5)
    assert_same_checkpoint(ddp.cwd / "saved", fsdp.cwd / "saved")
    # the fit-end measurement saw the same final model (gathered on rank zero under FSDP2)
    ppl_ddp, ppl_fsdp = (json.loads((run.cwd / "ppl.json").read_text())["perplexity"] for run in (ddp, fsdp))
    assert ppl_fsdp == pytest.approx(ppl_ddp, rel=1e-5) and ppl_ddp > 1
    assert not list(scratch.glob("lightning_drop_gathered_*")), "the gathered copy was left behind"


# ------------------------------------------------------------ the dropped checkpoint from sharded weights
def _gather_worker(rank: int, root: str, slice_bytes: int, tensor_parallel: bool) -> None:
    """One of 2 gloo processes: shard a dropped tiny Llama (with `tensor_parallel`, split by transformers' plan
    over both processes first), gather it to rank zero with `slice_bytes`, write it."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_drop import apply_drop, get_spec, save_dropped
    from lightning_drop.io.model_loading import tiny_model
    from lightning_drop.lightning.distributed import shard_model
    from lightning_drop.lightning.sharded_weights import gather_to_directory
    from lightning_drop.scoring.streamed_writer import write_dropped_streaming

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    try:
        model, tokenizer = tiny_model("llama")  # the same weights on both ranks (seeded)
        apply_drop(model, attn=[1])
        if rank == 0:
            save_dropped(model, f"{root}/whole", tokenizer=tokenizer)
        prefix = get_spec(model).layer_prefix
        if tensor_parallel:
            mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
            shard_model(model, mesh["data_parallel"], torch.device("cpu"),
                        (mesh["tensor_parallel"], model.config.base_model_tp_plan))
        else:
            shard_model(model, init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))["dp"], torch.device("cpu"))
        sliced = gather_to_directory(model, f"{root}/gathered" if rank == 0 else None, model.config, None, prefix,
                                     slice_bytes)
        if rank == 0:
            write_dropped_streaming(f"{root}/gathered", f"{root}/sharded", tokenizer=tokenizer, dtype=torch.float32,
                                    slice_bytes=slice_bytes)
            Path(f"{root}/sliced.json").write_text(json.dumps(sliced))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tensor_parallel", [False, True], ids=["fsdp2", "tensor_parallel"])
def test_sharded_save_gathers_large_tensors_in_row_slices(tmp_path, tensor_parallel):
    """With a slice smaller than the embedding (320 rows x 64, 80 kB; slices of 78 rows, so each rank's 160
    rows end in a short slice) the large tensors leave the ranks in row slices and are written slice by slice;
    the dropped checkpoint equals the one saved from the unsharded model. Split for tensor parallelism (or
    sharded over the data-parallel part of the processes only), every tensor is gathered whole instead."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_gather_worker, args=(rank, str(tmp_path), 20_000, tensor_parallel))
             for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung and [proc.exitcode for proc in procs] == [0, 0]
    sliced = json.loads((tmp_path / "sliced.json").read_text())
    if tensor_parallel:
        assert sliced == []
    else:
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight"} <= set(sliced)
        assert "model.norm.weight" not in sliced and "model.layers.0.self_attn.q_proj.weight" not in sliced
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "sharded")


# ---------------------------------------------------- a mid-training drop, layer by layer, equals DDP
def test_mid_fit_drops_rebuild_only_changed_layers_and_equal_ddp(tmp_path, c4_path):
    """Iterative rounds at steps 0 (fit start, before sharding), 2 and 4 (inside the sharded model: only the
    changed layer is gathered, rebuilt and sharded again, the others and their optimizer state stay): the same
    drops, losses within 1e-5 and the same saved checkpoint as DDP."""
    import torch

    cb = "lightning_drop.callbacks."
    config = tiny_config(tmp_path, c4_path, [
        {"class_path": cb + "LayerDrop", "init_args": {"target": "attn", "num": 3, "schedule": "iterative",
                                                        "every_n_steps": 2, "calibration_seq_len": 32,
                                                        "calibration_samples": 4, "calibration_batch_size": 2}}],
        max_steps=6)
    ddp = run_ddp(tmp_path / "ddp", ["--config", str(config)], timeout=240)
    fsdp = run_ddp(tmp_path / "fsdp2", ["--config", str(config)], timeout=240, flags=FSDP2_FLAGS)
    for run in (ddp, fsdp):
        assert_clean_ddp_run(run)
        assert run.count("saved the dropped model to saved") == 1
    rounds = DROP_LINE.findall(fsdp.log)
    assert rounds == DROP_LINE.findall(ddp.log)
    assert [r.split(" at step ")[1].split(":")[0] for r in rounds] == ["0", "2", "4"]
    assert fsdp.count("dropped inside the sharded model: rebuilt only the changed layers [") == 2
    assert "FSDPDroppedLlamaForCausalLM" in fsdp.log and "FSDP" not in ddp.log  # the model really was sharded
    loss_ddp, loss_fsdp = losses(ddp.cwd), losses(fsdp.cwd)
    assert sorted(loss_ddp) == sorted(loss_fsdp) == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor(list(loss_fsdp.values())), torch.tensor(list(loss_ddp.values())),
                               atol=1e-5, rtol=1e-5)
    assert_same_checkpoint(ddp.cwd / "saved", fsdp.cwd / "saved")


# -------------------------------------------------------- a mid-training iterative drop, sharded, to the end
@pytest.mark.slow
def test_iterative_drop_with_tracker_and_distillation_runs_sharded(tmp_path, c4_path):
    """Rounds at steps 0, 2 and 4 (each unshards, drops, shards again and heals with LoRA distillation from the
    sharded teacher); the tracker scores the sharded model; the saved checkpoint holds the 3 drops, merged."""
    cb = "lightning_drop.callbacks."
    calibration = {"calibration_seq_len": 32, "calibration_samples": 6, "calibration_batch_size": 2}
    config = tiny_config(tmp_path, c4_path, [
        {"class_path": cb + "LayerDrop", "init_args": {"target": "attn", "num": 3, "schedule": "iterative",
                                                        "every_n_steps": 2, **calibration}},
        {"class_path": cb + "ImportanceTracker", "init_args": {"every_n_steps": 2, "output_dir": "tracker",
                                                                **calibration}},
        {"class_path": cb + "Distillation", "init_args": {"trainable": "lora", "r": 4, "lora_alpha": 8,
                                                           "start": "first_drop"}}], max_steps=6)
    run = run_ddp(tmp_path / "fsdp2", ["--config", str(config)], timeout=300, flags=FSDP2_FLAGS)
    assert_clean_ddp_run(run)
    assert "`Trainer.fit` stopped: `max_steps=6` reached." in run.log and "FSDPPeftModelForCausalLM" in run.log
    rounds = DROP_LINE.findall(run.log)
    assert [r.split(" at step ")[1].split(":")[0] for r in rounds] == ["0", "2", "4"]
    assert run.count("Distillation: healing the model of round") == 2
    history = json.loads((run.cwd / "tracker" / "importance_history.json").read_text())["history"]
    assert [e["step"] for e in history] == [0, 2, 4, 6]
    assert [sum(v is None for v in e["attn"]) for e in history] == [1, 2, 3, 3]  # scored after each round
    saved = json.loads((run.cwd / "saved" / "config.json").read_text())
    assert len(saved["drop_attn_list"]) == 3
    assert not [k for k in saved_tensors(run.cwd / "saved") if "lora_" in k]
    losses_by_step = losses(run.cwd)
    assert sorted(losses_by_step) == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------- save, stop, resume (2 and 1)
def checkpointed_config(tmp_path: Path, c4_path: Path) -> Path:
    config = yaml.safe_load(tiny_config(tmp_path, c4_path, drop_and_lora(), max_steps=4).read_text())
    trainer = config["trainer"]
    trainer.update(enable_checkpointing=True, limit_train_batches=2)  # an epoch is 2 steps: resume at its end
    trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                 "init_args": {"dirpath": "ckpt", "every_n_train_steps": 2, "save_top_k": -1}})
    path = tmp_path / "checkpointed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_sharded_checkpoint_resumes_with_the_same_losses(tmp_path, c4_path):
    import torch

    config = checkpointed_config(tmp_path, c4_path)
    full = run_ddp(tmp_path / "full", ["--config", str(config)], timeout=240, flags=FSDP2_FLAGS)
    assert_clean_ddp_run(full)
    ckpt = full.cwd / "ckpt" / "epoch=0-step=2.ckpt"
    assert (ckpt / "meta.pt").is_file() and list(ckpt.glob("*.distcp")), "not a distributed checkpoint"
    # the run that stopped at step 2 goes on from its sharded checkpoint
    again = run_ddp(tmp_path / "again", ["--config", str(config), "--ckpt_path", str(ckpt)], timeout=240,
                    flags=FSDP2_FLAGS)
    assert_clean_ddp_run(again)
    assert "LayerDrop: resumed from" in again.log and not DROP_LINE.search(again.log)  # the plan, not scored again
    full_losses, resumed = losses(full.cwd), losses(again.cwd)
    assert sorted(resumed) == [2, 3]
    torch.testing.assert_close(torch.tensor([resumed[2], resumed[3]]), torch.tensor([full_losses[2], full_losses[3]]),
                               atol=1e-4, rtol=1e-4)
    assert_same_checkpoint(full.cwd / "saved", again.cwd / "saved")
    # the same sharded checkpoint on 1 process (torch.distributed.checkpoint reshards on load)
    one = run_ddp(tmp_path / "one", ["--config", str(config), "--ckpt_path", str(ckpt)], timeout=240,
                  flags=(*FSDP2_FLAGS, "--trainer.devices", "1"))
    assert one.returncode == 0 and "Traceback" not in one.log, one.log[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in one.log and "LayerDrop: resumed from" in one.log
    assert json.loads((one.cwd / "saved" / "config.json").read_text())["drop_attn_list"] == \
        json.loads((full.cwd / "saved" / "config.json").read_text())["drop_attn_list"]


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory, c4_path) -> Path:
    """A distributed checkpoint of a 2-step FSDP2 fit that dropped 1 attention sublayer at fit start."""
    tmp = tmp_path_factory.mktemp("sharded_ckpt")
    config = yaml.safe_load(tiny_config(tmp, c4_path, drop_and_lora()[:1], max_steps=2).read_text())
    config["trainer"]["enable_checkpointing"] = True
    config["trainer"]["callbacks"][0]["init_args"]["num"] = 1
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"dirpath": "ckpt", "every_n_train_steps": 2}})
    path = tmp / "ckpt.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_ddp(tmp / "run", ["--config", str(path)], timeout=180, flags=FSDP2_FLAGS)
    assert_clean_ddp_run(run)
    return run.cwd / "ckpt" / "epoch=0-step=2.ckpt"


@pytest.mark.parametrize("extra, message", [
    (("--trainer.strategy.init_args.tensor_parallel_size", "2", "--trainer.strategy.init_args.data_parallel_size",
      "1"), "tensor parallelism needs a plan: set model.init_args.tp_plan: auto"),
    (("--trainer.callbacks+=lightning_drop.callbacks.Distillation", "--trainer.callbacks.teacher_device", "cpu"),
     "teacher_device='cpu' would hold the whole teacher on one device"),
    pytest.param(("--trainer.callbacks.target", "mlp", "--ckpt_path", "{ckpt}"), "was written by another drop plan",
                 marks=pytest.mark.slow),
])
def test_bad_sharded_setups_are_one_line_on_every_rank(tmp_path, c4_path, extra, message, request):
    """Refused at setup with one line (on each rank that started), none left waiting; nothing written."""
    if "{ckpt}" in extra:
        ckpt = request.getfixturevalue("sharded_checkpoint")
        extra = tuple(a.replace("{ckpt}", str(ckpt)) for a in extra)
    cb = "lightning_drop.callbacks."
    config = tiny_config(tmp_path, c4_path, [
        {"class_path": cb + "LayerDrop", "init_args": {"target": "attn", "num": 1, "calibration_seq_len": 32,
                                                        "calibration_samples": 4, "calibration_batch_size": 2}}])
    run = run_ddp(tmp_path / "run", ["--config", str(config)], timeout=180, flags=(*FSDP2_FLAGS, *extra))
    assert run.returncode == 2, run.log[-3000:]
    errors = [line for line in run.log.splitlines() if "error: " in line]
    assert errors and all(message in line for line in errors), run.log[-3000:]
    assert "Traceback (most recent call last)" not in run.log and not (run.cwd / "saved").exists()


# ------------------------------------------------------------------------------- loading that scales
@pytest.mark.slow
def test_load_sharded_reads_each_ranks_rows_and_trains_as_the_eager_load(tmp_path, c4_path):
    """DropModule(load_sharded=true): built on the meta device, each rank reads its rows of the dropped checkpoint
    after sharding; the fit gives the losses and the checkpoint of the same fit with the whole model loaded."""
    import torch

    from lightning_drop import apply_drop, save_dropped
    from lightning_drop.io.model_loading import tiny_model

    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama")
    apply_drop(model, attn=[1], mlp=[3])
    source = tmp_path / "dropped"
    save_dropped(model, source, tokenizer=tokenizer)
    runs = {}
    for name, load_sharded, callbacks in (("eager", False, []), ("sharded", True, []),
                                          ("sharded_lora", True, drop_and_lora()[1:])):
        config = tiny_config(tmp_path / name, c4_path, callbacks, max_steps=3, model=str(source),
                             load_sharded=load_sharded)
        run = run_ddp(tmp_path / f"run_{name}", ["--config", str(config)], timeout=240, flags=FSDP2_FLAGS)
        assert_clean_ddp_run(run)
        runs[name] = run
    eager, sharded = losses(runs["eager"].cwd), losses(runs["sharded"].cwd)
    assert sorted(eager) == sorted(sharded) == [0, 1, 2]
    torch.testing.assert_close(torch.tensor(list(sharded.values())), torch.tensor(list(eager.values())),
                               atol=1e-6, rtol=1e-6)
    assert_same_checkpoint(runs["eager"].cwd / "saved", runs["sharded"].cwd / "saved")
    # new adapters start at zero (B = 0): the first loss is the loaded model's, then they train
    with_lora = losses(runs["sharded_lora"].cwd)
    assert with_lora[0] == pytest.approx(eager[0], abs=1e-6) and with_lora[2] != pytest.approx(with_lora[0])
    assert not [k for k in saved_tensors(runs["sharded_lora"].cwd / "saved") if "lora_" in k]
    config = json.loads((runs["sharded"].cwd / "saved" / "config.json").read_text())
    assert config["drop_attn_list"] == [1] and config["drop_mlp_list"] == [3]


# ------------------------------------------------------------- the shipped recovery config, sharded
@pytest.mark.slow
def test_drop_and_recover_runs_sharded_as_shipped(tmp_path):
    """configs/drop_and_recover.yaml + the overlay on SmolLM2, shortened only by step counts: the 8-attention
    drop, LoRA trained sharded, and the merged, dropped checkpoint written from the sharded weights."""
    from test_ddp import SMOLLM2_STEPS, only_version

    run = run_ddp(tmp_path, ["--config", str(CONFIGS / "drop_and_recover.yaml"), *SMOLLM2_STEPS], timeout=600,
                  flags=FSDP2_FLAGS)
    assert_clean_ddp_run(run)
    assert "`Trainer.fit` stopped: `max_steps=1` reached." in run.log and "FSDPPeftModelForCausalLM" in run.log
    saved = only_version(run.cwd / "lightning_logs" / "drop_and_recover") / "smollm2-135m-drop8attn-lora"
    config = json.loads((saved / "config.json").read_text())
    assert len(config["drop_attn_list"]) == 8 and config["num_hidden_layers"] == 30
    keys = saved_tensors(saved)
    assert not [k for k in keys if "lora_" in k], "LoRA adapters were not merged"
    with_attn = {int(k.split(".layers.")[1].split(".")[0]) for k in keys if ".self_attn." in k}
    assert with_attn == set(range(30)) - set(config["drop_attn_list"])
    assert run.count("saved the dropped model to") == 1


# -------------------------------------------------------------------------- a fit-end drop, sharded
@pytest.mark.slow
def test_fit_end_drop_and_measurement_sharded_equal_ddp(tmp_path, c4_path):
    """A fit-end drop (scored on the sharded model, made on the plain one) after LoRA training, a perplexity of
    the final model and the saved checkpoint: the same under FSDP2 as under DDP."""
    import torch

    cb = "lightning_drop.callbacks."
    config = tiny_config(tmp_path, c4_path, [
        {"class_path": cb + "PerplexityCallback",
         "init_args": {"data": str(c4_path), "seq_len": 32, "num_windows": 4, "output": "ppl.json"}},
        {"class_path": cb + "LayerDrop", "init_args": {"target": "attn", "num": 2, "when": "fit_end",
                                                        "calibration_seq_len": 32, "calibration_samples": 6,
                                                        "calibration_batch_size": 2}},
        {"class_path": cb + "LoRARecovery", "init_args": {"r": 4, "alpha": 8, "dropout": 0.0, "when": "fit_start"}},
    ], max_steps=3)
    ddp = run_ddp(tmp_path / "ddp", ["--config", str(config)], timeout=240)
    fsdp = run_ddp(tmp_path / "fsdp2", ["--config", str(config)], timeout=240, flags=FSDP2_FLAGS)
    for run in (ddp, fsdp):
        assert_clean_ddp_run(run)
        assert run.count("saved the dropped model to saved") == 1
    assert DROP_LINE.findall(fsdp.log) == DROP_LINE.findall(ddp.log) and " at step 3: " in DROP_LINE.findall(ddp.log)[0]
    loss_ddp, loss_fsdp = losses(ddp.cwd), losses(fsdp.cwd)
    torch.testing.assert_close(torch.tensor(list(loss_fsdp.values())), torch.tensor(list(loss_ddp.values())),
                               atol=1e-5, rtol=1e-5)
    ppl_ddp, ppl_fsdp = (json.loads((run.cwd / "ppl.json").read_text())["perplexity"] for run in (ddp, fsdp))
    assert ppl_fsdp == pytest.approx(ppl_ddp, rel=1e-5)
    assert_same_checkpoint(ddp.cwd / "saved", fsdp.cwd / "saved")


@pytest.mark.parametrize("family", ["deepseek_v3", "nemotron_h"])
def test_sharded_loading_reads_checkpoints_transformers_converts(tmp_path, family):
    """What `load_sharded` reads by the model's names is found in checkpoints whose names transformers renames
    (Nemotron-H's `backbone.`) or fuses (per-expert MoE tensors): the same weights as `load_dropped`."""
    import torch

    from lightning_drop import load_dropped
    from lightning_drop.io.model_loading import tiny_model
    from lightning_drop.lightning.sharded_weights import empty_model, materialize

    model, _ = tiny_model(family)
    model.save_pretrained(tmp_path)
    empty = empty_model(tmp_path, torch.float32)
    materialize(empty, tmp_path, torch.device("cpu"))
    expected = load_dropped(tmp_path).state_dict()
    got = empty.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
