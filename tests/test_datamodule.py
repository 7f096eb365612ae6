"""TextDataModule: argument validation, the tail val split, batches, calibration batch, YAML, a real fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_drop.io.text_data import load_documents, make_windows
from lightning_drop.lightning.datamodule import TextDataModule

SEQ = 128


@pytest.fixture
def small_c4(tmp_path: Path, c4_path: Path) -> Path:
    """The first 20 real C4 documents (~50k bytes -> ~390 windows of 128 byte tokens)."""
    path = tmp_path / "c4_20.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in load_documents(c4_path, limit=20)))
    return path


def make_dm(tok, src: Path, **kw) -> TextDataModule:
    args = dict(tokenizer=tok, source=str(src), seq_len=SEQ, batch_size=4, val_fraction=0.1, seed=0,
                calibration_samples=6)
    args.update(kw)
    return TextDataModule(**args)


@pytest.mark.parametrize("bad, match", [
    (dict(seq_len=0), "seq_len must be an int >= 1"),
    (dict(batch_size=2.5), "batch_size must be an int >= 1"),
    (dict(num_workers=-1), "num_workers must be an int >= 0"),
    (dict(calibration_samples=0), "calibration_samples must be an int >= 1"),
    (dict(val_fraction=0.0), r"val_fraction must be in \(0, 1\)"),
    (dict(val_fraction=1.0), r"val_fraction must be in \(0, 1\)"),
    (dict(max_train_windows=0), "max_train_windows must be an int >= 1 or None"),
    (dict(source=""), "source must be a non-empty str"),
    (dict(tokenizer=""), "tokenizer must be a model reference"),
    (dict(tokenizer=object()), "tokenizer must be a model reference str or a tokenizer with an EOS token"),
])
def test_bad_arguments_fail_in_init(byte_tokenizer, c4_path: Path, bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_dm(byte_tokenizer, c4_path, **bad)


def test_split_is_the_tail_of_the_window_stream(byte_tokenizer, small_c4: Path) -> None:
    dm = make_dm(byte_tokenizer, small_c4)
    dm.setup("fit")
    every = make_windows(byte_tokenizer, load_documents(small_c4), SEQ, None)
    n_val = round(len(every) * 0.1)
    assert torch.equal(dm.train_windows, every[:-n_val]) and torch.equal(dm.val_windows, every[-n_val:])
    capped = make_dm(byte_tokenizer, small_c4, max_train_windows=7)
    capped.setup("fit")
    assert torch.equal(capped.train_windows, every[:7]) and torch.equal(capped.val_windows, every[-n_val:])


def test_batches_are_dicts_of_long_windows_with_full_masks(byte_tokenizer, small_c4: Path) -> None:
    dm = make_dm(byte_tokenizer, small_c4)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].shape == (4, SEQ) and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["attention_mask"], torch.ones(4, SEQ, dtype=torch.long))
    val = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.val_windows)  # val in order, nothing dropped
    train = torch.cat([b["input_ids"] for b in dm.train_dataloader()])
    assert sorted(map(tuple, train.tolist())) == sorted(map(tuple, dm.train_windows.tolist()))
    assert not torch.equal(train, dm.train_windows)  # shuffled ...
    again = make_dm(byte_tokenizer, small_c4)
    again.setup("fit")
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"], train[:4])  # ... reproducibly


def test_calibration_batch_is_fixed_first_val_windows(byte_tokenizer, small_c4: Path) -> None:
    dm = make_dm(byte_tokenizer, small_c4)
    batch = dm.calibration_batch()  # sets up on demand
    assert torch.equal(batch["input_ids"], dm.val_windows[:6]) and batch["attention_mask"].sum() == 6 * SEQ
    batch["input_ids"].zero_()  # a caller mutating its copy must not change the next one
    assert torch.equal(dm.calibration_batch()["input_ids"], dm.val_windows[:6])
    big = make_dm(byte_tokenizer, small_c4, calibration_samples=10_000)
    with pytest.warns(UserWarning, match="calibrating on"):
        big.setup("fit")
    assert big.calibration_batch()["input_ids"].shape[0] == big.val_windows.shape[0]


def test_too_little_text_for_a_split(byte_tokenizer, tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("x" * 150)
    with pytest.raises(ValueError, match="only 1 windows of 128 tokens"):
        make_dm(byte_tokenizer, tmp_path / "one.txt").setup("fit")
    with pytest.raises(ValueError, match="too little text"):
        make_dm(byte_tokenizer, tmp_path / "one.txt", seq_len=1024).setup("fit")
    with pytest.raises(RuntimeError, match=r"setup\(\) must run"):
        make_dm(byte_tokenizer, tmp_path / "one.txt").train_dataloader()


def test_yaml_config_with_model_reference(small_c4: Path) -> None:
    """Everything a LightningCLI YAML needs: plain values, the tokenizer as a catalogue name."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    cfg = parser.parse_string(f"data:\n  tokenizer: tiny-llama\n  source: {small_c4}\n  seq_len: 64\n"
                              f"  max_train_windows: 3\n  limit_documents: 2\n  calibration_samples: 4\n")
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, TextDataModule) and dm.hparams["tokenizer"] == "tiny-llama"
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_windows.shape == (3, 64) and dm.tokenizer.eos_token_id is not None


def test_fit_a_tiny_model_on_it(byte_tokenizer, small_c4: Path) -> None:
    """The batches feed a causal LM under a real Trainer (train + val loops run)."""
    import lightning.pytorch as pl

    from lightning_drop.io.tiny_models import tiny_model

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_model("llama")[0].train()

        def training_step(self, batch, _):
            return self.model(**batch, labels=batch["input_ids"]).loss

        def validation_step(self, batch, _):
            self.log("val_loss", self.model(**batch, labels=batch["input_ids"]).loss)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    dm = make_dm(byte_tokenizer, small_c4, seq_len=32, max_train_windows=8)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LM(), datamodule=dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val_loss"])
