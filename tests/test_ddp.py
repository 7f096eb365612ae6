"""DDP on CPU (gloo, 2 processes) through the CLI: the same scores and decisions as 1 process.

Lightning's `ddp` strategy re-launches the command for rank 1, so the run goes through a subprocess of
`python -m lightning_drop.lightning_cli fit` (what `lightning-drop fit` runs). The fit-start drop and the
first importance scores use the same init (seeded) and the same calibration batch on every rank, so they
must equal the single-process ones; the second drop round happens mid-training after DDP-sharded steps, so
it is checked for agreement across ranks (DDP re-wrapping refuses mismatched parameter sets) and count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def config(tmp: Path, c4_path: Path) -> dict:
    return {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.module.DropModule",
                  "init_args": {"model": "tiny-llama", "lr": 3e-3, "save_dir": str(tmp / "final")}},
        "data": {"class_path": "lightning_drop.datamodule.TextDataModule",
                 "init_args": {"tokenizer": "tiny-llama", "source": str(c4_path), "seq_len": 32, "batch_size": 2,
                               "limit_documents": 20, "calibration_samples": 4}},
        "trainer": {
            "accelerator": "cpu", "max_steps": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "val_check_interval": 2, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp),
            "callbacks": [
                {"class_path": "lightning_drop.callbacks.LayerDrop",
                 "init_args": {"target": "attn", "num": 2, "schedule": "iterative", "step": 1, "every_n_steps": 2,
                               "calibration_batch_size": 2}},
                {"class_path": "lightning_drop.callbacks.ImportanceTracker",
                 "init_args": {"every_n_steps": 2, "heatmap": False, "output_dir": str(tmp / "importance")}},
            ],
        },
    }


def run_cli(tmp: Path, c4_path: Path, *extra: str) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "ddp.yaml"
    path.write_text(yaml.safe_dump(config(tmp, c4_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lightning_drop.lightning_cli", "fit", "--config", str(path), *extra],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp / "importance" / "importance_history.json").read_text())["history"]
    saved = json.loads((tmp / "final" / "config.json").read_text())
    return {"history": history, "config": saved, "log": proc.stderr}


@pytest.mark.slow  # ~1 min unloaded (3 Python processes); CI runs slow tests
@pytest.mark.timeout(900)
def test_ddp_two_cpu_processes_agree_with_one(tmp_path, c4_path):
    one = run_cli(tmp_path / "one", c4_path)
    two = run_cli(tmp_path / "two", c4_path, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert "world_size: 2" in two["log"] or "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two["log"]
    # fit start: same init, same calibration batch -> the same first drop and the same scores
    first_one, first_two = one["history"][0], two["history"][0]
    assert first_one["step"] == first_two["step"] == 0
    for kind in ("attn", "mlp", "block"):
        assert first_one[kind] == pytest.approx(first_two[kind], abs=1e-6), kind
    dropped_at_start = [i for i, v in enumerate(first_one["attn"]) if v is None]
    assert dropped_at_start == [i for i, v in enumerate(first_two["attn"]) if v is None] and len(dropped_at_start) == 1
    # the mid-training round happened under DDP on both ranks and training went on
    assert len(two["config"]["drop_attn_list"]) == 2 and set(dropped_at_start) <= set(two["config"]["drop_attn_list"])
    assert [e["step"] for e in two["history"]] == [0, 2, 4]
