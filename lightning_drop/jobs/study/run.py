"""`lightning-drop study`: one run of a study config, from the cached sweep to the written results.

`Study` wires the pieces (inputs and drop sets in `sweep`, point evaluation in `measure`, the cache in
`cache`, the automated selection in `budget`, figures in `report`) and owns only what spans them: the plan
check, the rows of every sweep point, the results document and the optional dropped checkpoint.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...io.atomic_io import atomic_write_text, read_json, write_json
from ...errors import UserError
from .budget import fmt_or_na, auto_select, derive, parse_budget
from .cache import Cache, CacheKeys, is_study_output, key_of
from .config import StudyConfig, SweepSpec, load_config
from .measure import PointEvaluator
from .sweep import DropSets, StudyInputs


class Study:
    """Runs one StudyConfig; `run()` returns the results document (also written to the output dir)."""

    def __init__(self, config: StudyConfig, output: str | os.PathLike | None = None, verbose: bool = True,
                 overwrite: bool = False) -> None:
        from ...io.output_targets import check_output

        self.cfg = config
        self.out = Path(output or config.output)
        # an earlier run of a study (its cache's manifest says so) is resumed; anything else is the user's
        resumable = is_study_output(self.out)
        check_output(self.out, overwrite=overwrite or resumable, sources=[config.model],
                     hint="it is not the output of a lightning-drop study; pass --overwrite to write into it")
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Cache(self.out)
        self.keys = CacheKeys(config)
        self.inputs = StudyInputs(config, verbose=verbose)
        self.drops = DropSets(self.inputs, self.cache, self.keys)
        self.points = PointEvaluator(self.inputs, self.cache, self.keys)

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
        from ...scoring.schedule import resolve_schedule

        if not compute and num > 0 and resolve_schedule(sweep.schedule).rescores \
                and not self.drops.has_iterative_set(sweep, target, num):
            return None
        attn, mlp = self.drops.drop_set(sweep, target, num)
        if not compute and self.cache.get("points", self.points.point_key(attn, mlp)) is None:
            return None
        # the costly `at: largest` tasks only where they inform: the base model and each target's largest count
        largest = num == 0 or num == max(sweep.plan().get(target) or [num])
        p = self.points.point(attn, mlp, all_tasks=largest, compute=compute)
        calib = self.cfg.calibration_for(sweep)
        return {"sweep": sweep.name, "target": target if num else "baseline", "num": num, "metric": sweep.metric,
                "schedule": sweep.schedule, "step": sweep.step if resolve_schedule(sweep.schedule).rescores else None,
                "rule": sweep.rule or sweep.name, "seed": self.cfg.seed_for(sweep),
                "calibration": calib.source, "num_samples": calib.num_samples, **p,
                **self.drops.selection_cost(sweep, target, num)}

    def validate_plan(self) -> None:
        """Refuse every count the model cannot take before any point is computed, naming the config key."""
        from ...scoring.selection import require_droppable

        n = self.drops.known_num_layers()
        for i, sweep in enumerate(self.cfg.sweeps):
            for target, nums in sweep.plan().items():
                key = "nums_per_target" if target in sweep.nums_per_target else "nums"
                if nums:
                    require_droppable(max(nums), n, target, where=f"sweeps[{i}] ({sweep.name}) {key}")
        ck = self.cfg.checkpoint
        if ck is not None:
            require_droppable(ck.num, n, ck.target, where="checkpoint.num")
        if self.cfg.recovery is not None:
            for i, p in enumerate(self.cfg.recovery.points):
                require_droppable(p.num, n, p.target, where=f"recovery.points[{i}].num")
        sp = self.cfg.speed
        if sp.enabled:
            from ...measure.context_speed import check_context, max_positions, positions_before_loading

            limit = max_positions(self.inputs.model.config) if self.inputs.loaded \
                else positions_before_loading(self.cfg.model)
            check_context(sp.lengths(), sp.gen_len, limit, self.cfg.model,
                          "speed.prompt_lens" if sp.prompt_lens else "speed.prompt_len")
        self.points.check_mc()

    def run(self, budget: str | None = None, max_quality_loss: float | None = None) -> dict[str, Any]:
        from ...scoring.schedule import resolve_schedule

        from ...io.model_loading import native_bf16

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
            derive(r, base)
        scores = self.drops.all_scores()
        num_layers = self.inputs.num_layers if self.inputs.loaded or not scores \
            else len(next(iter(scores.values()))["attn"])
        doc = {"name": self.cfg.name, "config": self.cfg.to_dict(), "model": self.cfg.model,
               "dtype": self.cfg.model_dtype, "native_bf16": native_bf16(),
               "num_layers": num_layers, "scores": scores, "rows": rows, "selection": selection,
               "notes": self.inputs.notes, "heldout": {"perplexity": self.points.eval_key()["perplexity"]},
               "computed_this_run": dict(self.cache.computed), "reused_this_run": dict(self.cache.reused),
               "retimed_this_run": self.cache.retimed, "machine": self.points.machine(), "seconds_this_run": None}
        if self.cfg.track is not None:
            from .track_axis import track_history

            doc["track"] = track_history(self.inputs, self.cache, self.keys, self.out)
            doc["computed_this_run"], doc["reused_this_run"] = dict(self.cache.computed), dict(self.cache.reused)
        from .kinds_report import kinds_summary

        by_kind = kinds_summary(doc)  # hybrids: token-mixer importance per mixer kind
        if by_kind is not None:
            doc["importance_by_kind"] = by_kind
        main = self.cfg.sweeps[0]
        if resolve_schedule(main.schedule).rescores:
            doc["drop_order"] = self.drops.iterative_sets(main)
        if self.cfg.checkpoint is not None:
            doc["checkpoint"] = self.save_checkpoint()
        if self.cfg.recovery is not None and selection is None:
            from .recovery import RecoveryRunner

            runner = RecoveryRunner(self.inputs, self.cache, self.keys, self.points, self.drops, self.out)
            doc["recovery"] = runner.rows(base)
            doc["recovery_train"] = {**dataclasses.asdict(self.cfg.recovery.train),
                                     "tokens": self.cfg.recovery.train.tokens}
            doc["computed_this_run"], doc["reused_this_run"] = dict(self.cache.computed), dict(self.cache.reused)
        doc["seconds_this_run"] = time.perf_counter() - t0
        doc["phase_seconds"] = dict(self.inputs.phase_seconds)  # each phase's share of this run
        self.inputs.log("time by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in doc["phase_seconds"].items()))
        write_json(self.out / "results.json", doc)
        write_csv(self.out / "results.csv", rows)
        if selection is not None:
            write_json(self.out / "selection.json", selection)
        from .report import write_report

        doc["report"] = str(write_report(doc, self.out))
        return doc

    def select(self, budget: str | None, max_loss: float | None) -> dict[str, Any]:
        """The budget search over the selection sweep; it evaluates only the points its walks reach."""
        sel = self.cfg.selection
        sweep = self.cfg.sweep(sel.sweep)
        base = self.points.point([], [])
        directions = {t: [n for n in nums if n > 0] for t, nums in sweep.plan().items()}
        res = auto_select(directions, lambda t, n: self.row(sweep, t, n), base, budget, max_loss, sel.quality)
        res["sweep"] = sweep.name
        return res

    def save_checkpoint(self) -> dict[str, Any]:
        from ...io.dropped_checkpoint import read_config, save_dropped
        from ...core.modeling_dropped import apply_drop

        ck = self.cfg.checkpoint
        assert ck is not None
        sweep = self.cfg.sweep(ck.sweep)
        attn, mlp = self.drops.drop_set(sweep, ck.target, ck.num)
        path = self.out / f"checkpoint-{ck.target}-{ck.num}"
        info = {"path": str(path), "target": ck.target, "num": ck.num, "drop_attn": attn, "drop_mlp": mlp}
        key = key_of({**self.keys.model(), **info})
        marker = path / "study_checkpoint.json"
        if marker.is_file() and read_json(marker, "the record of a study's checkpoint", {"key": str})["key"] == key:
            return info
        self.inputs.log(f"saving {ck.target}-{ck.num} checkpoint to {path}")
        model = copy.deepcopy(self.inputs.model)
        apply_drop(model, attn=attn, mlp=mlp)
        save_dropped(model, path, self.inputs.tokenizer, overwrite=True,
                     extra=lambda tmp: (tmp / "study_checkpoint.json").write_text(json.dumps({"key": key, **info})))
        read_config(path)
        del model
        return info


CSV_COLUMNS = ("sweep", "target", "num", "metric", "schedule", "step", "calibration", "num_samples", "perplexity",
               "ppl_loss", "mc_acc", "mc_stderr", "mc_loss", "mc_n", "mc_diff", "mc_diff_stderr", "decode_speedup", "prefill_speedup", "total_speedup",
               "sdr", "sdr_ppl", "kv_bytes_per_token", "kv_ratio", "params", "param_ratio", "drop_attn", "drop_mlp",
               "rule", "seed", "selection_passes", "selection_seconds")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """CSV_COLUMNS, then the per-domain perplexities and per-task MC fields (`perplexity[wiki-sample]`, ...)."""
    per = sorted({k for r in rows for k in r if "[" in k and k.startswith(("perplexity[", "mc_"))
                  and not k.startswith("mc_correct")})  # each question's correctness: in results.json only
    columns = CSV_COLUMNS + tuple(per)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([" ".join(map(str, r.get(c) or [])) if c in ("drop_attn", "drop_mlp") else
                    ("" if r.get(c) is None else r.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ terminal
def format_table(rows: Sequence[Mapping[str, Any]], sweep: str | None = None, domains: Sequence[str] = (),
                 tasks: Sequence[str] = ()) -> str:
    """The paper-shaped table as text: baseline, then drop-n per target; a perplexity column per extra domain
    and, with several MC tasks, an accuracy (± standard error) column per task."""
    mc = [(f"{t} ± se", t) for t in tasks] if len(tasks) > 1 else [("MC acc ± se", None)]
    head = f"{'config':<16}{'perplexity':>11}" + "".join(f"{'ppl ' + d:>{max(11, len(d) + 5)}}" for d in domains) \
        + "".join(f"{h:>{max(14, len(h) + 2)}}" for h, _ in mc) \
        + f"{'decode x':>9}{'total x':>9}{'KV':>7}{'params':>9}{'SDR ppl':>9}"
    lines = [head]
    seen = set()
    for r in rows:
        if sweep is not None and r["sweep"] != sweep and r["num"] > 0:
            continue
        label = "baseline" if r["num"] == 0 else f"{r['target']}-{r['num']}"
        if label in seen:
            continue
        seen.add(label)
        lines.append(f"{label:<16}{fmt_or_na(r.get('perplexity'), '.2f'):>11}"
                     + "".join(f"{fmt_or_na(r.get(f'perplexity[{d}]'), '.2f'):>{max(11, len(d) + 5)}}" for d in domains)
                     + "".join(f"{_acc(r, t):>{max(14, len(h) + 2)}}" for h, t in mc)
                     + f"{fmt_or_na(r.get('decode_speedup'), '.3f'):>9}{fmt_or_na(r.get('total_speedup'), '.3f'):>9}"
                     f"{fmt_or_na(r.get('kv_ratio'), '.2f'):>7}"
                     f"{r['params'] / 1e6:>8.1f}M{fmt_or_na(r.get('sdr_ppl'), '.1f'):>9}")
    return "\n".join(lines)


def _acc(r: Mapping[str, Any], task: str | None = None) -> str:
    """`0.460±0.035`: an accuracy is never shown without its standard error ('-' where not measured)."""
    suffix = f"[{task}]" if task else ""
    acc, se = r.get(f"mc_acc{suffix}"), r.get(f"mc_stderr{suffix}")
    if acc is None:
        return "-"
    return f"{acc:.3f}" + (f"±{se:.3f}" if se is not None else "")


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
    print(format_table(doc["rows"], sweep=main, domains=cfg.eval.domains, tasks=[m.task for m in cfg.eval.mc or []]))
    print(f"(perplexity on {cfg.eval.perplexity.num_windows} x {cfg.eval.perplexity.seq_len} held-out tokens; "
          f"MC acc = {cfg.eval.mc[0].task if cfg.eval.mc else 'n/a'} acc_norm ± one standard error"
          + (f", n = {', '.join(f'{m.task} {m.limit}' for m in cfg.eval.mc)}" if cfg.eval.mc else "")
          + (" ('-': a task scored only at the base and the largest counts)" if any(m.at == "largest" for m in
                                                                                   cfg.eval.mc or []) else "")
          + "; decode x / total x = decode / "
          "prefill + decode speedup vs base, measured alternately; KV = KV-cache bytes/token vs base; SDR ppl = "
          "perplexity change % / total speedup %, lower is better)")
    from .report import ORDERING_NOTE, ordering_lines

    ordering = ordering_lines(doc)
    if ordering:
        print(ORDERING_NOTE)
        print("\n".join(f"  {line}" for line in ordering))
    if doc.get("selection"):
        print(doc["selection"]["message"])
        print(f"selection written to {out / 'selection.json'}")
    if doc.get("recovery"):
        from .recovery_report import recovery_table

        header, rec_rows = recovery_table(doc)
        widths = [max(len(h), *(len(r[i]) for r in rec_rows)) for i, h in enumerate(header)]
        print()
        for line in [header] + rec_rows:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
        print(f"(recovery: {doc['recovery_train']['tokens']:,} training tokens per recipe; gap recovered = (ppl dropped"
              " - ppl recovered) / (ppl dropped - ppl base); control = the undropped model trained the same way)")
    if doc.get("checkpoint"):
        print(f"dropped checkpoint ready: {doc['checkpoint']['path']}  (load with lightning_drop.io.model_loading.load_model)")
    c, r = doc["computed_this_run"], doc["reused_this_run"]
    print(f"computed this run: {c['scores']} scoring pass(es), {c['drops']} iterative direction(s), "
          f"{c['points']} evaluation(s)" + (f", {c['mc']} multiple-choice run(s)" if c.get("mc") else "")
          + (f", {c['recovery']} recovery run(s)" if "recovery" in c else "")
          + f"; reused from cache: {sum(r.values())}"
          + (f"; re-timed {doc['retimed_this_run']} cached point(s) measured on another machine"
             if doc.get("retimed_this_run") else ""))
    print(f"report: {doc['report']}  ({time.perf_counter() - t0:.0f} s)")
    return doc
