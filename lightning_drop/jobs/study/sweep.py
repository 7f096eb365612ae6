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
a hash of exactly the settings it depends on: scores by (model, calibration, metric), iterative drop sets by
(model, calibration, metric, target, step), evaluations by (model, evaluation settings, speed settings, drop
set). A re-run recomputes nothing, an extended sweep computes only the new points, an interrupted sweep
resumes where it stopped, and two directions that reach the same drop set share its evaluation. Timings
carry the machine they were measured on (`Study.machine`); a cache reused elsewhere keeps its quality results
and re-times its points. SDR is computed on the total (prefill + decode) speedup, as the paper times.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ...atomic_io import atomic_write_text, write_json
from ...errors import UserError
from ...options import METRICS, SCHEDULES, TARGETS

CACHE_VERSION = 1
BUDGET_KINDS = ("speedup", "params", "kv")
QUALITY_KEYS = ("perplexity", "mc")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class CalibrationSpec:
    """Text the importance scores are computed on (paper: 256 x 2048 tokens of C4)."""

    source: str = "c4-sample"
    num_samples: int = 16
    seq_len: int = 512
    text_field: str = "text"
    batch_size: int = 4

    def check(self, where: str) -> None:
        _positive(where, num_samples=self.num_samples, seq_len=self.seq_len, batch_size=self.batch_size)


@dataclass
class PerplexitySpec:
    """Held-out perplexity. `source: calibration` = the calibration source's windows after the calibration ones."""

    source: str = "calibration"
    num_windows: int = 8
    seq_len: int = 512
    text_field: str = "text"
    batch_size: int = 4

    def check(self, where: str) -> None:
        _positive(where, num_windows=self.num_windows, batch_size=self.batch_size)
        if self.seq_len < 2:
            raise UserError(f"{where}.seq_len must be >= 2, got {self.seq_len}")


@dataclass
class MCSpec:
    """A small local multiple-choice task (lm-eval, shipped task YAML filled with `data`)."""

    task: str = "hellaswag_sample"
    data: str = "../shared/data/hellaswag_val_first1000.jsonl"
    limit: int | None = 50
    batch_size: int = 8
    required: bool = False

    def check(self, where: str) -> None:
        _positive(where, batch_size=self.batch_size)
        if self.limit is not None and self.limit < 1:
            raise UserError(f"{where}.limit must be >= 1 or null, got {self.limit}")


@dataclass
class EvalSpec:
    perplexity: PerplexitySpec = field(default_factory=PerplexitySpec)
    mc: MCSpec | None = field(default_factory=MCSpec)

    def check(self, where: str) -> None:
        self.perplexity.check(f"{where}.perplexity")
        if self.mc is not None:
            self.mc.check(f"{where}.mc")


@dataclass
class SpeedSpec:
    """Greedy generation with the KV cache; base and dropped timed alternately (medians of `repeats`)."""

    enabled: bool = True
    batch_size: int = 1
    prompt_len: int = 64
    gen_len: int = 32
    repeats: int = 2
    warmup: int = 1

    def check(self, where: str) -> None:
        _positive(where, batch_size=self.batch_size, prompt_len=self.prompt_len, repeats=self.repeats)
        if self.gen_len < 2:
            raise UserError(f"{where}.gen_len must be >= 2, got {self.gen_len}")
        if self.warmup < 0:
            raise UserError(f"{where}.warmup must be >= 0, got {self.warmup}")


@dataclass
class SweepSpec:
    """One family of directions: every target x every num, under one metric/schedule/calibration."""

    name: str = "main"
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp", "block"])
    nums: list[int] = field(default_factory=lambda: [0, 4, 8])
    nums_per_target: dict[str, list[int]] = field(default_factory=dict)
    metric: str = "cosine"
    schedule: str = "one-shot"
    step: int = 1
    calibration: dict[str, Any] = field(default_factory=dict)  # overrides of the study's calibration

    def check(self, where: str) -> None:
        for t in list(self.targets) + list(self.nums_per_target):
            if t not in TARGETS:
                raise UserError(f"{where}: unknown target '{t}'; choose from {', '.join(TARGETS)}")
        if not self.targets and not self.nums_per_target:
            raise UserError(f"{where}: no targets given")
        if self.metric not in METRICS:
            raise UserError(f"{where}.metric: unknown metric '{self.metric}'; choose from {', '.join(METRICS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"{where}.schedule: unknown schedule '{self.schedule}'; choose from {', '.join(SCHEDULES)}")
        _positive(where, step=self.step)
        for t, nums in [("nums", self.nums)] + [(f"nums_per_target.{k}", v) for k, v in self.nums_per_target.items()]:
            bad = [n for n in nums if n < 0]
            if bad:
                raise UserError(f"{where}.{t}: numbers dropped must be >= 0, got {bad}")
        fields = {f.name for f in dataclasses.fields(CalibrationSpec)}
        unknown = set(self.calibration) - fields
        if unknown:
            raise UserError(f"{where}.calibration: unknown key(s) {sorted(unknown)}; allowed: {sorted(fields)}")

    def plan(self) -> dict[str, list[int]]:
        """{target: sorted nums}; `nums_per_target` overrides (or adds) a target's nums."""
        out = {t: sorted(set(self.nums)) for t in self.targets}
        out.update({t: sorted(set(v)) for t, v in self.nums_per_target.items()})
        return out


@dataclass
class CheckpointSpec:
    """One dropped checkpoint written into the output directory, ready to load."""

    target: str = "attn"
    num: int = 8
    sweep: str = "main"

    def check(self, where: str) -> None:
        if self.target not in TARGETS:
            raise UserError(f"{where}.target: unknown target '{self.target}'; choose from {', '.join(TARGETS)}")
        _positive(where, num=self.num)


@dataclass
class SelectionSpec:
    """Automated selection defaults (the command line's --budget / --max-quality-loss override them)."""

    budget: str | None = None
    max_quality_loss: float | None = None
    quality: str = "perplexity"
    sweep: str = "main"

    def check(self, where: str) -> None:
        if self.quality not in QUALITY_KEYS:
            raise UserError(f"{where}.quality: choose from {', '.join(QUALITY_KEYS)}, got '{self.quality}'")
        if self.budget is not None:
            parse_budget(self.budget)
        if self.max_quality_loss is not None and self.max_quality_loss < 0:
            raise UserError(f"{where}.max_quality_loss must be >= 0, got {self.max_quality_loss}")


@dataclass
class StudyConfig:
    """A study: what `configs/study/*.yaml` holds (validated on construction through `from_dict`)."""

    model: str
    name: str = "study"
    output: str = "runs/study"
    dtype: str = "float32"
    seed: int = 0
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    sweeps: list[SweepSpec] = field(default_factory=lambda: [SweepSpec()])
    checkpoint: CheckpointSpec | None = None
    selection: SelectionSpec = field(default_factory=SelectionSpec)

    def check(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"dtype: choose from float32, bfloat16, float16, got '{self.dtype}'")
        self.calibration.check("calibration")
        self.eval.check("eval")
        self.speed.check("speed")
        if not self.sweeps:
            raise UserError("sweeps: give at least one sweep")
        names = [s.name for s in self.sweeps]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"sweeps: names must be unique, repeated: {dup}")
        for i, s in enumerate(self.sweeps):
            s.check(f"sweeps[{i}] ({s.name})")
        if self.checkpoint is not None:
            self.checkpoint.check("checkpoint")
            if self.checkpoint.sweep not in names:
                raise UserError(f"checkpoint.sweep: no sweep named '{self.checkpoint.sweep}'; sweeps: {names}")
        self.selection.check("selection")
        if self.selection.sweep not in names:
            raise UserError(f"selection.sweep: no sweep named '{self.selection.sweep}'; sweeps: {names}")

    def calibration_for(self, sweep: SweepSpec) -> CalibrationSpec:
        return dataclasses.replace(self.calibration, **sweep.calibration)

    def sweep(self, name: str) -> SweepSpec:
        return next(s for s in self.sweeps if s.name == name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudyConfig":
        data = dict(data)
        if "sweep" in data:  # a single sweep may be written without the list
            if "sweeps" in data:
                raise UserError("give either 'sweep' (one) or 'sweeps' (a list), not both")
            data["sweeps"] = [data.pop("sweep")]
        cfg = _build(cls, data, "")
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike) -> StudyConfig:
    """Parse and validate a study YAML; errors name the file and the offending key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return StudyConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise UserError(f"{path}: {err}") from None


def _positive(where: str, **values: int) -> None:
    for k, v in values.items():
        if v < 1:
            raise UserError(f"{where}.{k} must be >= 1, got {v}")


def _build(tp: Any, value: Any, where: str) -> Any:
    """Build a value of type `tp` from YAML data, with errors that name the key path."""
    label = where or "config"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise UserError(f"{label}: expected a mapping, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise UserError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        missing = [f.name for f in fields.values() if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise UserError(f"{label}: missing required key(s) {missing}")
        return tp(**kwargs)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int)) and item is int:  # "0,2,4" or a single number
            value = [x for x in str(value).split(",") if x.strip()]
        if not isinstance(value, list):
            raise UserError(f"{label}: expected a list, got {type(value).__name__} {value!r}")
        return [_build(item, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise UserError(f"{label}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_build(kt, k, label): _build(vt, v, f"{label}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{label}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{label}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{label}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{label}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{label}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{label}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{label}: unsupported config type {tp}")


# ------------------------------------------------------------------------------------------------ budget
def parse_budget(text: str) -> tuple[str, float]:
    """`speedup=1.2` (decode speedup >= 1.2), `params=0.8` (params <= 0.8 x base), `kv=0.5` (KV <= 0.5 x base)."""
    kind, sep, value = str(text).partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS:
        raise UserError(f"budget '{text}': expected KIND=VALUE with KIND in {', '.join(BUDGET_KINDS)} "
                         "(e.g. speedup=1.2, params=0.8, kv=0.5)")
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"budget '{text}': '{value}' is not a number") from None
    if kind == "speedup" and v <= 1.0:
        raise UserError(f"budget '{text}': a speedup target must be > 1")
    if kind in ("params", "kv") and not 0.0 <= v < 1.0:
        raise UserError(f"budget '{text}': a {kind} ratio must be in [0, 1)")
    return kind, v


def meets_budget(row: Mapping[str, Any], kind: str, value: float) -> bool:
    if kind == "speedup":
        s = row.get("decode_speedup")
        return s is not None and s >= value
    r = row.get("param_ratio" if kind == "params" else "kv_ratio")
    return r is not None and r <= value


def quality_loss(row: Mapping[str, Any], base: Mapping[str, Any], quality: str = "perplexity") -> float | None:
    """Relative quality loss vs the baseline: ppl/ppl0 - 1 (perplexity), 1 - acc/acc0 (mc)."""
    if quality == "perplexity":
        p, p0 = row.get("perplexity"), base.get("perplexity")
        return None if p is None or not p0 else p / p0 - 1.0
    a, a0 = row.get("mc_acc"), base.get("mc_acc")
    return None if a is None or not a0 else 1.0 - a / a0


def auto_select(directions: Mapping[str, Sequence[int]], evaluate: Callable[[str, int], Mapping[str, Any]],
                base: Mapping[str, Any], budget: str | None = None, max_quality_loss: float | None = None,
                quality: str = "perplexity") -> dict[str, Any]:
    """Walk each direction with increasing n; stop it once it falls below the quality floor or meets the budget.

    `evaluate(direction, n)` returns a result row (computed lazily, so directions stopped early cost nothing
    more). The best configuration is the one meeting the budget with the least quality loss (ties: larger
    decode speedup); without a budget, the one with the largest decode speedup within the quality floor.
    """
    kind, value = parse_budget(budget) if budget else (None, None)
    floor = math.inf if max_quality_loss is None else max_quality_loss
    visited, walks, candidates = [], {}, []
    for direction, nums in directions.items():
        walk = {"visited": [], "stopped": "end of sweep"}
        for n in sorted(n for n in nums if n > 0):
            row = evaluate(direction, n)
            loss = quality_loss(row, base, quality)
            entry = {"direction": direction, "num": n, "quality_loss": loss,
                     "decode_speedup": row.get("decode_speedup"), "param_ratio": row.get("param_ratio"),
                     "kv_ratio": row.get("kv_ratio"), "row": dict(row)}
            walk["visited"].append(n)
            visited.append(entry)
            if loss is None or loss > floor:
                walk["stopped"] = f"quality floor at n={n} (loss {_fmt_loss(loss)} > {floor:g})"
                break
            if kind is None or meets_budget(row, kind, value):
                candidates.append(entry)
                if kind is not None:
                    walk["stopped"] = f"budget met at n={n}"
                    break
        walks[direction] = walk
    if kind is not None:
        key = lambda e: (e["quality_loss"], -(e["decode_speedup"] or 0.0))  # noqa: E731
    else:
        key = lambda e: (-(e["decode_speedup"] or 0.0), e["quality_loss"])  # noqa: E731
    best = min(candidates, key=key) if candidates else None
    return {"budget": budget, "max_quality_loss": max_quality_loss, "quality": quality, "best": best,
            "directions": walks, "evaluated": len(visited),
            "message": _selection_message(best, budget, max_quality_loss, quality)}


def _fmt_loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{100 * loss:+.1f}%"


def _selection_message(best: Mapping[str, Any] | None, budget: str | None, max_loss: float | None,
                       quality: str) -> str:
    cond = " and ".join(x for x in (f"budget {budget}" if budget else "",
                                    f"{quality} loss <= {100 * max_loss:g}%" if max_loss is not None else "") if x)
    if best is None:
        return f"no configuration of the sweep meets {cond or 'the request'}"
    r = best["row"]
    return (f"best under {cond or 'no constraint'}: {best['direction']} drop {best['num']} "
            f"(attention {r.get('drop_attn')}, MLP {r.get('drop_mlp')}): {quality} loss {_fmt_loss(best['quality_loss'])}, "
            f"decode speedup {_fmt(r.get('decode_speedup'), '.3f')}x, params {_fmt(r.get('param_ratio'), '.3f')}, "
            f"KV {_fmt(r.get('kv_ratio'), '.3f')} of base")


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


# ------------------------------------------------------------------------------------------------ cache
def key_of(payload: Any) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Cache:
    """One JSON per item under OUTPUT/cache; counts what it computed (timing-free evidence of reuse)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "cache"
        self.root.mkdir(parents=True, exist_ok=True)
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
            return json.loads(p.read_text())
        except json.JSONDecodeError:  # never written non-atomically by us; treat as missing
            return None

    def get_or_compute(self, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        hit = self.get(kind, key)
        if hit is not None:
            self.reused[kind] += 1
            return hit
        value = compute()
        write_json(self.path(kind, key), value)
        self.computed[kind] += 1
        return value


# ------------------------------------------------------------------------------------------------ study
def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _resolve_data_file(path: str) -> Path | None:
    """A data file given relative to the working directory, the repo root, or `$LIGHTNING_DROP_SHARED/data`."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    tries = [p]
    if not p.is_absolute():
        tries.append(Path(__file__).resolve().parents[3] / p)
    if shared := os.environ.get("LIGHTNING_DROP_SHARED"):
        tries.append(Path(shared) / "data" / p.name)
    return next((t for t in tries if t.is_file()), None)


class Study:
    """Runs one StudyConfig; `run()` returns the results document (also written to the output dir)."""

    def __init__(self, config: StudyConfig, output: str | os.PathLike | None = None, verbose: bool = True,
                 overwrite: bool = False) -> None:
        from ...atomic_io import check_output

        self.cfg = config
        self.out = Path(output or config.output)
        # an earlier run of a study (its cache is there) is resumed; anything else is the user's
        resumable = (self.out / "cache").is_dir()
        check_output(self.out, overwrite=overwrite or resumable, sources=[config.model])
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Cache(self.out)
        self.verbose = verbose
        self._model = None
        self._tok = None
        self._docs: dict[tuple[str, str], list[str]] = {}
        self._scores: dict[str, Any] = {}
        self._mc_include: Path | None = None
        self._task_manager: Any = None
        self.notes: list[str] = []

    # ---- lazily loaded pieces (a fully cached re-run loads nothing but the tokenizer-free results)
    def log(self, msg: str) -> None:
        if self.verbose:
            _log(msg)

    @property
    def model(self) -> Any:
        if self._model is None:
            import torch

            from ...models import load_model

            torch.manual_seed(self.cfg.seed)
            self.log(f"loading {self.cfg.model}")
            self._model, self._tok = load_model(self.cfg.model, dtype=self.cfg.dtype)
        return self._model

    @property
    def tokenizer(self) -> Any:
        _ = self.model
        return self._tok

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def docs(self, source: str, text_field: str) -> list[str]:
        from ...data import load_documents

        if (source, text_field) not in self._docs:
            self._docs[(source, text_field)] = load_documents(source, text_field=text_field)
        return self._docs[(source, text_field)]

    # ---- keys
    def model_key(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "dtype": self.cfg.dtype}

    def calib_key(self, calib: CalibrationSpec) -> dict[str, Any]:
        d = dataclasses.asdict(calib)
        d.pop("batch_size")  # does not change the scores (token-weighted means)
        return d

    def eval_key(self) -> dict[str, Any]:
        ppl = dataclasses.asdict(self.cfg.eval.perplexity)
        ppl.pop("batch_size")
        if ppl["source"] == "calibration":
            ppl["after"] = self._heldout_offset_spec()
        mc = self._mc_spec_key()
        speed = dataclasses.asdict(self.cfg.speed)
        return {"perplexity": ppl, "mc": mc, "speed": speed}

    def _mc_spec_key(self) -> dict[str, Any] | None:
        mc = self.cfg.eval.mc
        if mc is None or self.mc_data() is None:
            return None
        return {"task": mc.task, "data": Path(self.mc_data()).name, "limit": mc.limit}

    def _heldout_offset_spec(self) -> dict[str, Any]:
        base = self.cfg.calibration
        return {"source": base.source, "text_field": base.text_field, "tokens": self.heldout_offset_tokens()}

    def heldout_offset_tokens(self) -> int:
        """Tokens of the calibration stream to skip: the largest calibration of any sweep on the same source."""
        base = self.cfg.calibration
        spans = [c.num_samples * c.seq_len for c in (self.cfg.calibration_for(s) for s in self.cfg.sweeps)
                 if c.source == base.source and c.text_field == base.text_field]
        return max(spans + [base.num_samples * base.seq_len])

    def mc_data(self) -> Path | None:
        mc = self.cfg.eval.mc
        if mc is None:
            return None
        found = _resolve_data_file(mc.data)
        if found is None:
            msg = (f"multiple-choice data file not found: {mc.data} (the HellaSwag sample ships in ../shared/data "
                   "beside a clone of the repo; set eval.mc.data, $LIGHTNING_DROP_SHARED, or eval.mc: null)")
            if mc.required:
                raise FileNotFoundError(msg)
            if msg not in self.notes:
                self.notes.append(msg)
                print(f"note: {msg}; the multiple-choice evaluation is skipped", file=sys.stderr)
        return found

    # ---- data
    def calibration_batches(self, calib: CalibrationSpec) -> list[Any]:
        from ...data import make_windows

        windows = make_windows(self.tokenizer, self.docs(calib.source, calib.text_field), calib.seq_len,
                               calib.num_samples, max_positions=getattr(self.model.config, "max_position_embeddings", None))
        return [windows[i:i + calib.batch_size] for i in range(0, len(windows), calib.batch_size)]

    def heldout_windows(self) -> Any:
        """Perplexity windows; from the calibration source they start after every calibration token used."""
        import torch

        from ...data import _token_chunks

        if getattr(self, "_heldout", None) is not None:
            return self._heldout
        spec = self.cfg.eval.perplexity
        if spec.source == "calibration":
            base = self.cfg.calibration
            docs, skip = self.docs(base.source, base.text_field), self.heldout_offset_tokens()
        else:
            docs, skip = self.docs(spec.source, spec.text_field), 0
        need = skip + spec.num_windows * spec.seq_len
        stream: list[int] = []
        for ids in _token_chunks(self.tokenizer, docs, self.tokenizer.eos_token_id):
            stream.extend(ids)
            if len(stream) >= need:
                break
        avail = (len(stream) - skip) // spec.seq_len
        if avail < 1:
            raise UserError(f"eval.perplexity: no held-out text left: the source has {len(stream)} tokens and "
                             f"calibration uses the first {skip}; use fewer calibration samples or another "
                             "eval.perplexity.source (e.g. wiki-sample)")
        n = min(avail, spec.num_windows)
        if n < spec.num_windows:
            self.notes.append(f"only {n} held-out perplexity windows of {spec.seq_len} tokens available "
                              f"({spec.num_windows} asked)")
        self._heldout = torch.tensor(stream[skip:skip + n * spec.seq_len], dtype=torch.long).view(n, spec.seq_len)
        return self._heldout

    # ---- scores and drop sets
    def score_key(self, calib: CalibrationSpec, metric: str) -> str:
        return key_of({"kind": "scores", **self.model_key(), "calibration": self.calib_key(calib), "metric": metric,
                       "seed": self.cfg.seed})

    def scores(self, calib: CalibrationSpec, metric: str) -> dict[str, Any]:
        key = self.score_key(calib, metric)
        if key in self._scores:
            return self._scores[key]

        def compute() -> dict[str, Any]:
            from ...importance import compute_importance

            self.log(f"scoring {metric} on {calib.num_samples} x {calib.seq_len} tokens of {calib.source}")
            t0, c0 = time.perf_counter(), time.process_time()
            s = compute_importance(self.model, self.calibration_batches(calib), metric=metric, seed=self.cfg.seed)
            return {**s.to_dict(), "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                    "calibration": dataclasses.asdict(calib)}

        self._scores[key] = self.cache.get_or_compute("scores", key, compute)
        return self._scores[key]

    def drop_set(self, sweep: SweepSpec, target: str, num: int) -> tuple[list[int], list[int]]:
        from ...importance import ImportanceScores
        from ...selection import select_modules

        if num == 0:
            return [], []
        calib = self.cfg.calibration_for(sweep)
        if sweep.schedule == "one-shot":
            d = self.scores(calib, sweep.metric)
            return select_modules(ImportanceScores.from_dict(d), target, num)
        return self.iterative_drop_set(sweep, calib, target, num)

    def drops_key(self, sweep: SweepSpec, calib: CalibrationSpec, target: str) -> str:
        return key_of({"kind": "drops", **self.model_key(), "calibration": self.calib_key(calib),
                       "metric": sweep.metric, "target": target, "step": sweep.step, "seed": self.cfg.seed})

    def iterative_drop_set(self, sweep: SweepSpec, calib: CalibrationSpec, target: str,
                           num: int) -> tuple[list[int], list[int]]:
        """Iterative: the walk of `lightning_drop.schedule.drop_rounds`; every set and round on it is cached.

        The schedule is a function of (step, n) alone, so a set never depends on which other counts a sweep
        lists: the walk goes 0, step, 2 step, ... and a count n between two of them is the walk's set at
        `step * (n // step)` plus the `n % step` lowest of that round's scores (the first part of the next
        round's selection; no extra scoring pass). An extended sweep therefore reuses every stored round.
        """
        from ...importance import ImportanceScores, compute_importance
        from ...modeling_dropped import apply_drop, dropped_layers
        from ...schedule import drop_rounds
        from ...selection import max_droppable

        step = sweep.step
        key = self.drops_key(sweep, calib, target)
        have = self.cache.get("drops", key) or {"sets": {}}
        sets, rounds = have["sets"], have.get("rounds", [])  # rounds: the scores each re-scoring saw
        wanted = sorted({n for n in [num] + sweep.plan().get(target, []) if n > 0})
        missing = [n for n in wanted if str(n) not in sets]
        if not missing:
            self.cache.reused["drops"] += 1
            a, m = sets[str(num)]
            return a, m
        upto = max(wanted)
        limit = max_droppable(self.num_layers, target)
        if upto > limit:
            raise UserError(f"sweep '{sweep.name}': cannot drop {upto} {target} modules of a "
                             f"{self.num_layers}-layer model (at most {limit})")
        # round i was scored on the model with the walk's set at i * step dropped (older caches: same layout)
        scored = {int(r.get("at", i * step)): {**r, "at": int(r.get("at", i * step))} for i, r in enumerate(rounds)}
        need = sorted({step * ((n - 1) // step) for n in missing})  # the round that yields each missing n
        at = max(d for d in range(0, need[0] + 1, step) if d == 0 or str(d) in sets)
        self.log(f"iterative {sweep.metric} {target}: re-scoring after every {step} up to {upto}")
        model, batches = None, None

        def score(attn: list[int], mlp: list[int], index: int) -> ImportanceScores:
            nonlocal model, batches
            if index * step in scored:
                return ImportanceScores.from_dict(scored[index * step]["scores"])
            if model is None:
                model, batches = copy.deepcopy(self.model), self.calibration_batches(calib)
            gone_attn, gone_mlp = dropped_layers(model)
            new_attn, new_mlp = sorted(set(attn) - set(gone_attn)), sorted(set(mlp) - set(gone_mlp))
            if new_attn or new_mlp:
                apply_drop(model, attn=new_attn, mlp=new_mlp)
            return compute_importance(model, batches, metric=sweep.metric, seed=self.cfg.seed + index)

        # the last needed round is taken whole (up to the limit): its full set is where a longer walk resumes
        end = min(need[-1] + step, limit)
        walked = sets[str(at)] if at else ([], [])
        for rnd in drop_rounds(score, target, end, self.num_layers, "iterative", step, start=at, walked=walked):
            if rnd.at not in scored:
                scored[rnd.at] = {"at": rnd.at, "scores": rnd.scores.to_dict(), "drop_attn": rnd.attn,
                                  "drop_mlp": rnd.mlp}
            for n in range(rnd.at + 1, rnd.at + rnd.size + 1):
                if str(n) not in sets and (n in missing or n == rnd.at + step):
                    sets[str(n)] = list(rnd.set_at(n))
            have["sets"], have["rounds"] = sets, [scored[k] for k in sorted(scored)]
            write_json(self.cache.path("drops", key), have)  # resumable after every round
        self.cache.computed["drops"] += 1
        del model
        a, m = sets[str(num)]
        return a, m

    # ---- evaluation of one drop set
    def point(self, attn: list[int], mlp: list[int]) -> dict[str, Any]:
        """The evaluation of one drop set, cached; its speed is re-measured when it was timed on another machine.

        Quality does not depend on the machine but timings do, so the machine (see `machine`) is stored beside
        the speed fields instead of in the key: a cache moved to another machine keeps its perplexity and MC
        results and re-times only. (Points cached before this field existed have no machine: timed once more.)
        """
        key = key_of({"kind": "point", **self.model_key(), "eval": self.eval_key(), "attn": sorted(attn),
                      "mlp": sorted(mlp)})
        row = self.cache.get_or_compute("points", key, lambda: self.evaluate(attn, mlp))
        if self.cfg.speed.enabled and (attn or mlp) and row.get("speed_machine") != self.machine():
            from ...modeling_dropped import apply_drop

            self.log(f"re-timing drop attention {attn} MLP {mlp}: its speed was measured on "
                     f"{(row.get('speed_machine') or {}).get('node', 'an unrecorded machine')}")
            model = copy.deepcopy(self.model)
            apply_drop(model, attn=attn, mlp=mlp)
            row = {**row, **self.measure_speed(self.model, model)}
            del model
            write_json(self.cache.path("points", key), row)
            self.cache.retimed += 1
        return row

    def machine(self) -> dict[str, Any]:
        """What a timing depends on besides the model: host, CPU count, torch threads and version, device."""
        import platform

        import torch

        device = str(next(self._model.parameters()).device) if self._model is not None else "cpu"
        if device.startswith("cuda"):
            device += f" ({torch.cuda.get_device_name(torch.device(device))})"
        return {"node": platform.node(), "arch": platform.machine(), "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device}

    def measure_speed(self, base: Any, model: Any) -> dict[str, Any]:
        """Base vs dropped timed alternately (speed spec of the config), with the machine it ran on."""
        from ...speed import compare_speed

        sp = self.cfg.speed
        res = compare_speed(base, model, batch_size=sp.batch_size, prompt_len=sp.prompt_len, gen_len=sp.gen_len,
                            repeats=sp.repeats, warmup=sp.warmup, seed=self.cfg.seed)
        return dict(decode_speedup=res["speedup"]["decode"], prefill_speedup=res["speedup"]["prefill"],
                    total_speedup=res["speedup"]["total"],
                    base_decode_tokens_per_s=res["base"]["decode_tokens_per_s"],
                    decode_tokens_per_s=res["dropped"]["decode_tokens_per_s"],
                    kv_bytes_per_token=res["dropped"]["kv_bytes_per_token"],
                    base_kv_bytes_per_token=res["base"]["kv_bytes_per_token"], speed_machine=self.machine())

    def evaluate(self, attn: list[int], mlp: list[int]) -> dict[str, Any]:
        from ...evaluation import perplexity
        from ...modeling_dropped import apply_drop
        from ...speed import count_params, kv_cache_bytes_per_token

        base = self.model
        self.log(f"evaluating drop attention {attn} MLP {mlp}")
        t0, c0 = time.perf_counter(), time.process_time()
        model = copy.deepcopy(base)
        if attn or mlp:
            apply_drop(model, attn=attn, mlp=mlp)
        ppl_spec = self.cfg.eval.perplexity
        row: dict[str, Any] = {"drop_attn": sorted(attn), "drop_mlp": sorted(mlp)}
        row["perplexity"] = perplexity(model, self.heldout_windows(), batch_size=ppl_spec.batch_size)
        mc, data = self.cfg.eval.mc, self.mc_data()
        if mc is not None and data is not None:
            row.update(self.mc_eval(model, mc, data))
        sp = self.cfg.speed
        row["params"] = count_params(model)
        row["base_params"] = count_params(base)
        if sp.enabled and (attn or mlp):
            row.update(self.measure_speed(base, model))
        else:
            kv = kv_cache_bytes_per_token(model, prompt_len=min(sp.prompt_len, 32))
            row.update(kv_bytes_per_token=kv, base_kv_bytes_per_token=kv_cache_bytes_per_token(base, 
                       prompt_len=min(sp.prompt_len, 32)) if (attn or mlp) else kv)
            if not (attn or mlp):
                row.update(decode_speedup=1.0, prefill_speedup=1.0, total_speedup=1.0)
        row["kv_ratio"] = row["kv_bytes_per_token"] / row["base_kv_bytes_per_token"] \
            if row["base_kv_bytes_per_token"] else None
        row["param_ratio"] = row["params"] / row["base_params"]
        row["seconds"] = time.perf_counter() - t0
        row["cpu_seconds"] = time.process_time() - c0  # CPU time of all threads: comparable under machine load
        del model
        return row

    def mc_eval(self, model: Any, mc: MCSpec, data: Path) -> dict[str, Any]:
        """lm-eval on the in-memory model, with one TaskManager that indexes only our local task.

        (`evaluation.run_lm_eval` builds a TaskManager over all of lm-eval's several thousand task YAMLs on
        every call, which costs more than the evaluation itself at this size.)
        """
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from ...evaluation import local_task_dir

        if self._mc_include is None:
            self._mc_include = local_task_dir({mc.task: data}, self.out / "cache" / "tasks")
            self._task_manager = TaskManager(include_path=str(self._mc_include), include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=mc.batch_size, device="cpu"
                  if next(model.parameters()).device.type == "cpu" else str(next(model.parameters()).device))
        out = simple_evaluate(model=lm, tasks=[mc.task], limit=mc.limit, task_manager=self._task_manager,
                              log_samples=False, bootstrap_iters=0, verbosity="ERROR", random_seed=1234, numpy_random_seed=1234,
                              torch_random_seed=1234, fewshot_random_seed=1234)
        m = {k.split(",")[0]: v for k, v in out["results"][mc.task].items() if isinstance(v, (int, float))}
        n = out.get("n-samples", {}).get(mc.task, {})
        return {"mc_acc": m.get("acc_norm", m.get("acc")), "mc_acc_raw": m.get("acc"),
                "mc_n": int(n.get("effective", n.get("original", 0))) if n else mc.limit}

    # ---- the sweep
    def rows(self, cached_only: bool = False) -> list[dict[str, Any]]:
        """Every (sweep, target, num) point in sweep order: computed, or read from the cache.

        `cached_only`: the points already evaluated, nothing computed (the report of a budget search).
        """
        out = []
        base_row = None
        for sweep in self.cfg.sweeps:
            for target, nums in sweep.plan().items():
                for num in nums:
                    r = self.row(sweep, target, num, compute=not cached_only)
                    if r is None:
                        continue
                    out.append(r)
                    if num == 0:
                        base_row = out[-1]
        if base_row is None:
            out.insert(0, self.row(self.cfg.sweeps[0], "baseline", 0))
        return out

    def row(self, sweep: SweepSpec, target: str, num: int, compute: bool = True) -> dict[str, Any] | None:
        if not compute and num > 0 and sweep.schedule == "iterative":
            key = self.drops_key(sweep, self.cfg.calibration_for(sweep), target)
            if str(num) not in (self.cache.get("drops", key) or {"sets": {}})["sets"]:
                return None
        attn, mlp = self.drop_set(sweep, target, num)
        if not compute:
            key = key_of({"kind": "point", **self.model_key(), "eval": self.eval_key(), "attn": sorted(attn),
                          "mlp": sorted(mlp)})
            if self.cache.get("points", key) is None:
                return None
        p = self.point(attn, mlp)
        calib = self.cfg.calibration_for(sweep)
        return {"sweep": sweep.name, "target": target if num else "baseline", "num": num, "metric": sweep.metric,
                "schedule": sweep.schedule, "step": sweep.step if sweep.schedule == "iterative" else None,
                "calibration": calib.source, "num_samples": calib.num_samples, **p}

    def validate_plan(self) -> None:
        """Refuse every count the model cannot take before any point is computed, naming the config key."""
        from ...selection import require_droppable

        n = self._known_num_layers()
        for i, sweep in enumerate(self.cfg.sweeps):
            for target, nums in sweep.plan().items():
                key = "nums_per_target" if target in sweep.nums_per_target else "nums"
                if nums:
                    require_droppable(max(nums), n, target, where=f"sweeps[{i}] ({sweep.name}) {key}")
        ck = self.cfg.checkpoint
        if ck is not None:
            require_droppable(ck.num, n, ck.target, where="checkpoint.num")

    def _known_num_layers(self) -> int:
        """The model's depth, from cached scores when there are any (a cached re-run loads no model)."""
        for sweep in self.cfg.sweeps:
            hit = self.cache.get("scores", self.score_key(self.cfg.calibration_for(sweep), sweep.metric))
            if hit is not None:
                return len(hit["attn"])
        return self.num_layers

    def run(self, budget: str | None = None, max_quality_loss: float | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.validate_plan()
        budget = budget if budget is not None else self.cfg.selection.budget
        max_loss = max_quality_loss if max_quality_loss is not None else self.cfg.selection.max_quality_loss
        selection = None
        if budget is not None or max_loss is not None:
            selection = self.select(budget, max_loss)  # lazily walks the selection sweep first
        rows = self.rows(cached_only=selection is not None)  # a budget search computes only what it walks
        base = next(r for r in rows if r["num"] == 0)
        for r in rows:
            _derive(r, base)
        doc = {"name": self.cfg.name, "config": self.cfg.to_dict(), "model": self.cfg.model,
               "num_layers": self.num_layers if self._model is not None else self._cached_num_layers(rows),
               "scores": self.all_scores(), "rows": rows, "selection": selection, "notes": self.notes,
               "heldout": {"perplexity": self.eval_key()["perplexity"]},
               "computed_this_run": dict(self.cache.computed), "reused_this_run": dict(self.cache.reused),
               "retimed_this_run": self.cache.retimed, "machine": self.machine(), "seconds_this_run": None}
        main = self.cfg.sweeps[0]
        if main.schedule == "iterative":
            doc["drop_order"] = self.iterative_sets(main)
        if self.cfg.checkpoint is not None:
            doc["checkpoint"] = self.save_checkpoint()
        doc["seconds_this_run"] = time.perf_counter() - t0
        write_json(self.out / "results.json", doc)
        write_csv(self.out / "results.csv", rows)
        if selection is not None:
            write_json(self.out / "selection.json", selection)
        from .report import write_report

        doc["report"] = str(write_report(doc, self.out))
        return doc

    def iterative_sets(self, sweep: SweepSpec) -> dict[str, Any]:
        """Every drop set the iterative walks of `sweep` stored, per target (from the cache; loads no model)."""
        calib = self.cfg.calibration_for(sweep)
        sets = {}
        for target in sweep.plan():
            have = self.cache.get("drops", self.drops_key(sweep, calib, target))
            if have:
                sets[target] = dict(sorted(have["sets"].items(), key=lambda kv: int(kv[0])))
        return {"sweep": sweep.name, "metric": sweep.metric, "step": sweep.step, "sets": sets}

    def _cached_num_layers(self, rows: list[dict[str, Any]]) -> int:
        for s in self.all_scores().values():
            return len(s["attn"])
        return self.num_layers

    def all_scores(self) -> dict[str, Any]:
        """Scores of every (calibration, metric) the sweeps use, keyed by a readable label."""
        out = {}
        for sweep in self.cfg.sweeps:
            calib = self.cfg.calibration_for(sweep)
            label = f"{sweep.metric} | {Path(calib.source).name} x{calib.num_samples}"
            if label not in out and any(n > 0 for nums in sweep.plan().values() for n in nums):
                out[label] = self.scores(calib, sweep.metric)
        return out

    def select(self, budget: str | None, max_loss: float | None) -> dict[str, Any]:
        sel = self.cfg.selection
        sweep = self.cfg.sweep(sel.sweep)
        base = self.point([], [])
        directions = {t: [n for n in nums if n > 0] for t, nums in sweep.plan().items()}
        res = auto_select(directions, lambda t, n: self.row(sweep, t, n), base, budget, max_loss, sel.quality)
        res["sweep"] = sweep.name
        return res

    def save_checkpoint(self) -> dict[str, Any]:
        from ...checkpoint import read_config, save_dropped
        from ...modeling_dropped import apply_drop

        ck = self.cfg.checkpoint
        assert ck is not None
        sweep = self.cfg.sweep(ck.sweep)
        attn, mlp = self.drop_set(sweep, ck.target, ck.num)
        path = self.out / f"checkpoint-{ck.target}-{ck.num}"
        info = {"path": str(path), "target": ck.target, "num": ck.num, "drop_attn": attn, "drop_mlp": mlp}
        marker = path / "study_checkpoint.json"
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key_of({**self.model_key(), **info}):
            return info
        self.log(f"saving {ck.target}-{ck.num} checkpoint to {path}")
        model = copy.deepcopy(self.model)
        apply_drop(model, attn=attn, mlp=mlp)
        key = key_of({**self.model_key(), **info})
        save_dropped(model, path, self.tokenizer, overwrite=True,
                     extra=lambda tmp: (tmp / "study_checkpoint.json").write_text(json.dumps({"key": key, **info})))
        read_config(path)
        del model
        return info


def _derive(row: dict[str, Any], base: Mapping[str, Any]) -> None:
    """Relative quality and SDR vs the baseline row (gamma = dAvg% / dSpeedup%, lower is better).

    The speedup is the total one (prefill + decode time), as the paper times both phases and as
    `lightning-drop speed` reports SDR; every cached point has it, so no cache entry changes.
    """
    row["ppl_loss"] = quality_loss(row, base, "perplexity")
    row["mc_loss"] = quality_loss(row, base, "mc")
    sp = row.get("total_speedup")
    row["sdr"] = None
    # the same ratio on perplexity (dPPL% / dSpeedup%): meaningful even when a small MC sample is at chance
    row["sdr_ppl"] = (100 * row["ppl_loss"]) / (100 * (sp - 1.0)) \
        if row["num"] > 0 and row.get("ppl_loss") is not None and sp is not None and abs(sp - 1.0) > 1e-9 else None
    if row.get("mc_acc") is not None and base.get("mc_acc") and sp is not None and abs(sp - 1.0) > 1e-9 \
            and row["num"] > 0:
        from ...speed import sdr

        row["sdr"] = sdr(base["mc_acc"], row["mc_acc"], sp)


CSV_COLUMNS = ("sweep", "target", "num", "metric", "schedule", "step", "calibration", "num_samples", "perplexity",
               "ppl_loss", "mc_acc", "mc_loss", "mc_n", "decode_speedup", "prefill_speedup", "total_speedup",
               "sdr", "sdr_ppl", "kv_bytes_per_token", "kv_ratio", "params", "param_ratio", "drop_attn", "drop_mlp")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([" ".join(map(str, r.get(c) or [])) if c in ("drop_attn", "drop_mlp") else
                    ("" if r.get(c) is None else r.get(c)) for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ terminal
def format_table(rows: Sequence[Mapping[str, Any]], sweep: str | None = None) -> str:
    """The paper-shaped table as text: baseline, then drop-n per target."""
    lines = [f"{'config':<16}{'perplexity':>11}{'MC acc':>8}{'decode x':>9}{'total x':>9}{'KV':>7}{'params':>9}"
             f"{'SDR ppl':>9}"]
    seen = set()
    for r in rows:
        if sweep is not None and r["sweep"] != sweep and r["num"] > 0:
            continue
        label = "baseline" if r["num"] == 0 else f"{r['target']}-{r['num']}"
        if label in seen:
            continue
        seen.add(label)
        lines.append(f"{label:<16}{_fmt(r.get('perplexity'), '.2f'):>11}{_fmt(r.get('mc_acc'), '.3f'):>8}"
                     f"{_fmt(r.get('decode_speedup'), '.3f'):>9}{_fmt(r.get('total_speedup'), '.3f'):>9}"
                     f"{_fmt(r.get('kv_ratio'), '.2f'):>7}"
                     f"{r['params'] / 1e6:>8.1f}M{_fmt(r.get('sdr_ppl'), '.1f'):>9}")
    return "\n".join(lines)


def study_main(config: str, output: str | None = None, budget: str | None = None,
               max_quality_loss: float | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Sweep targets x number dropped; report with plots (configs/study/*.yaml).

    Args:
        config: study YAML (see configs/study/)
        output: override the output directory of the config
        budget: automated selection: e.g. speedup=1.2, params=0.8, kv=0.5
        max_quality_loss: automated selection: largest allowed relative quality loss (e.g. 0.05)
        overwrite: write into a non-empty output directory that is not an earlier run of this study
    """
    cfg = load_config(config)
    if budget is not None:
        parse_budget(budget)
    if max_quality_loss is not None and max_quality_loss < 0:
        raise UserError(f"--max-quality-loss must be >= 0, got {max_quality_loss}")
    t0 = time.perf_counter()
    doc = Study(cfg, output, overwrite=overwrite).run(budget=budget, max_quality_loss=max_quality_loss)
    out = Path(output or cfg.output)
    main = cfg.sweeps[0].name
    print()
    print(format_table(doc["rows"], sweep=main))
    print(f"(perplexity on {cfg.eval.perplexity.num_windows} x {cfg.eval.perplexity.seq_len} held-out tokens; "
          f"MC acc = {cfg.eval.mc.task if cfg.eval.mc else 'n/a'} acc_norm; decode x / total x = decode / "
          "prefill + decode speedup vs base, measured alternately; KV = KV-cache bytes/token vs base; SDR ppl = "
          "perplexity change % / total speedup %, lower is better)")
    if doc.get("selection"):
        print(doc["selection"]["message"])
        print(f"selection written to {out / 'selection.json'}")
    if doc.get("checkpoint"):
        print(f"dropped checkpoint ready: {doc['checkpoint']['path']}  (load with lightning_drop.models.load_model)")
    c, r = doc["computed_this_run"], doc["reused_this_run"]
    print(f"computed this run: {c['scores']} scoring pass(es), {c['drops']} iterative direction(s), "
          f"{c['points']} evaluation(s); reused from cache: {r['scores'] + r['drops'] + r['points']}"
          + (f"; re-timed {doc['retimed_this_run']} cached point(s) measured on another machine"
             if doc.get("retimed_this_run") else ""))
    print(f"report: {doc['report']}  ({time.perf_counter() - t0:.0f} s)")
    return doc
