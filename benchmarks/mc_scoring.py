"""Multiple-choice scoring: lm-eval's HFLM against `SharedContextLM` (each context computed once), side by side.

SmolLM2-135M scores HellaSwag (the shipped sample) and PIQA (the paper's, offline) with both scorers, in
float32 and in bfloat16, the two scorers taking turns for --rounds rounds on the same questions, at the
project's batch size (4). Prints each pass's seconds, the speed ratio HFLM / shared (median over rounds), and
both accuracies (acc_norm), which must be equal, with how many questions were answered differently.

    .venv/bin/python benchmarks/mc_scoring.py [--hellaswag 400] [--piqa 300] [--rounds 1] [--dtypes float32,bfloat16]
    .venv/bin/python benchmarks/mc_scoring.py --model tiny-llama --hellaswag 8 --piqa 8   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment)

from lightning_drop.measure.evaluation import clean_metrics, primary_metric
from lightning_drop.measure.lm_eval_tasks import local_task_dir, prepare_paper_tasks
from lightning_drop.measure.mc_scoring import CONTEXTS_PER_BATCH, SharedContextLM
from lightning_drop.io.model_loading import load_model
from lightning_drop.measure.significance import correctness

HELLASWAG = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag_val_first1000.jsonl"


def score(lm_class, model, tok, tm, task: str, limit: int, batch_size: int, **kw) -> tuple[float, str]:
    """(seconds, each question's correctness) of one pass of `task` scored by `lm_class`."""
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    lm = lm_class(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", **kw)
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True, verbosity="ERROR",
                          bootstrap_iters=0, random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
                          fewshot_random_seed=1234)
    seconds = time.perf_counter() - t0
    metric = primary_metric(clean_metrics(out["results"][task]))
    return seconds, correctness(out["samples"][task], metric)


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> int:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(HELLASWAG), help="the HellaSwag sample (JSONL)")
    ap.add_argument("--hellaswag", type=int, default=400, help="HellaSwag questions (0: skip)")
    ap.add_argument("--piqa", type=int, default=300, help="PIQA questions (0: skip)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4, help="HFLM's batch size (the project's: 4)")
    ap.add_argument("--contexts-per-batch", type=int, default=CONTEXTS_PER_BATCH)
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.rounds < 1 or args.hellaswag < 0 or args.piqa < 0 or not (args.hellaswag or args.piqa) \
            or not set(dtypes) <= {"float32", "bfloat16"} or not dtypes:
        print("error: --rounds >= 1, --hellaswag/--piqa >= 0 (not both 0), --dtypes from float32,bfloat16",
              file=sys.stderr)
        return 2
    tasks: dict[str, int] = {}
    dirs = []
    if args.hellaswag:
        if not Path(args.data).is_file():
            print(f"error: HellaSwag data not found: {args.data} (pass --data)", file=sys.stderr)
            return 2
        dirs.append(str(local_task_dir({"hellaswag_sample": args.data}, Path(tempfile.mkdtemp()) / "tasks")))
        tasks["hellaswag_sample"] = args.hellaswag
    if args.piqa:
        dirs.append(str(prepare_paper_tasks()))
        tasks["piqa"] = args.piqa
    tm = TaskManager(include_path=dirs, include_defaults=False)
    scorers = {"HFLM": (HFLM, {}), "shared": (SharedContextLM, {"contexts_per_batch": args.contexts_per_batch})}
    rows = []
    for dt in dtypes:
        model, tok = load_model(args.model, dtype=dt)
        for task, limit in tasks.items():
            times: dict[str, list[float]] = {name: [] for name in scorers}
            correct: dict[str, str] = {}
            for r in range(args.rounds):
                for name in (list(scorers) if r % 2 == 0 else list(reversed(scorers))):
                    cls, kw = scorers[name]
                    seconds, correct[name] = score(cls, model, tok, tm, task, limit, args.batch_size, **kw)
                    times[name].append(seconds)
                    print(f"{dt:<9} {task:<17} round {r + 1}: {name:<6} {seconds:7.1f} s", flush=True)
            med = {name: statistics.median(t) for name, t in times.items()}
            acc = {name: c.count("1") / len(c) for name, c in correct.items()}
            differ = sum(a != b for a, b in zip(correct["HFLM"], correct["shared"]))
            rows.append((dt, task, len(correct["HFLM"]), med["HFLM"], med["shared"], acc["HFLM"], acc["shared"], differ))
        del model
    print(f"\n{args.model}, HFLM batch size {args.batch_size}, {args.contexts_per_batch} contexts per shared batch, "
          f"median of {args.rounds} round(s); {cpu_model()}, {_common.machine_label()}")
    print(f"{'dtype':<9} {'task':<17} {'n':>4} {'HFLM s':>8} {'shared s':>9} {'ratio':>6} {'acc HFLM':>9} "
          f"{'acc shared':>10} {'differ':>6}")
    for dt, task, n, th, ts, ah, as_, differ in rows:
        print(f"{dt:<9} {task:<17} {n:>4} {th:>8.1f} {ts:>9.1f} {th / ts:>5.2f}x {ah:>9.4f} {as_:>10.4f} {differ:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
