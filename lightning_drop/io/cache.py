"""The package's cache folder: converted models, GGUF hashes, downloaded task data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$LIGHTNING_DROP_CACHE`, default `~/.cache/lightning_drop`."""
    path = Path(os.environ.get("LIGHTNING_DROP_CACHE") or Path.home() / ".cache" / "lightning_drop")
    path.mkdir(parents=True, exist_ok=True)
    return path
