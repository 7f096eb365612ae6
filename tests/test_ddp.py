"""DDP on CPU (gloo, 2 processes) through the real CLI entry point.

- Every shipped LightningCLI fit config under `configs/` runs as shipped with `--trainer.strategy ddp
  --trainer.devices 2 --trainer.accelerator cpu`, shortened only by step counts and batch limits, and writes
  its artefacts (once: rank zero) into the test's folder.
- The fit-end callbacks (perplexity, speed, lm-eval, a fit-end drop, a LoRA merge, saving) and the tracker's
  default output dir (the trainer's log dir, itself a broadcast) work under DDP.
- The fit-start drop and the first importance scores equal the single-process ones.

Lightning's `ddp` strategy re-launches the command for rank 1, so each run is a subprocess of the installed
`lightning-drop` script (or `python -m lightning_drop.cli` when it is not installed). A collective that one
rank reaches alone (e.g. `trainer.log_dir` under `trainer.is_global_zero`) makes the other wait forever, so
every run has a hard timeout after which its whole process group is killed and the test FAILS: a hang
cannot stall CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

# several processes each: pytest-xdist (`--dist loadgroup`) runs these one at a time on one worker
pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DDP_FLAGS = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
RANK1_LINE = "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2"


# ------------------------------------------------------------------------------------------- the runner
def cli_command() -> list[str]:
    """The `lightning-drop` console script next to this interpreter, else `python -m lightning_drop.cli`."""
    script = Path(sys.executable).with_name("lightning-drop")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "lightning_drop.cli"]


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: assume the group is gone, it is killed next anyway
        return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@dataclass
class Run:
    returncode: int
    log: str
    cwd: Path
    seconds: float
    cmd: list[str] = field(default_factory=list)

    def count(self, text: str) -> int:
        return self.log.count(text)


def run_ddp(cwd: Path, args: Sequence[str], timeout: float, grace: float = 30.0,
            flags: Sequence[str] = DDP_FLAGS) -> Run:
    """`lightning-drop fit ARGS` + DDP (or the strategy of `flags`) on 2 CPU processes in `cwd`; fails the test
    if it hangs.

    Rank 0 is started in a new session, so rank 1 (its child) shares its process group: after `timeout`
    seconds the group is killed and the test fails. When rank 0 has exited, rank 1 gets `grace` seconds to
    exit too (a rank left waiting in a collective is a hang as well).
    """
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*cli_command(), "fit", *args, *flags]
    log_path = cwd / "ddp.log"
    start = time.monotonic()
    hung = None
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            deadline = time.monotonic() + grace
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _group_alive(proc.pid):
                hung = f"rank 0 exited with {proc.returncode} but another rank was still running {grace:.0f} s later"
        except subprocess.TimeoutExpired:
            hung = f"did not finish within {timeout:.0f} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    if hung:
        pytest.fail(f"DDP run hung: `{' '.join(cmd)}` {hung} (a collective reached by one rank only?)\n"
                    f"--- last output ---\n{text[-4000:]}")
    return Run(proc.returncode, text, cwd, seconds, cmd)


def assert_clean_ddp_run(run: Run) -> None:
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.log[-4000:]}"
    assert RANK1_LINE in run.log, "rank 1 never started: not a 2-process run"
    assert "Traceback (most recent call last)" not in run.log, run.log[-4000:]


def only_version(logs: Path) -> Path:
    """The single run folder under a logger's `save_dir/name`: rank 1 must not start a second one."""
    runs = sorted(p for p in logs.iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run folder under {logs}, found {[p.name for p in runs]}"
    return runs[0]


def tensorboard(run_dir: Path) -> object:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, f"expected one TensorBoard event file in {run_dir}, found {len(files)}"
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def steps_of(acc: object, tag: str, kind: str = "scalars") -> list[int]:
    events = acc.Scalars(tag) if kind == "scalars" else acc.Images(tag)  # type: ignore[attr-defined]
    return [e.step for e in events]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_history(run_dir: Path, steps: list[int], layers: int, dropped_attn: int) -> list[dict]:
    """The tracker's files: the JSON history at `steps`, its CSV, the heatmap; `dropped_attn` rows None."""
    doc = json.loads((run_dir / "importance_history.json").read_text())
    history = doc["history"]
    assert [e["step"] for e in history] == steps and doc["num_layers"] == layers
    for e in history:
        assert len(e["attn"]) == len(e["mlp"]) == len(e["block"]) == layers
        assert sum(v is None for v in e["attn"]) == dropped_attn, e["attn"]
        assert all(v is None or v >= 0 for k in ("attn", "mlp", "block") for v in e[k])
    rows = (run_dir / "importance_history.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * len(steps)
    assert is_png(run_dir / "importance_heatmap.png")
    assert not list(run_dir.glob(".importance_heatmap.*")), "a temporary heatmap file was left behind"
    return history


def lightning_checkpoint(run_dir: Path) -> dict:
    import torch

    files = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert len(files) == 1, f"expected one checkpoint in {run_dir / 'checkpoints'}, found {files}"
    return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)


def callback_state(ckpt: dict, name: str) -> dict:
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith(name)]
    assert len(states) == 1, list(ckpt["callbacks"])
    return states[0]


# ---------------------------------------------------------------------------- every shipped fit config
def fit_configs() -> list[Path]:
    """Every YAML under configs/ that LightningCLI `fit` reads alone (it configures a `trainer` and a `model`;
    the configs/sharded/ overlays are composed with one of these: tests/test_sharded.py, test_tensor_parallel.py)."""
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "sharded"
                  and {"trainer", "model"} <= set(yaml.safe_load(p.read_text()) or {}))


def check_track_random_init(run: Run) -> None:
    # the default output dir: the logger's run folder (`trainer.log_dir`, a broadcast)
    run_dir = only_version(run.cwd / "lightning_logs" / "track_random_init")
    check_history(run_dir, [0, 6], layers=8, dropped_attn=0)  # fit start, fit end
    tb = tensorboard(run_dir)
    assert steps_of(tb, "importance/attn/layer_00") == [0, 6]
    assert steps_of(tb, "importance/heatmap", "images") == [0, 6]
    assert steps_of(tb, "val/loss") == [2, 5]  # validations after steps 3 and 6 (logged at step - 1)
    ckpt = lightning_checkpoint(run_dir)  # saved after the validation at step 6, before the fit-end score
    assert [e["step"] for e in callback_state(ckpt, "ImportanceTracker")["history"]] == [0]


def check_vision_digits(run: Run) -> None:
    out = run.cwd / "logs" / "vision_digits"
    run_dir = only_version(out / "lightning_logs")
    history = json.loads((out / "importance_history.json").read_text())["history"]
    # fit start and fit end (its every-60-steps point is after this short run)
    assert [(e["step"], e["event"]) for e in history] == [(0, "fit_start"), (12, "fit_end")]
    report = json.loads((out / "drop_report.json").read_text())
    assert len(report["drop_attn_list"]) == 2 and report["drop_mlp_list"] == []
    for key in ("test_acc_before", "test_acc_after_drop", "test_acc_after_head_finetune"):
        assert 0.0 <= report[key] <= 1.0
    for block in report["sublayer_calls"]:  # dropped attention does no work; the rest does
        assert (block["attn_compute_calls"] == 0) == (block["block"] in report["drop_attn_list"])
    assert report["speed"]["flops_ratio"] < 1.0 and report["speed"]["dropped"]["attn"] == report["drop_attn_list"]
    saved = json.loads((out / "dropped_model" / "config.json").read_text())
    assert saved["drop_attn_list"] == report["drop_attn_list"]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc", "drop/test_acc_before", "importance/attn/layer_00"} <= set(header)
    assert run.count("ImageDropReport: dropped attn") == 1  # rank zero reports and writes
    assert "self.log('val/loss', ..., sync_dist=True)" not in run.log  # the logged loss is over all ranks


def _safetensor_keys(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys += list(fh.keys())
    return keys


def check_drop_and_recover(run: Run) -> None:
    run_dir = only_version(run.cwd / "lightning_logs" / "drop_and_recover")
    saved = run_dir / "smollm2-135m-drop8attn-lora"  # save_dir: "{log_dir}/...": the run's own folder
    config = json.loads((saved / "config.json").read_text())
    dropped = config["drop_attn_list"]
    assert len(dropped) == 8 and config["drop_mlp_list"] == [] and config["num_hidden_layers"] == 30
    keys = _safetensor_keys(saved)
    assert not [k for k in keys if "lora_" in k], "LoRA adapters were not merged"
    with_attn = {int(k.split(".layers.")[1].split(".")[0]) for k in keys if ".self_attn." in k}
    assert with_attn == set(range(30)) - set(dropped)  # dropped attention weights are physically absent
    assert run.count("saved the dropped model to") == 1 and run.count("LoRARecovery: adapters merged") == 1
    assert "val/loss" in tensorboard(run_dir).Tags()["scalars"]
    ckpt = lightning_checkpoint(run_dir)
    assert ckpt["lightning_drop"]["drop_attn_list"] == dropped and ckpt["lightning_drop"]["lora"]["r"] == 16


def check_drop_and_distill(run: Run) -> None:
    run_dir = only_version(run.cwd / "lightning_logs" / "drop_and_distill")
    saved = run_dir / "smollm2-135m-drop8attn-distilled"  # in the run's own folder
    config = json.loads((saved / "config.json").read_text())
    assert len(config["drop_attn_list"]) == 8 and config["drop_mlp_list"] == []
    assert not [k for k in _safetensor_keys(saved) if "lora_" in k], "LoRA adapters were not merged"
    assert run.count("Distillation from step 0") == 1 and run.count("Distillation: adapters merged") == 1
    assert "val/loss" in tensorboard(run_dir).Tags()["scalars"]  # (train/kd_loss: test_distillation_under_ddp)
    state = callback_state(lightning_checkpoint(run_dir), "Distillation")
    assert state["teacher_step"] == 0 and state["teacher_weights"] is None  # rebuilt from the source on resume


def _check_arm(run: Run, version: str, dropped: int, next_step: int | None) -> None:
    run_dir = only_version(run.cwd / "lightning_logs" / "iterative_vs_oneshot" / version)  # each run: version_N
    history = check_history(run_dir, [0, 1], layers=30, dropped_attn=dropped)
    ckpt = lightning_checkpoint(run_dir)
    record = ckpt["lightning_drop"]
    assert len(record["drop_attn_list"]) == dropped and record["lora"]["r"] == 16
    assert [i for i, v in enumerate(history[0]["attn"]) if v is None] == record["drop_attn_list"]
    state = callback_state(ckpt, "LayerDrop")
    assert len(state["rounds"]) == 1 and state["next_step"] == next_step


def check_iterative(run: Run) -> None:
    # one round at fit start; the next is due at step 25, after this shortened run (and it says so)
    _check_arm(run, "iterative", dropped=1, next_step=25)
    assert "LayerDrop: the last of 8 rounds would be at step 175, after max_steps=1" in run.log


def check_one_shot(run: Run) -> None:
    _check_arm(run, "one_shot", dropped=8, next_step=None)


@dataclass
class Case:
    args: tuple[str, ...]
    check: Callable[[Run], None]
    timeout: float
    slow: bool = False


# one step, with short windows and a small calibration batch: the run goes through every callback as shipped
SMOLLM2_STEPS = ("--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
                 "--data.init_args.seq_len", "64", "--data.init_args.calibration_samples", "4")
CASES = {
    # (scoring during training under DDP: test_fit_end_callbacks_under_ddp, every step)
    # (the last callback is the ModelCheckpoint: one checkpoint, at the last step)
    "track_random_init.yaml": Case(("--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
                                    "--trainer.limit_val_batches", "2",
                                    "--trainer.callbacks.init_args.every_n_train_steps", "6"),
                                   check_track_random_init, 300),
    # the config's own CI smoke settings, a little more than one epoch (10 steps per rank)
    "vision_digits.yaml": Case(("--trainer.max_steps", "12", "--trainer.limit_val_batches", "1",
                                "--trainer.callbacks.init_args.head_epochs", "1"), check_vision_digits, 300),
    "drop_and_recover.yaml": Case(SMOLLM2_STEPS, check_drop_and_recover, 600, slow=True),
    "drop_and_distill.yaml": Case(SMOLLM2_STEPS, check_drop_and_distill, 600, slow=True),
    "iterative_vs_oneshot/iterative.yaml": Case(SMOLLM2_STEPS, check_iterative, 600, slow=True),
    "iterative_vs_oneshot/one_shot.yaml": Case(SMOLLM2_STEPS, check_one_shot, 600, slow=True),
}


def test_every_fit_config_has_a_ddp_case():
    """A new fit config fails here until it gets a DDP case; the rest of configs/ are study configs."""
    names = {str(p.relative_to(CONFIGS)) for p in fit_configs()}
    assert names == set(CASES)
    others = [p for p in CONFIGS.rglob("*.yaml") if str(p.relative_to(CONFIGS)) not in names]
    for path in others:  # `lightning-drop study` configs (no trainer, a sweep) and the sharded overlays
        doc = yaml.safe_load(path.read_text())
        # an overlay chooses no model; it may give the module its tensor-parallel plan
        model = doc.get("model") if path.parent.name == "sharded" else None
        overlay = path.parent.name == "sharded" and (model is None or (set(model) == {"init_args"}
                                                                      and set(model["init_args"]) == {"tp_plan"}))
        assert (path.parent.name == "study" and "sweeps" in doc) or overlay, path


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if c.slow else [])
                                  for n, c in CASES.items()])
def test_shipped_config_under_ddp(name, tmp_path):
    case = CASES[name]
    run = run_ddp(tmp_path, ["--config", str(CONFIGS / name), *case.args], timeout=case.timeout)
    assert_clean_ddp_run(run)
    max_steps = case.args[case.args.index("--trainer.max_steps") + 1]
    assert f"`Trainer.fit` stopped: `max_steps={max_steps}` reached." in run.log
    case.check(run)


# --------------------------------------------------------------------------------- fit-end callbacks
def test_fit_end_callbacks_under_ddp(tmp_path, c4_path, shared_dir):
    """Rank-zero measurements after a fit-end drop and a LoRA merge; the tracker writes to the log dir."""
    hellaswag = shared_dir / "data" / "hellaswag_val_first1000.jsonl"
    if not hellaswag.is_file():
        pytest.skip(f"{hellaswag} not present")
    cb = "lightning_drop.callbacks."
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.lightning.module.DropModule",
                  "init_args": {"model": "tiny-llama", "save_dir": "saved"}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
                 "init_args": {"tokenizer": "tiny-llama", "source": str(c4_path), "seq_len": 32, "batch_size": 2,
                               "limit_documents": 20, "calibration_samples": 4}},
        "trainer": {
            "max_steps": 2, "limit_val_batches": 1, "val_check_interval": 2, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "logs", "name": "fit_end"}},
            "callbacks": [
                {"class_path": cb + "ImportanceTracker", "init_args": {"every_n_steps": 1, "calibration_batch_size": 2}},
                {"class_path": cb + "PerplexityCallback",
                 "init_args": {"data": str(c4_path), "seq_len": 32, "num_windows": 4, "output": "ppl.json"}},
                {"class_path": cb + "SpeedBenchmark",
                 "init_args": {"baseline": "tiny-llama", "prompt_len": 8, "gen_len": 4, "repeats": 1, "warmup": 0,
                               "output": "speed.json"}},
                {"class_path": cb + "LMEvalCallback",
                 "init_args": {"data_files": {"hellaswag_sample": str(hellaswag)}, "limit": 4, "output": "lm_eval.json"}},
                {"class_path": cb + "LayerDrop",
                 "init_args": {"target": "attn", "num": 1, "when": "fit_end", "calibration_batch_size": 2}},
                {"class_path": cb + "LoRARecovery", "init_args": {"r": 4, "when": "fit_start", "merge": True}},
            ],
        },
    }
    path = tmp_path / "fit_end.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_ddp(tmp_path, ["--config", str(path)], timeout=300)
    assert_clean_ddp_run(run)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert len(saved["drop_attn_list"]) == 1 and not [k for k in _safetensor_keys(tmp_path / "saved") if "lora_" in k]
    ppl = json.loads((tmp_path / "ppl.json").read_text())["perplexity"]
    assert 1.0 < ppl < 1e4
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["kv_ratio"] == pytest.approx(0.75)  # the measured model is the dropped one (1 of 4 attention)
    lm = json.loads((tmp_path / "lm_eval.json").read_text())
    assert lm["n_samples"]["hellaswag_sample"] == 4 and 0.0 <= lm["scores"]["hellaswag_sample"] <= 1.0
    # the tracker's default output dir is the logger's run folder, resolved on every rank
    run_dir = only_version(tmp_path / "logs" / "fit_end")
    check_history(run_dir, [0, 1, 2], layers=4, dropped_attn=0)
    for line in ("perplexity: ", "lm-eval: ", "speedup  prefill", "saved the dropped model to",
                 "LoRARecovery: adapters merged"):
        assert run.count(line) == 1, line


# ------------------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize("start", ["after_drops", "first_drop"])
def test_distillation_under_ddp(tmp_path, c4_path, start):
    """A mid-training drop on both ranks, each rank copies its own teacher, recovery by distillation into the
    layers next to the drop (KL + hidden states); the checkpoint keeps the teacher copied during training.
    `first_drop`: two rounds (steps 2 and 4) with healing from the first round on, the trainable set moved to
    the layers next to the new drop after the second round, on both ranks."""
    cb = "lightning_drop.callbacks."
    heal = start == "first_drop"
    drop_args = {"target": "attn", "num": 1, "when": "step", "at_step": 2, "calibration_batch_size": 2}
    if heal:
        drop_args.update(num=2, schedule="iterative", step=1, every_n_steps=2)
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.lightning.module.DropModule",
                  "init_args": {"model": "tiny-llama", "lr": 3e-3, "save_dir": "saved"}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
                 "init_args": {"tokenizer": "tiny-llama", "source": str(c4_path), "seq_len": 32, "batch_size": 2,
                               "limit_documents": 20, "calibration_samples": 4}},
        "trainer": {
            "max_steps": 6 if heal else 4, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "logs", "name": "distill"}},
            "callbacks": [
                {"class_path": cb + "LayerDrop", "init_args": drop_args},
                {"class_path": cb + "Distillation",
                 "init_args": {"trainable": "layers", "layers": "near_drops", "hidden_weight": 0.5, "start": start}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 6 if heal else 4}},
            ],
        },
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_ddp(tmp_path, ["--config", str(path)], timeout=300)
    assert_clean_ddp_run(run)
    assert run.count("Distillation from step 2: layers") == 1  # rank zero reports; both ranks train
    assert run.count("Distillation: healing the model of round 2 at step 4: layers") == (1 if heal else 0)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert len(saved["drop_attn_list"]) == (2 if heal else 1)
    run_dir = only_version(tmp_path / "logs" / "distill")
    tags = set(tensorboard(run_dir).Tags()["scalars"])
    assert {"train/kd_loss", "train/lm_loss", "train/hidden_loss"} <= tags
    state = callback_state(lightning_checkpoint(run_dir), "Distillation")
    assert state["started_at"] == 2 and state["teacher_step"] == 2
    weights = state["teacher_weights"]
    assert weights is not None and any(".layers.{}.self_attn.".format(saved["drop_attn_list"][0]) in k for k in weights)


# ------------------------------------------------------- same collectives on every rank (one process)
def _recording_strategy(rank: int, calls: list) -> object:
    """A single-device strategy playing global rank `rank`: records every collective asked of it."""
    import torch
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class Recording(SingleDeviceStrategy):
        @property
        def global_rank(self) -> int:  # what `trainer.is_global_zero` reads
            return rank

        @global_rank.setter
        def global_rank(self, value: int) -> None:  # the base class sets 0: this one plays `rank`
            pass

        @property
        def is_global_zero(self) -> bool:
            return rank == 0

        def broadcast(self, obj, src=0):
            calls.append(("broadcast", src))
            return obj

        def barrier(self, name=None):
            calls.append(("barrier", name))

        def reduce(self, tensor, group=None, reduce_op="mean"):
            calls.append(("reduce", str(reduce_op)))
            return tensor

        def all_gather(self, tensor, group=None, sync_grads=False):
            calls.append(("all_gather",))
            return tensor

        def reduce_boolean_decision(self, decision, all=True):
            calls.append(("reduce_boolean_decision",))
            return decision

    return Recording(device=torch.device("cpu"))


def _fit_as_rank(rank: int, out: Path, c4_path: Path, hellaswag: Path, monkeypatch) -> list:
    import lightning.pytorch as pl
    import torchmetrics
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning_utilities.core.rank_zero import rank_zero_only

    from lightning_drop.callbacks import (
        ImportanceTracker,
        LayerDrop,
        LMEvalCallback,
        LoRARecovery,
        PerplexityCallback,
        SpeedBenchmark,
    )
    from lightning_drop.lightning.datamodule import TextDataModule
    from lightning_drop.lightning.module import DropModule

    calls: list = []
    sync = torchmetrics.Metric.sync

    def recorded_sync(self, *args, **kwargs):
        if kwargs.get("should_sync", True):
            calls.append(("metric_sync", type(self).__name__))
        return sync(self, *args, **kwargs)

    monkeypatch.setattr(torchmetrics.Metric, "sync", recorded_sync)
    monkeypatch.setattr(rank_zero_only, "rank", rank)  # rank_zero_only functions and loggers skip on rank 1
    monkeypatch.chdir(out)
    pl.seed_everything(0)
    model = DropModule(model="tiny-llama", save_dir="saved")
    data = TextDataModule(tokenizer="tiny-llama", source=str(c4_path), seq_len=32, batch_size=2, limit_documents=20,
                          calibration_samples=4)
    callbacks = [
        ImportanceTracker(every_n_steps=1, calibration_batch_size=2),
        PerplexityCallback(data=str(c4_path), seq_len=32, num_windows=2, output="ppl.json"),
        # listed before LMEvalCallback, it asks for its average (the SDR): measured then, on every rank
        SpeedBenchmark(baseline="tiny-llama", prompt_len=4, gen_len=2, repeats=1, warmup=0, output="speed.json",
                       baseline_avg=0.3),
        LMEvalCallback(data_files={"hellaswag_sample": str(hellaswag)}, limit=2, output="lm_eval.json"),
        LayerDrop(target="attn", num=1, when="fit_end", calibration_batch_size=2, verbose=False),
        LoRARecovery(r=2, when="fit_start", merge=True),
    ]
    trainer = pl.Trainer(strategy=_recording_strategy(rank, calls), max_steps=2, limit_val_batches=1,
                         val_check_interval=2, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         logger=TensorBoardLogger("logs", name="run"), callbacks=callbacks)
    assert trainer.is_global_zero == (rank == 0)
    trainer.fit(model, datamodule=data)
    return calls


def test_rank_zero_work_reaches_no_collective(tmp_path, c4_path, shared_dir, monkeypatch):
    """The fit-end callbacks and the tracker ask for the same collectives on rank 0 as on rank 1.

    One process plays each rank in turn (no DDP: seconds, not a minute); a collective that only rank zero
    reaches (the trainer's log dir, a torchmetrics sync, a barrier) shows up as a difference, which under
    DDP is a hang. Rank 1 writes nothing.
    """
    hellaswag = shared_dir / "data" / "hellaswag_val_first1000.jsonl"
    if not hellaswag.is_file():
        pytest.skip(f"{hellaswag} not present")
    (tmp_path / "zero").mkdir()
    (tmp_path / "one").mkdir()
    with monkeypatch.context() as mp:
        zero = _fit_as_rank(0, tmp_path / "zero", c4_path, hellaswag, mp)
    with monkeypatch.context() as mp:
        one = _fit_as_rank(1, tmp_path / "one", c4_path, hellaswag, mp)
    assert zero == one
    assert ("broadcast", 0) in zero and ("metric_sync", "SumMetric") in zero  # the drop, the scores
    written = {p.relative_to(tmp_path / "zero").as_posix() for p in (tmp_path / "zero").rglob("*") if p.is_file()}
    assert {"ppl.json", "speed.json", "lm_eval.json", "saved/config.json",
            "logs/run/version_0/importance_history.json"} <= written
    assert not [p for p in (tmp_path / "one").rglob("*") if p.is_file()]
    assert "sdr" in json.loads((tmp_path / "zero" / "speed.json").read_text())


# ------------------------------------------------------------------------------ 2 processes agree with 1
def config(tmp: Path, c4_path: Path) -> dict:
    return {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.lightning.module.DropModule",
                  "init_args": {"model": "tiny-llama", "lr": 3e-3, "save_dir": str(tmp / "final")}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
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


def run_cli(tmp: Path, c4_path: Path, ddp: bool) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "ddp.yaml"
    path.write_text(yaml.safe_dump(config(tmp, c4_path)))
    if ddp:
        run = run_ddp(tmp, ["--config", str(path)], timeout=300)
        assert_clean_ddp_run(run)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([*cli_command(), "fit", "--config", str(path)], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp / "importance" / "importance_history.json").read_text())["history"]
    saved = json.loads((tmp / "final" / "config.json").read_text())
    return {"history": history, "config": saved}


@pytest.mark.slow  # ~1 min unloaded (3 Python processes); CI runs slow tests
def test_ddp_two_cpu_processes_agree_with_one(tmp_path, c4_path):
    one = run_cli(tmp_path / "one", c4_path, ddp=False)
    two = run_cli(tmp_path / "two", c4_path, ddp=True)
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
