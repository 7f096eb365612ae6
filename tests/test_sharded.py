"""FSDP2 (Lightning's ModelParallelStrategy, `--trainer.strategy fsdp2`) on 2 CPU processes (gloo), through the
real command line, under the hard timeouts of tests/test_ddp.py's runner (a hang kills the process group and
fails the test).

- The same 5-step fit (fixed seed, fit-start drop, LoRA, saved dropped checkpoint) under DDP and under FSDP2
  with the shipped overlay `configs/sharded/recover_fsdp2.yaml` makes the same drop, the same losses within
  floating-point tolerance and the same saved checkpoint.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from test_ddp import CONFIGS, assert_clean_ddp_run, run_ddp

OVERLAY = CONFIGS / "sharded" / "recover_fsdp2.yaml"
FSDP2_FLAGS = ("--config", str(OVERLAY))  # the shipped overlay: cpu, 2 devices, FSDP2Strategy
DROP_LINE = re.compile(r"LayerDrop round \d+ at step \d+: dropped attention \[[^\]]*\], MLP \[[^\]]*\]")


def tiny_config(tmp_path: Path, c4_path: Path, callbacks: list[dict], max_steps: int = 5, **model: object) -> Path:
    """A 5-step fit of tiny-llama (8 layers) on C4 windows, logging every step's loss to a CSV file."""
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


def assert_same_checkpoint(a: Path, b: Path) -> None:
    import torch

    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert config_a == config_b
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert sorted(ta) == sorted(tb) and not [k for k in ta if "lora_" in k]
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=1e-5, rtol=1e-5, msg=key)


# ------------------------------------------------------------------------------ DDP == FSDP2 (5 steps)
def test_fsdp2_fit_equals_ddp(tmp_path, c4_path, monkeypatch):
    import torch

    scratch = tmp_path / "scratch"  # the processes' TMPDIR: where rank zero gathers the sharded weights
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    config = tiny_config(tmp_path, c4_path, drop_and_lora())
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
    assert not list(scratch.glob("lightning_drop_gathered_*")), "the gathered copy was left behind"
