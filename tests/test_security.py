"""Files a user points the tool at never run code: no arbitrary unpickling, no remote code without the
opt-in, and no command waits on standard input."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_drop.io.training_checkpoint import checkpoint_meta, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a pickled payload ran"


def _one_line(text: str) -> None:
    assert text and "\n" not in text.strip() and "Traceback" not in text, text


# ----------------------------------------------------------------------------------------- pickles
@pytest.mark.parametrize("kind", ["torch.save", "pickle.dump"])
def test_checkpoint_meta_refuses_pickled_code(tmp_path, marker, kind):
    path = tmp_path / "evil.ckpt"
    ckpt = {"state_dict": {}, "callbacks": {"x": Payload(marker)}}
    if kind == "torch.save":
        torch.save(ckpt, path)
    else:
        path.write_bytes(pickle.dumps(ckpt, protocol=2))
    with pytest.raises(ValueError, match="refused to load") as err:
        checkpoint_meta(path)
    _one_line(str(err.value))
    assert "posix.system" in str(err.value) or "Unsupported" in str(err.value)


def test_fsdp_directory_meta_refused_and_plain_one_read(tmp_path, marker):
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"callbacks": {}, "lightning_drop": Payload(marker)}, evil / "meta.pt")
    with pytest.raises(ValueError, match="meta.pt: refused to load"):
        checkpoint_meta(evil)
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save({"callbacks": {"LayerDrop": {"total": 1}}, "lightning_drop": {"drop_attn_list": [1]}}, plain / "meta.pt")
    meta = checkpoint_meta(plain)
    assert meta["callbacks"] == {"LayerDrop": {"total": 1}} and meta["lightning_drop"] == {"drop_attn_list": [1]}


def test_sharded_checkpoint_metadata_is_checked(tmp_path, marker):
    """torch.distributed.checkpoint reads `.metadata` with plain pickle.load: only its own records may be in it."""
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "sharded"
    dcp.save({"model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)}}, checkpoint_id=ckpt)
    torch.save({"callbacks": {}, "epoch": 0}, ckpt / "meta.pt")
    verify_checkpoint(ckpt)  # a real one passes
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"\.metadata: refused to load.*posix\.system") as err:
        verify_checkpoint(ckpt)
    _one_line(str(err.value))


def test_other_checkpoint_directories_hold_only_plain_files(tmp_path, marker):
    (tmp_path / "ds" / "checkpoint").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(1)}}, tmp_path / "ds" / "checkpoint" / "mp_rank_00_model_states.pt")
    verify_checkpoint(tmp_path / "ds")
    torch.save({"optimizer": Payload(marker)}, tmp_path / "ds" / "checkpoint" / "zero_pp_rank_0_optim_states.pt")
    with pytest.raises(ValueError, match="zero_pp_rank_0_optim_states.pt: refused to load"):
        verify_checkpoint(tmp_path / "ds")


def _fit_config(tmp_path: Path, c4_path: Path) -> Path:
    config = {
        "model": {"class_path": "lightning_drop.lightning.module.DropModule", "init_args": {"model": "tiny-llama"}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
                 "init_args": {"tokenizer": "tiny-llama", "source": str(c4_path), "seq_len": 32, "batch_size": 2,
                               "limit_documents": 20, "calibration_samples": 2}},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "logger": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning_drop.callbacks.LayerDrop",
                                   "init_args": {"target": "attn", "num": 1, "calibration_batch_size": 2}}]},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("layout", ["file", "fsdp-directory"])
def test_fit_ckpt_path_with_pickled_code_is_refused(tmp_path, c4_path, marker, monkeypatch, capsys, layout):
    """`lightning-drop fit --ckpt_path` checks the checkpoint before anything (LayerDrop's resume read, Lightning's
    restore) unpickles it, and says why in one line."""
    from lightning_drop.cli import main

    monkeypatch.chdir(tmp_path)
    evil = {"state_dict": {}, "callbacks": {"LayerDrop": Payload(marker)}, "lightning_drop": None}
    if layout == "file":
        ckpt = tmp_path / "evil.ckpt"
        torch.save(evil, ckpt)
    else:
        ckpt = tmp_path / "evil_dir"
        ckpt.mkdir()
        torch.save(evil, ckpt / "meta.pt")
    assert main(["fit", "--config", str(_fit_config(tmp_path, c4_path)), "--ckpt_path", str(ckpt)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    _one_line(message)
    assert message.startswith("lightning-drop fit: error:") and "refused to load" in message
    assert not marker.exists()


@pytest.mark.parametrize("flag, expected", [([], True), (["--weights_only", "false"], False)])
def test_fit_restores_with_weights_only_unless_opted_out(tmp_path, c4_path, monkeypatch, flag, expected):
    """Lightning leaves `weights_only` to torch (which honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) and turns it
    off for URLs; `lightning-drop fit` passes True unless the user says otherwise."""
    import functools

    import lightning.pytorch as pl

    from lightning_drop.lightning.cli import run_lightning_cli

    monkeypatch.chdir(tmp_path)
    seen = []

    @functools.wraps(pl.Trainer.fit)  # LightningCLI builds the subcommand's options from this signature
    def fit(self, *args, **kwargs):
        seen.append(kwargs.get("weights_only"))

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    run_lightning_cli(["fit", "--config", str(_fit_config(tmp_path, c4_path)), *flag])
    assert seen == [expected]


# ------------------------------------------------------------------------------------- remote code
def test_tokenizer_remote_code_needs_the_opt_in(tmp_path, marker, monkeypatch):
    from lightning_drop.io.model_loading import RemoteCodeRefused, load_tokenizer

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tok.EvilTokenizer", None]}}))
    (tmp_path / "tok.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.delenv("LIGHTNING_DROP_TRUST_REMOTE_CODE", raising=False)
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("asked on stdin"))
    with pytest.raises(RemoteCodeRefused, match="LIGHTNING_DROP_TRUST_REMOTE_CODE=1") as err:
        load_tokenizer(str(tmp_path))
    _one_line(str(err.value))


# ------------------------------------------------------------------------------------------- stdin
@pytest.fixture(scope="module")
def nemotron_dir(tmp_path_factory):
    from lightning_drop.io.dropped_checkpoint import save_dropped
    from lightning_drop.export import export_nemotron_nas
    from lightning_drop.core.modeling_dropped import apply_drop
    from lightning_drop.io.tiny_models import tiny_model

    model, tok = tiny_model("llama")
    apply_drop(model, attn=[1], mlp=[2])
    root = tmp_path_factory.mktemp("nemotron")
    save_dropped(model, root / "src", tokenizer=tok)
    return export_nemotron_nas(root / "src", root / "nas", dtype="f32")


def test_nemotron_export_loads_without_asking(nemotron_dir, monkeypatch):
    """A Nemotron-NAS export names remote code in its config; loading it (model and tokenizer) never asks."""
    from lightning_drop.io.model_loading import load_model, load_tokenizer

    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "n")
    monkeypatch.delenv("LIGHTNING_DROP_TRUST_REMOTE_CODE", raising=False)
    model, tok = load_model(str(nemotron_dir))
    assert tok is not None and load_tokenizer(str(nemotron_dir)) is not None
    assert asked == []


def test_cli_never_waits_on_stdin(nemotron_dir, c4_path):
    """stdin is a pipe that never closes: a prompt would block (transformers waits 15 s, then goes on)."""
    proc = subprocess.Popen([sys.executable, "-m", "lightning_drop.cli", "perplexity", "--model", str(nemotron_dir),
                             "--data", str(c4_path), "--seq-len", "16", "--num-windows", "1", "--batch-size", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "[y/N]" not in out + err and "perplexity" in out
