"""Quality of a (dropped) model: lm-eval tasks on the in-memory model, and perplexity.

- `run_lm_eval` wraps lm-eval's `HFLM` (as `mc_scoring.SharedContextLM`, which computes a context shared by
  several choices once) around a model already in memory (no save/reload), so a dropped model is evaluated
  exactly as it will run. Which tasks run and where their data comes from
  (presets, the shipped task YAMLs, the paper's tasks offline) is `lightning_drop.measure.lm_eval_tasks`'s.
- `perplexity` is token-weighted (torchmetrics `Perplexity`), padding excluded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io.text_data import load_documents, make_windows
from ..errors import UserError, param

from .lm_eval_tasks import resolve_tasks

log = logging.getLogger(__name__)

#: Metric averaged per task when several are reported (length-normalised accuracy where lm-eval has it).
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1")


# --------------------------------------------------------------------------------------------------
# lm-eval on the in-memory model
# --------------------------------------------------------------------------------------------------
def clean_metrics(d: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in ("alias", "sample_len"):
            continue
        name = k.split(",")[0]  # "acc,none" -> "acc"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def primary_metric(metrics: Mapping[str, Any]) -> str | None:
    """Name of the metric that stands for a task (the first of `PRIMARY_METRICS` it reports)."""
    for m in PRIMARY_METRICS:
        v = metrics.get(m)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            return m
    return None


def primary_score(metrics: Mapping[str, float]) -> float | None:
    m = primary_metric(metrics)
    return None if m is None else metrics[m]


def metric_stderr(metrics: Mapping[str, Any], name: str) -> float | None:
    """lm-eval's standard error of metric `name`; None where it gives none (it writes "N/A" for one example)."""
    se = metrics.get(f"{name}_stderr")
    if isinstance(se, (int, float)) and not isinstance(se, bool) and math.isfinite(se):
        return float(se)
    return None


def primary_stderr(metrics: Mapping[str, Any]) -> float | None:
    """Standard error of the task's primary metric (see `primary_metric`), or None."""
    m = primary_metric(metrics)
    return None if m is None else metric_stderr(metrics, m)


def plus_minus(value: float, stderr: float | None, spec: str = ".4f", stderr_spec: str = ".4f") -> str:
    """`0.4600 ± 0.0501`: a score is shown with its standard error, or alone where there is none."""
    return format(value, spec) + ("" if stderr is None else f" ± {format(stderr, stderr_spec)}")


def average_stderr(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of the mean of k task scores, sqrt(sum se_i^2) / k: the tasks are independent samples.

    None when any task's standard error is unknown (a partial sum would understate the noise).
    """
    if not stderrs or any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)  # type: ignore[operator]


def result_stderrs(res: Mapping[str, Any]) -> dict[str, float | None]:
    """{task: standard error of its score} of a `run_lm_eval` result or its JSON.

    JSONs written before `stderrs` was stored still carry lm-eval's `<metric>_stderr` in `results`.
    """
    if isinstance(res.get("stderrs"), Mapping):
        return {t: res["stderrs"].get(t) for t in res.get("scores", {})}
    results = res.get("results") or {}
    return {t: primary_stderr(results.get(t) or {}) for t in res.get("scores", {})}


def _check_limit(tasks: Mapping[str, Any], limit: float | None) -> None:
    """A count limit above a task's number of documents is a mistake: lm-eval would silently score fewer."""
    if limit is None or limit < 1:  # below 1 it is a fraction of each task
        return
    n = int(limit)  # as lm-eval reads it
    sizes = {name: len(task.eval_docs) for name, task in tasks.items()}
    short = sorted((name, size) for name, size in sizes.items() if size < n)
    if not short:
        return
    if len(short) == 1:
        what = f"the {short[0][1]} documents of task {short[0][0]}"
    else:
        what = "the documents of tasks " + ", ".join(f"{name} ({size})" for name, size in short[:5]) \
            + (f" and {len(short) - 5} more" if len(short) > 5 else "")
    raise UserError(f"limit {n} is more than {what}; lm-eval would score fewer than asked: give a limit of at "
                    f"most {min(size for _, size in short)} or a fraction below 1")


@dataclasses.dataclass
class PreparedTasks:
    """lm-eval tasks built and checked before a model is involved (`prepare_lm_eval`): their plan
    {task: few-shot}, the task manager, and the built tasks per few-shot count."""

    plan: dict[str, int | None]
    manager: Any
    loaded: dict[int | None, Any]
    limit: int | float | None


def prepare_lm_eval(tasks: Sequence[str] | str, num_fewshot: int | Mapping[str, int] | None = None,
                    limit: int | float | None = None,
                    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> PreparedTasks:
    """Find and build the tasks (this loads their data) and check the limit against their documents, so that
    every mistake in the request — an unknown task, a dataset only the network has, a limit too large —
    is reported before any model loads."""
    plan = resolve_tasks(tasks, num_fewshot=num_fewshot)
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be > 0, got {limit}")
    if include_path is not None:
        paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"include_path not found: {p}")
        include_path = [str(p) for p in paths]
    tm = _task_manager(list(plan), include_path)
    missing = [t for t in plan if t not in tm.all_tasks]
    if missing:
        raise UserError(f"unknown lm-eval task(s) {missing}; pass {param('include_path', 'DIR', 'DIR')} for local "
                        "task YAMLs")
    by_shots: dict[int | None, list[str]] = {}
    for t, k in plan.items():
        by_shots.setdefault(k, []).append(t)
    from jinja2.exceptions import UndefinedError

    # Built once here (this loads their data) and handed to lm-eval as objects: the limit is checked against
    # every task's documents before anything is scored, at no second load.
    loaded: dict[int | None, Any] = {}
    for k, names in by_shots.items():
        try:
            loaded[k] = tm.load(names)
        except UndefinedError as err:
            raise _undefined(names, err) from None
        except ConnectionError as err:
            raise _needs_network(tm, names, err) from None
    _check_limit({name: task for d in loaded.values() for name, task in d["tasks"].items()}, limit)
    return PreparedTasks(plan, tm, loaded, limit)


def _task_manager(names: Sequence[str], include_path: list[str] | None) -> Any:
    """lm-eval's task index over `include_path` alone when it defines every task asked for (as a task, not a
    group or tag, which may name lm-eval's own); over lm-eval's several thousand shipped YAMLs too otherwise.

    Indexing the shipped YAMLs takes seconds on every call, more than a small evaluation; an include path's
    task takes precedence over a shipped one of the same name either way, so both indexes give the same task.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(names) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=include_path)


def _undefined(names: Sequence[str], err: Exception) -> UserError:
    return UserError(f"task(s) {', '.join(names)}: a record of the data has no field the task's template uses "
                     f"({err})")


def _needs_network(tm: Any, names: Sequence[str], err: ConnectionError) -> UserError:
    """One line for a task whose dataset only the Hugging Face Hub has: which task, which dataset, and how to
    run it offline."""
    from .lm_eval_tasks import PAPER_TASK_SOURCES, local_task_names

    datasets = {n: _datasets_of(tm, n, set()) for n in names}
    named = {d for ds in datasets.values() for d in ds if re.search(rf"'{re.escape(d)}'", str(err))}
    users = [n for n in names if datasets[n] & named] or list(names)
    dataset = " ".join(sorted(named)) or "(see lm-eval's task YAML)"
    paper = [n for n in users if n in PAPER_TASK_SOURCES or n.startswith("mmlu")]
    if paper:
        offline = f"{param('preset', repr('paper'), 'paper')} runs the paper's tasks from local copies"
    else:
        example = param("data", "[...]", "hellaswag_sample=FILE.jsonl")
        offline = f"a shipped task over a local JSONL file runs offline ({', '.join(local_task_names())}: {example})"
    return UserError(f"task {', '.join(users)} needs the network: its dataset {dataset} is on the Hugging "
                     f"Face Hub and could not be reached ({type(err).__name__}); offline, {offline}")


def _datasets_of(tm: Any, name: str, seen: set[str]) -> set[str]:
    """The `dataset_path`s of a task, group or tag of lm-eval's index (its members' for a group or tag)."""
    entry = tm.task_index.get(name)
    if entry is None or name in seen:
        return set()
    seen.add(name)
    cfg = getattr(entry, "cfg", None) or {}
    found = {cfg["dataset_path"]} if isinstance(cfg.get("dataset_path"), str) else set()
    members = list(cfg["task"]) if isinstance(cfg.get("task"), list) else []
    if not found and not members:  # a tag: the tasks that carry it
        members = [n for n, e in tm.task_index.items() if name in (getattr(e, "tags", None) or ())]
    for member in members:
        if isinstance(member, str):
            found |= _datasets_of(tm, member, seen)
    return found


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str] | str,
                num_fewshot: int | Mapping[str, int] | None = None, limit: int | float | None = None,
                include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                batch_size: int = 4, max_length: int | None = None, seed: int = 1234,
                prepared: PreparedTasks | None = None) -> dict[str, Any]:
    """Run lm-eval tasks on `model` as it is in memory.

    `num_fewshot` is one count for all tasks, or {task: count}; tasks with different counts run as separate
    lm-eval calls. Returns {"results": {task: {metric: value}}, "n_samples": {task: n}, "num_fewshot":
    {task: k}, "scores": {task: primary metric}, "stderrs": {task: its standard error}, "average": mean of the
    requested tasks' primary metrics, "average_stderr": its standard error}. A count `limit` above a task's
    number of documents is refused before anything is scored. `prepared` (from `prepare_lm_eval`, called
    before the model loaded) replaces `tasks`, `num_fewshot`, `limit` and `include_path`.
    """
    from lm_eval import simple_evaluate
    from .mc_scoring import SharedContextLM, quiet_git_probe
    from jinja2.exceptions import UndefinedError

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if prepared is None:
        prepared = prepare_lm_eval(tasks, num_fewshot, limit, include_path)
    plan, tm, loaded, limit = prepared.plan, prepared.manager, prepared.loaded, prepared.limit
    by_shots: dict[int | None, list[str]] = {}
    for t, k in plan.items():
        by_shots.setdefault(k, []).append(t)

    results: dict[str, dict[str, float]] = {}
    n_samples: dict[str, int] = {}
    shots: dict[str, int | None] = {}
    was_training = model.training
    model.eval()
    lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         device=str(next(model.parameters()).device))
    try:
        for k, names in by_shots.items():
            built = loaded[k]
            # a tag (a name for several tasks) is neither a task nor a group: lm-eval expands its name again
            top = [built["groups"][n] if n in built["groups"] else built["tasks"].get(n, n) for n in names]
            try:
                with quiet_git_probe():
                    out = simple_evaluate(model=lm, tasks=top, num_fewshot=k, limit=limit, task_manager=tm,
                                          log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
            except UndefinedError as err:  # a task template names a field some record of the data lacks
                raise _undefined(names, err) from None
            for name, metrics in out["results"].items():
                results[name] = clean_metrics(metrics)
                shots[name] = k
            for name, n in out.get("n-samples", {}).items():
                n_samples[name] = int(n.get("effective", n.get("original", 0)))
            for group, subtasks in (out.get("group_subtasks") or {}).items():  # groups: sum of leaves
                if group not in n_samples:
                    leaves = _leaves(group, out.get("group_subtasks") or {})
                    n_samples[group] = sum(n_samples.get(s, 0) for s in leaves)
    finally:
        model.train(was_training)
    scores = {t: primary_score(results.get(t, {})) for t in plan}
    stderrs = {t: primary_stderr(results.get(t, {})) for t in plan}
    valid = [t for t, s in scores.items() if s is not None]
    return {"results": results, "n_samples": n_samples, "num_fewshot": shots, "scores": scores, "stderrs": stderrs,
            "average": sum(scores[t] for t in valid) / len(valid) if valid else None,  # type: ignore[misc]
            "average_stderr": average_stderr([stderrs[t] for t in valid]), "limit": limit}


@contextlib.contextmanager
def dependency_output_to(log: str | os.PathLike) -> Iterator[None]:
    """Send what lm-eval, datasets and transformers print while inside (progress bars, their warnings and log
    records, and the output of the programs they start, such as `git`) to the file `log`, appended.

    Both the process's stdout/stderr descriptors and Python's `sys.stdout`/`sys.stderr` (and the logging
    handlers writing to them) are redirected, and restored on the way out, exceptions included.
    """
    with open(log, "a", encoding="utf-8", errors="replace") as fh:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        handlers = [h for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                    if isinstance(lg, logging.Logger) for h in lg.handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                    and not isinstance(getattr(type(h), "stream", None), property)]  # those follow sys.stderr
        streams = [(h, h.stream) for h in handlers if h.stream in (sys.stdout, sys.stderr, sys.__stdout__,
                                                                  sys.__stderr__)]
        try:
            for fd in saved:
                os.dup2(fh.fileno(), fd)
            for h, _ in streams:
                h.setStream(fh)
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        finally:
            fh.flush()
            for h, stream in streams:
                h.setStream(stream)
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


def _leaves(group: str, tree: Mapping[str, list[str]]) -> list[str]:
    out = []
    for s in tree.get(group, []):
        out.extend(_leaves(s, tree) if s in tree else [s])
    return out


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------
# The old names of the one text reader and window maker (`lightning_drop.io.text_data`).
read_jsonl_texts = load_documents
text_windows = make_windows


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4,
               attention_mask: torch.Tensor | None = None) -> float:
    """Token-weighted perplexity of `model` over `windows` [N, T] (next-token prediction inside each window).

    Positions where `attention_mask` is 0 (left or right padding) are neither inputs nor targets.
    """
    from torchmetrics.text import Perplexity

    if windows.dim() != 2 or windows.dtype != torch.long:
        raise UserError(f"windows must be a 2-D LongTensor [N, T], got {tuple(windows.shape)} {windows.dtype}")
    if windows.shape[1] < 2:
        raise UserError("windows need at least 2 tokens each")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if attention_mask is not None and attention_mask.shape != windows.shape:
        raise UserError(f"attention_mask shape {tuple(attention_mask.shape)} != windows shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    # The caller hands over every window: a cross-process sync would add nothing, and it is a collective
    # that hangs when one rank (global rank zero at fit end) measures alone.
    metric = Perplexity(ignore_index=-100, sync_on_compute=False).to(device)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i: i + batch_size].to(device)
            kwargs: dict[str, Any] = {}
            if attention_mask is not None:
                mask = attention_mask[i: i + batch_size].to(device).long()
                kwargs["attention_mask"] = mask
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            else:
                mask = torch.ones_like(ids)
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits[:, :-1].float()
            # a target counts only when it is a real token predicted from a real token (left padding!)
            target = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
            metric.update(logits, target)
        return float(metric.compute())
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Files and commands
# --------------------------------------------------------------------------------------------------
def parse_pairs(items: Sequence[str], usage: str) -> dict[str, str]:
    """{KEY: FILE} from command-line "KEY=FILE" items; `usage` starts the error for a malformed one."""
    pairs = {}
    for item in items:
        key, sep, file = str(item).partition("=")
        if not sep or not key.strip() or not file.strip():
            raise UserError(f"{usage}, got {item!r}")
        pairs[key.strip()] = file.strip()
    return pairs
