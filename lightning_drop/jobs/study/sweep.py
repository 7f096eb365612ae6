"""Running a sweep's drop sets: the base model and texts a study reads (loaded on first use, so a fully cached
re-run loads nothing), importance scores, and the drop set of every (sweep, target, number dropped).

One-shot sets come from ONE scoring pass per (model, calibration, metric); iterative sets follow
`lightning_drop.scoring.schedule.drop_rounds`, re-scoring after each step, with every round cached as it is reached.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...io.atomic_io import write_json
from ...errors import UserError
from ...core.options import CalibrationConfig
from .cache import Cache, CacheKeys
from .config import StudyConfig, SweepSpec


@contextlib.contextmanager
def counted_passes(model: Any, num_batches: int) -> Iterator[list[float]]:
    """Count the forward passes the scoring inside runs, as full passes over `num_batches` calibration batches:
    every decoder layer call is a `1 / layers` part of one batch's pass, so a search that runs only the layers
    after a shared prefix is charged for what it runs. The count lands in the yielded list's one item."""
    from ...core.architectures import get_spec

    layers = list(get_spec(model).get_layers(model))
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    hooks = [layer.register_forward_pre_hook(count) for layer in layers]
    passes = [0.0]
    try:
        yield passes
    finally:
        for hook in hooks:
            hook.remove()
        passes[0] = calls[0] / (max(1, len(layers)) * max(1, num_batches))


class StudyInputs:
    """The base model, its tokenizer and the documents of one study, each loaded on first use."""

    def __init__(self, config: StudyConfig, verbose: bool = True) -> None:
        self.cfg = config
        self.verbose = verbose
        self.notes: list[str] = []  # what the results document should tell the reader (skipped parts)
        self._model: Any = None
        self._tok: Any = None
        self._docs: dict[tuple[str, str], list[str]] = {}
        #: seconds spent per phase this run (scoring, drops, perplexity, mc, speed, recovery), each second in
        #: one phase only: a phase timed inside another (a recovered model's evaluation) leaves the outer one
        self.phase_seconds: dict[str, float] = {}
        self._open: list[list[float]] = []  # per open phase: [its start, seconds of phases inside it]

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    @contextlib.contextmanager
    def timed(self, phase: str, what: str) -> Iterator[None]:
        """Time `phase` (added to `phase_seconds`) and log `what` with its seconds."""
        self._open.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            start, inner = self._open.pop()
            seconds = time.perf_counter() - start
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds - inner
            if self._open:
                self._open[-1][1] += seconds
            self.log(f"{what}: {seconds:.1f} s")

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> Any:
        if self._model is None:
            import torch

            from ...io.model_loading import load_model

            torch.manual_seed(self.cfg.seed)
            self.log(f"loading {self.cfg.model}")
            self._model, self._tok = load_model(self.cfg.model, dtype=self.cfg.model_dtype)
        return self._model

    @property
    def tokenizer(self) -> Any:
        _ = self.model
        return self._tok

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def docs(self, source: str, text_field: str) -> list[str]:
        from ...io.text_data import load_documents

        if (source, text_field) not in self._docs:
            self._docs[(source, text_field)] = load_documents(source, text_field=text_field)
        return self._docs[(source, text_field)]

    def calibration_batches(self, calib: CalibrationConfig) -> list[Any]:
        from ...io.text_data import make_windows

        windows = make_windows(self.tokenizer, self.docs(calib.source, calib.text_field), calib.seq_len,
                               calib.num_samples, shuffle=calib.shuffle, seed=calib.seed,
                               max_positions=getattr(self.model.config, "max_position_embeddings", None))
        return [windows[i:i + calib.batch_size] for i in range(0, len(windows), calib.batch_size)]


class DropSets:
    """Scores and drop sets of a study's sweeps, computed once and cached."""

    def __init__(self, inputs: StudyInputs, cache: Cache, keys: CacheKeys) -> None:
        self.inputs, self.cache, self.keys = inputs, cache, keys
        self.cfg = inputs.cfg
        self._scores: dict[str, Any] = {}

    def scores(self, calib: CalibrationConfig, metric: str, seed: int | None = None,
               span: int | None = None) -> dict[str, Any]:
        seed = self.cfg.seed if seed is None else seed
        key = self.keys.scores(calib, metric, seed, span)
        if key in self._scores:
            return self._scores[key]

        def compute() -> dict[str, Any]:
            from ...scoring.importance import compute_importance

            self.inputs.log(f"scoring {metric} on {calib.num_samples} x {calib.seq_len} tokens of {calib.source}")
            t0, c0 = time.perf_counter(), time.process_time()
            batches = self.inputs.calibration_batches(calib)
            with self.inputs.timed("scoring", f"scored {metric}"), counted_passes(self.inputs.model, len(batches)) as n:
                s = compute_importance(self.inputs.model, batches, metric=metric, seed=seed, span=span)
            return {**s.to_dict(), "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                    "passes": n[0], "calibration": dataclasses.asdict(calib)}

        self._scores[key] = self.cache.get_or_compute("scores", key, compute)
        return self._scores[key]

    def drop_set(self, sweep: SweepSpec, target: str, num: int) -> tuple[list[int], list[int]]:
        from ...scoring.schedule import resolve_schedule

        from ...scoring.importance import ImportanceScores
        from ...scoring.selection import check_span, select_modules

        if num == 0:
            return [], []
        calib = self.cfg.calibration_for(sweep)
        span = num if sweep.span else None
        if span is not None:  # the depth is read only where a span needs it (a cached re-run loads no model)
            check_span(span, sweep.metric, target, self.known_num_layers(), where=f"sweep '{sweep.name}': span")
        if not resolve_schedule(sweep.schedule).rescores:
            d = self.scores(calib, sweep.metric, self.cfg.seed_for(sweep), span)
            return select_modules(ImportanceScores.from_dict(d), target, num)
        return self.iterative_drop_set(sweep, calib, target, num)

    def selection_cost(self, sweep: SweepSpec, target: str, num: int) -> dict[str, float | None]:
        """What choosing this drop set cost: forward passes over the calibration windows (in full-model passes:
        a pass through part of the layers counts as that part) and seconds. One-shot: the one scoring pass every
        target and count shares; iterative: every round the walk scored before reaching `num`. None where the
        cache predates the count."""
        from ...scoring.schedule import resolve_schedule

        if num == 0:
            return {"selection_passes": 0.0, "selection_seconds": 0.0}
        calib = self.cfg.calibration_for(sweep)
        if not resolve_schedule(sweep.schedule).rescores:
            d = self.scores(calib, sweep.metric, self.cfg.seed_for(sweep))
            return {"selection_passes": d.get("passes"), "selection_seconds": d.get("seconds")}
        walk = (self.cache.get("drops", self.keys.drops(sweep, calib, target)) or {}).get("rounds", [])
        rounds = [r for i, r in enumerate(walk) if int(r.get("at", i * sweep.step)) < num]
        if not rounds or any(r.get("passes") is None for r in rounds):
            return {"selection_passes": None, "selection_seconds": None}
        return {"selection_passes": sum(r["passes"] for r in rounds),
                "selection_seconds": sum(r["seconds"] for r in rounds)}

    def has_iterative_set(self, sweep: SweepSpec, target: str, num: int) -> bool:
        """Whether an iterative walk already reached `num` (the cache answers; nothing is scored)."""
        key = self.keys.drops(sweep, self.cfg.calibration_for(sweep), target)
        return str(num) in (self.cache.get("drops", key) or {"sets": {}})["sets"]

    def iterative_drop_set(self, sweep: SweepSpec, calib: CalibrationConfig, target: str,
                           num: int) -> tuple[list[int], list[int]]:
        """Iterative: the walk of `lightning_drop.scoring.schedule.drop_rounds`; every set and round on it is cached.

        The schedule is a function of (step, n) alone, so a set never depends on which other counts a sweep
        lists: the walk goes 0, step, 2 step, ... and a count n between two of them is the walk's set at
        `step * (n // step)` plus the `n % step` lowest of that round's scores (the first part of the next
        round's selection; no extra scoring pass). An extended sweep therefore reuses every stored round.
        """
        from ...scoring.importance import ImportanceScores, compute_importance
        from ...core.modeling_dropped import apply_drop, dropped_layers
        from ...scoring.schedule import drop_rounds
        from ...scoring.selection import max_droppable, target_kinds

        step = sweep.step
        key = self.keys.drops(sweep, calib, target)
        have = self.cache.get("drops", key) or {"sets": {}}
        sets, rounds = have["sets"], have.get("rounds", [])  # rounds: the scores each re-scoring saw
        wanted = sorted({n for n in [num] + sweep.plan().get(target, []) if n > 0})
        missing = [n for n in wanted if str(n) not in sets]
        if not missing:
            self.cache.reused["drops"] += 1
            a, m = sets[str(num)]
            return a, m
        upto = max(wanted)
        limit = max_droppable(self.inputs.num_layers, target)
        if upto > limit:
            raise UserError(f"sweep '{sweep.name}': cannot drop {upto} {target} modules of a "
                             f"{self.inputs.num_layers}-layer model (at most {limit})")
        # round i was scored on the model with the walk's set at i * step dropped (older caches: same layout)
        scored = {int(r.get("at", i * step)): {**r, "at": int(r.get("at", i * step))} for i, r in enumerate(rounds)}
        need = sorted({step * ((n - 1) // step) for n in missing})  # the round that yields each missing n
        at = max(d for d in range(0, need[0] + 1, step) if d == 0 or str(d) in sets)
        self.inputs.log(f"iterative {sweep.metric} {target}: re-scoring after every {step} up to {upto}")
        model, batches = None, None
        cost: dict[int, dict[str, float]] = {}  # per round scored this run: its seconds and forward passes

        def score(attn: list[int], mlp: list[int], index: int) -> ImportanceScores:
            nonlocal model, batches
            if index * step in scored:
                return ImportanceScores.from_dict(scored[index * step]["scores"])
            t0 = time.perf_counter()
            if model is None:
                model, batches = copy.deepcopy(self.inputs.model), self.inputs.calibration_batches(calib)
            gone_attn, gone_mlp = dropped_layers(model)
            new_attn, new_mlp = sorted(set(attn) - set(gone_attn)), sorted(set(mlp) - set(gone_mlp))
            if new_attn or new_mlp:
                apply_drop(model, attn=new_attn, mlp=new_mlp)
            with counted_passes(model, len(batches)) as n:
                scores = compute_importance(model, batches, metric=sweep.metric,
                                            seed=self.cfg.seed_for(sweep) + index, kinds=target_kinds(target))
            cost[index * step] = {"passes": n[0], "seconds": time.perf_counter() - t0}
            return scores

        # the last needed round is taken whole (up to the limit): its full set is where a longer walk resumes
        end = min(need[-1] + step, limit)
        walked = sets[str(at)] if at else ([], [])
        with self.inputs.timed("drops", f"iterative {sweep.metric} {target} up to {upto}"):
            for rnd in drop_rounds(score, target, end, self.inputs.num_layers, sweep.schedule, step, start=at,
                                   walked=walked):
                if rnd.at not in scored:
                    scored[rnd.at] = {"at": rnd.at, "scores": rnd.scores.to_dict(), "drop_attn": rnd.attn,
                                      "drop_mlp": rnd.mlp, **cost.get(rnd.at, {})}
                for n in range(rnd.at + 1, rnd.at + rnd.size + 1):
                    if str(n) not in sets and (n in missing or n == rnd.at + step):
                        sets[str(n)] = list(rnd.set_at(n))
                have["sets"], have["rounds"] = sets, [scored[k] for k in sorted(scored)]
                write_json(self.cache.path("drops", key), have)  # resumable after every round
        self.cache.computed["drops"] += 1
        del model
        a, m = sets[str(num)]
        return a, m

    def iterative_sets(self, sweep: SweepSpec) -> dict[str, Any]:
        """Every drop set the iterative walks of `sweep` stored, per target (from the cache; loads no model)."""
        calib = self.cfg.calibration_for(sweep)
        sets = {}
        for target in sweep.plan():
            have = self.cache.get("drops", self.keys.drops(sweep, calib, target))
            if have:
                sets[target] = dict(sorted(have["sets"].items(), key=lambda kv: int(kv[0])))
        return {"sweep": sweep.name, "metric": sweep.metric, "step": sweep.step, "sets": sets}

    def all_scores(self) -> dict[str, Any]:
        """Scores of every (calibration, metric) the sweeps use, keyed by a readable label."""
        out = {}
        for sweep in self.cfg.sweeps:
            calib = self.cfg.calibration_for(sweep)
            seed = self.cfg.seed_for(sweep)
            label = f"{sweep.metric} | {Path(calib.source).name} x{calib.num_samples}" \
                + ("" if seed == self.cfg.seed else f" | seed {seed}")
            if label not in out and any(n > 0 for nums in sweep.plan().values() for n in nums):
                out[label] = self.scores(calib, sweep.metric, seed)
        return out

    def known_num_layers(self) -> int:
        """The model's depth, from cached scores when there are any (a cached re-run loads no model)."""
        for sweep in self.cfg.sweeps:
            hit = self.cache.get("scores", self.keys.scores(self.cfg.calibration_for(sweep), sweep.metric,
                                                            self.cfg.seed_for(sweep)))
            if hit is not None:
                return len(hit["attn"])
        return self.inputs.num_layers
