"""`TextDataModule`: packed token windows for training, validation and importance calibration.

Every argument is a plain value so a LightningCLI YAML can set it. Validation is the contiguous TAIL of the
window stream (not a random subset): windows cut across document boundaries, so a random split would put
halves of the same document in train and val; a tail split shares at most one document.
"""

from __future__ import annotations

import warnings
from typing import Any, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..io.text_data import load_documents, make_windows
from ..errors import UserError


class WindowDataset(Dataset):
    """Rows of a [n, T] window tensor as model inputs (no padding, so the mask is all ones)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object passes through; a str goes through the model catalogue (`tiny-llama`, dirs, hub)."""
    if not isinstance(tokenizer, str):
        return tokenizer
    from ..io.model_loading import load_tokenizer

    return load_tokenizer(tokenizer)


class TextDataModule(pl.LightningDataModule):
    """Documents from `source` (see `text_data.load_documents`) packed into `seq_len` windows, split train/val.

    Args:
        tokenizer: model reference whose tokenizer to use (`tiny-llama`, `smollm2-135m`, a path, a hub id);
            a tokenizer object is accepted from Python.
        source, text_field, split, limit_documents: where the text comes from (`text_data.load_documents`).
        seq_len: tokens per window. batch_size: windows per batch.
        val_fraction: share of windows (the tail of the stream) held out for validation/test; in (0, 1).
        num_workers: DataLoader workers. seed: train shuffling order.
        calibration_samples: size of `calibration_batch()` (the first validation windows).
        max_train_windows: cap on training windows (the first ones), None for all.
    """

    def __init__(
        self,
        tokenizer: Union[str, Any] = "tiny-llama",
        source: str = "c4-sample",
        text_field: str = "text",
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        calibration_samples: int = 16,
        seed: int = 0,
        max_train_windows: int | None = None,
        split: str | None = None,
        limit_documents: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(tokenizer, str):
            if not tokenizer:
                raise UserError("tokenizer must be a model reference such as 'tiny-llama', got ''")
        elif not callable(tokenizer) or getattr(tokenizer, "eos_token_id", None) is None:
            raise UserError(f"tokenizer must be a model reference str or a tokenizer with an EOS token, "
                             f"got {type(tokenizer).__name__}")
        if not isinstance(source, str) or not source:
            raise UserError(f"source must be a non-empty str, got {source!r}")
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0), ("calibration_samples", calibration_samples, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, value in (("max_train_windows", max_train_windows), ("limit_documents", limit_documents)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be an int >= 1 or None, got {value!r}")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        self._tokenizer_ref = tokenizer
        self._tokenizer: Any = None
        self.source, self.text_field, self.split, self.limit_documents = source, text_field, split, limit_documents
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.num_workers, self.calibration_samples, self.seed = num_workers, calibration_samples, seed
        self.max_train_windows = max_train_windows
        self.train_windows: torch.Tensor | None = None
        self.val_windows: torch.Tensor | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self._tokenizer_ref)
        return self._tokenizer

    def _documents(self) -> list[str]:
        return load_documents(self.source, text_field=self.text_field, split=self.split, limit=self.limit_documents)

    def prepare_data(self) -> None:
        """Runs once per node: fetches sample data into the cache before ranks read it."""
        self._documents()

    def setup(self, stage: str | None = None) -> None:
        """Tokenize and pack once; the tail `val_fraction` of windows is validation (and test)."""
        if self.train_windows is not None:
            return
        windows = make_windows(self.tokenizer, self._documents(), self.seq_len, None)
        n = windows.shape[0]
        n_val = max(1, round(n * self.val_fraction))
        if n - n_val < 1:
            raise UserError(f"only {n} windows of {self.seq_len} tokens from {self.source!r}: need at least 2 "
                             f"for a train/val split; lower seq_len or add text")
        self.train_windows, self.val_windows = windows[: n - n_val], windows[n - n_val:]
        if self.max_train_windows is not None:
            self.train_windows = self.train_windows[: self.max_train_windows]
        if n_val < self.calibration_samples:
            warnings.warn(f"calibration_samples={self.calibration_samples} but only {n_val} validation windows; "
                          f"calibrating on {n_val}", stacklevel=2)

    def _loader(self, windows: torch.Tensor | None, shuffle: bool) -> DataLoader:
        if windows is None:
            raise RuntimeError("TextDataModule.setup() must run before asking for a dataloader")
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(WindowDataset(windows), batch_size=self.batch_size, shuffle=shuffle, generator=gen,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_windows, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_windows, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same windows as validation: the sample corpora are too small for a third split."""
        return self._loader(self.val_windows, shuffle=False)

    def calibration_batch(self) -> dict[str, torch.Tensor]:
        """A fixed batch (the first `calibration_samples` validation windows) for importance scores."""
        if self.val_windows is None:
            self.setup("fit")
        ids = self.val_windows[: self.calibration_samples].clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
