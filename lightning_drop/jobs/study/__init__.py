"""`lightning-drop study`: sweep (target x number dropped) on one model, cached per point, with a report.

One run of a study config:

1. loads the base model once; every point is a `copy.deepcopy` of it with a drop applied;
2. scores the model ONCE per (model, calibration, metric) and derives every one-shot drop set of every target
   and number from those scores (that is what one-shot means); iterative directions re-score after each step;
3. evaluates each distinct drop set: perplexity on held-out text (by default the windows of the calibration
   source that come AFTER the calibration windows, so the two never overlap), a small local multiple-choice
   task through lm-eval, decode speed measured base vs dropped alternately, KV-cache bytes per token, params;
4. writes `results.json`, `results.csv`, `report.html` (figures embedded) and `report.md` + PNGs;
5. optionally saves one dropped checkpoint, and with `--budget` runs the automated selection.

Everything expensive is cached in `OUTPUT/cache/` as one JSON file per item, written atomically and keyed by
a hash of exactly the settings it depends on (`cache`): a re-run recomputes nothing, an extended sweep
computes only the new points, an interrupted sweep resumes where it stopped, and two directions that reach
the same drop set share its evaluation. SDR is computed on the total (prefill + decode) speedup.

Modules: `config` (the YAML's typed dataclasses; its `recovery` section in `recovery_config`), `cache`,
`sweep` (inputs, scores, drop sets), `measure` (one point's evaluation), `budget` (automated selection), `run`
(`Study`, `study_main`), `report` (table, HTML and markdown) with `figures` (its PNGs); both are imported only when a report is written, as the
figures load matplotlib.
"""

from __future__ import annotations

from ...core.options import CalibrationConfig
from .budget import BUDGET_KINDS, auto_select, derive, meets_budget, parse_budget, quality_loss
from .cache import CACHE_VERSION, Cache, CacheKeys, key_of
from .config import (
    QUALITY_KEYS,
    CheckpointSpec,
    EvalSpec,
    MCSpec,
    PerplexitySpec,
    SelectionSpec,
    SpeedSpec,
    StudyConfig,
    SweepSpec,
    load_config,
)
from .measure import PointEvaluator
from .run import CSV_COLUMNS, Study, format_table, study_main, write_csv
from .sweep import DropSets, StudyInputs

_derive = derive  # the old private name, which tests and notebooks imported

__all__ = [
    "BUDGET_KINDS", "CACHE_VERSION", "CSV_COLUMNS", "QUALITY_KEYS", "Cache", "CacheKeys", "CalibrationConfig",
    "CheckpointSpec", "DropSets", "EvalSpec", "MCSpec", "PerplexitySpec", "PointEvaluator", "SelectionSpec",
    "SpeedSpec", "Study", "StudyConfig", "StudyInputs", "SweepSpec", "auto_select", "derive", "format_table",
    "key_of", "load_config", "meets_budget", "parse_budget", "quality_loss", "study_main", "write_csv",
]
