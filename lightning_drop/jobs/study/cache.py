"""The study's on-disk cache: one JSON file per item under `OUTPUT/cache/`, written atomically, named by a hash
of exactly the settings the item depends on.

The keys are the cache format: changing what goes into one makes every earlier study recompute, so the
payloads below are kept as they were when the first caches were written (a setting added later enters a key
only when it differs from the value earlier caches implied, e.g. a shuffled calibration).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from ...io.atomic_io import read_json, write_json
from ...core.options import CalibrationConfig
from .config import StudyConfig, SweepSpec

CACHE_VERSION = 1


def key_of(payload: Any) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: written into OUTPUT/cache by the study that made it: only such a folder is resumed (written into without
#: --overwrite); a folder that merely has a `cache/` subfolder is someone else's
MANIFEST = "study-cache.json"
WRITTEN_BY = "lightning-drop study"
#: what each kind of entry must hold to be one this study wrote (all are JSON objects)
ENTRY_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "scores": {"attn": list, "mlp": list}, "drops": {"sets": dict},
    "points": {"drop_attn": list, "drop_mlp": list, "params": int},
}


def is_study_output(out: Path) -> bool:
    """Whether `out` is the output of a study (its cache carries the manifest a study writes)."""
    manifest = out / "cache" / MANIFEST
    if not manifest.is_file():
        return False
    return read_json(manifest, "the manifest of a study's cache", {"written_by": str})["written_by"] == WRITTEN_BY


class Cache:
    """One JSON per item under OUTPUT/cache; counts what it computed (timing-free evidence of reuse)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "cache"
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MANIFEST).is_file():
            write_json(self.root / MANIFEST, {"written_by": WRITTEN_BY, "cache_version": CACHE_VERSION})
        self.computed: dict[str, int] = {"scores": 0, "drops": 0, "points": 0}
        self.reused: dict[str, int] = {"scores": 0, "drops": 0, "points": 0}
        self.retimed = 0  # cached points whose speed was re-measured (timed on another machine)

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}.json"

    def get(self, kind: str, key: str) -> Any | None:
        p = self.path(kind, key)
        if not p.is_file():
            return None
        try:
            json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # never written non-atomically by us; treat as missing
            return None
        return read_json(p, f"a study cache entry of kind '{kind}' (delete the file to recompute it)",
                         ENTRY_KEYS.get(kind, {}))

    def get_or_compute(self, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        hit = self.get(kind, key)
        if hit is not None:
            self.reused[kind] = self.reused.get(kind, 0) + 1
            return hit
        value = compute()
        write_json(self.path(kind, key), value)
        self.computed[kind] = self.computed.get(kind, 0) + 1
        return value



class CacheKeys:
    """The key of each cached item of one study: scores, iterative drop sets and evaluated points."""

    def __init__(self, config: StudyConfig) -> None:
        self.cfg = config

    def model(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "dtype": self.cfg.model_dtype}

    @staticmethod
    def calibration(calib: CalibrationConfig) -> dict[str, Any]:
        """The calibration settings scores depend on; batch size does not change them (token-weighted means)."""
        d = {k: getattr(calib, k) for k in ("source", "num_samples", "seq_len", "text_field")}
        if calib.shuffle:  # unshuffled windows are the first ones whatever the seed: keys as before
            d.update(shuffle=True, seed=calib.seed)
        return d

    def scores(self, calib: CalibrationConfig, metric: str, seed: int | None = None, span: int | None = None) -> str:
        return key_of({"kind": "scores", **self.model(), "calibration": self.calibration(calib), "metric": metric,
                       "seed": self.cfg.seed if seed is None else seed, **({"span": span} if span else {})})

    def drops(self, sweep: SweepSpec, calib: CalibrationConfig, target: str) -> str:
        return key_of({"kind": "drops", **self.model(), "calibration": self.calibration(calib),
                       "metric": sweep.metric, "target": target, "step": sweep.step,
                       "seed": self.cfg.seed_for(sweep)})

    def mc(self, task: dict[str, Any], attn: list[int], mlp: list[int]) -> str:
        return key_of({"kind": "mc", **self.model(), "task": task, "attn": sorted(attn), "mlp": sorted(mlp)})

    def point(self, eval_key: dict[str, Any], attn: list[int], mlp: list[int]) -> str:
        return key_of({"kind": "point", **self.model(), "eval": eval_key, "attn": sorted(attn), "mlp": sorted(mlp)})
