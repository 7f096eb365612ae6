"""Files a user points the tool at never run code: no arbitrary unpickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from lightning_drop.distributed import checkpoint_meta, verify_checkpoint


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
        "model": {"class_path": "lightning_drop.module.DropModule", "init_args": {"model": "tiny-llama"}},
        "data": {"class_path": "lightning_drop.datamodule.TextDataModule",
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
def test_fit_ckpt_path_with_pickled_code_is_refused(tmp_path, c4_path, marker, monkeypatch, layout):
    """`lightning-drop fit --ckpt_path` checks the checkpoint before anything (LayerDrop's resume read, Lightning's
    restore) unpickles it, and says why in one line."""
    from lightning_drop.lightning_cli import run_lightning_cli

    monkeypatch.chdir(tmp_path)
    evil = {"state_dict": {}, "callbacks": {"LayerDrop": Payload(marker)}, "lightning_drop": None}
    if layout == "file":
        ckpt = tmp_path / "evil.ckpt"
        torch.save(evil, ckpt)
    else:
        ckpt = tmp_path / "evil_dir"
        ckpt.mkdir()
        torch.save(evil, ckpt / "meta.pt")
    with pytest.raises(SystemExit) as err:
        run_lightning_cli(["fit", "--config", str(_fit_config(tmp_path, c4_path)), "--ckpt_path", str(ckpt)])
    message = str(err.value.code)
    _one_line(message)
    assert message.startswith("lightning-drop fit: error:") and "refused to load" in message


@pytest.mark.parametrize("flag, expected", [([], True), (["--weights_only", "false"], False)])
def test_fit_restores_with_weights_only_unless_opted_out(tmp_path, c4_path, monkeypatch, flag, expected):
    """Lightning leaves `weights_only` to torch (which honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) and turns it
    off for URLs; `lightning-drop fit` passes True unless the user says otherwise."""
    import functools

    import lightning.pytorch as pl

    from lightning_drop.lightning_cli import run_lightning_cli

    monkeypatch.chdir(tmp_path)
    seen = []

    @functools.wraps(pl.Trainer.fit)  # LightningCLI builds the subcommand's options from this signature
    def fit(self, *args, **kwargs):
        seen.append(kwargs.get("weights_only"))

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    run_lightning_cli(["fit", "--config", str(_fit_config(tmp_path, c4_path)), *flag])
    assert seen == [expected]
