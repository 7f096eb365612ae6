"""Image classification data for Lightning: scikit-learn digits (offline default), image folders, HF datasets.

Images become float tensors (3, S, S), resized with `F.interpolate` (bilinear), scaled to [0, 1] and normalized
by `mean`/`std` per channel (grayscale is repeated to 3 channels). The train/val/test split is a fixed
stratified-free permutation drawn from `seed`, so every run and every rank sees the same split.
Sources:
- `"digits"`: `sklearn.datasets.load_digits` (1797 8x8 handwritten digits, bundled with scikit-learn);
- a local directory with one sub-folder per class (images read with PIL; classes sorted by folder name);
- `"hf:<name>"` (optionally `"hf:<name>:<config>"`): a Hugging Face dataset with an image and a label column
  (needs network or a local HF cache; offline it fails with one clear line).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] -> (N, 3, size, size)."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] == 4:
        images = images[:, :3]
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0)


def load_digits_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    return _resize(x, image_size), torch.tensor(d.target, dtype=torch.long), [str(c) for c in d.target_names]


def _pil_to_tensor(img: Any) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def load_folder_tensors(root: str | os.PathLike, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                with Image.open(f) as img:
                    t = _pil_to_tensor(img).unsqueeze(0)
                images.append(_resize(t, image_size))
                labels.append(label)
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {root}")
    return torch.cat(images), torch.tensor(labels), classes


def load_hf_tensors(ref: str, image_size: int, split: str = "train", image_key: str | None = None,
                    label_key: str | None = None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import datasets

    parts = ref.split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 else None)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, no such split
        raise UserError(f"cannot load Hugging Face dataset '{ref}' split '{split}' (needs network or a local "
                         f"cache; offline use source='digits' or an image folder): {str(err).splitlines()[0]}") from err
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    cols = ds.column_names
    image_key = image_key or next((c for c in ("image", "img", "pixel_values") if c in cols), None)
    label_key = label_key or next((c for c in ("label", "labels", "fine_label") if c in cols), None)
    if image_key is None or label_key is None:
        raise UserError(f"dataset '{ref}' has columns {cols}: pass image_key and label_key")
    images = torch.cat([_resize(_pil_to_tensor(r[image_key]).unsqueeze(0), image_size) for r in ds])
    labels = torch.tensor(ds[label_key], dtype=torch.long)
    feature = ds.features.get(label_key)
    classes = list(getattr(feature, "names", None) or [str(i) for i in range(int(labels.max()) + 1)])
    return images, labels, classes


class ImageDataModule(L.LightningDataModule):
    """Batches of (images (B, 3, S, S), labels (B,)) for classification.

    Args:
        source: "digits" (offline default), a class-per-folder directory, or "hf:<dataset>[:<config>]".
        image_size: side of the square images fed to the model (digits are upscaled from 8x8).
        val_fraction / test_fraction: held-out shares of the shuffled data (fixed by `seed`).
        calibration_size: images `calibration_dataloader()` yields for importance scoring (from train).
    """

    def __init__(self, source: str = "digits", image_size: int = 32, batch_size: int = 64, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, seed: int = 0, num_workers: int = 0,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 calibration_size: int = 256, hf_split: str = "train", hf_limit: int | None = None,
                 image_key: str | None = None, label_key: str | None = None) -> None:
        super().__init__()
        if image_size < 4:
            raise UserError(f"image_size must be at least 4, got {image_size}")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise UserError("mean and std need 3 values each, std positive")
        self.save_hyperparameters()
        self.source, self.image_size, self.batch_size = source, image_size, batch_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.num_workers, self.calibration_size = num_workers, calibration_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.classes: list[str] = []
        self.splits: dict[str, TensorDataset] = {}

    @property
    def num_classes(self) -> int:
        self._load()
        return len(self.classes)

    def _load(self) -> None:
        if self.splits:
            return
        h = self.hparams
        if self.source == "digits":
            x, y, classes = load_digits_tensors(self.image_size)
        elif self.source.startswith("hf:"):
            x, y, classes = load_hf_tensors(self.source[3:], self.image_size, h.hf_split, h.image_key, h.label_key,
                                            h.hf_limit)
        else:
            x, y, classes = load_folder_tensors(self.source, self.image_size)
        x = (x - self.mean) / self.std
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(y), generator=g)
        n_test, n_val = int(round(len(y) * self.test_fraction)), int(round(len(y) * self.val_fraction))
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        if len(parts["train"]) == 0:
            raise UserError(f"only {len(y)} images: nothing left for training")
        self.classes = classes
        self.splits = {k: TensorDataset(x[idx], y[idx]) for k, idx in parts.items()}

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self._load()
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def calibration_batch(self) -> dict[str, torch.Tensor]:
        """The calibration images as one batch, as the importance callbacks take it from any datamodule."""
        self._load()
        ds = self.splits["train"]
        return {"pixel_values": ds[:min(self.calibration_size, len(ds))][0]}

    def calibration_dataloader(self) -> DataLoader:
        """The first `calibration_size` training images (fixed order) for importance scoring."""
        self._load()
        ds = self.splits["train"]
        n = min(self.calibration_size, len(ds))
        return DataLoader(TensorDataset(*ds[:n]), batch_size=self.batch_size, shuffle=False)
