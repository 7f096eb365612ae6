"""`python -m lightning_drop.vision.run fit --config configs/vision_digits.yaml` (LightningCLI).

Model and data are given by `class_path` (subclass mode), so the same YAML also serves a project-wide
LightningCLI entry that accepts any LightningModule / LightningDataModule.
"""

from __future__ import annotations

import sys
from typing import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


def main(argv: Sequence[str] | None = None) -> LightningCLI:
    import lightning_drop.vision  # noqa: F401  (registers the dropped vision classes)

    return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, args=list(sys.argv[1:] if argv is None else argv),
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
