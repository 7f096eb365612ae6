"""Multiple-choice scoring in float32 vs bfloat16, side by side: what `dtype: auto` buys and what it changes.

SmolLM2-135M scores the same HellaSwag questions in both dtypes, the two taking turns for --rounds rounds
(lm-eval's HFLM on the model in memory, as the study scores). Prints each pass's seconds, the speed ratio
(median over rounds) and the accuracy of each dtype with the change bf16 - fp32 and its standard error paired
over the same questions. On a CPU without native bf16 (no AMX / AVX512-BF16) expect bf16 to be slower.

    .venv/bin/python benchmarks/mc_dtype.py [--limit 200] [--rounds 2] [--batch-size 8]
    .venv/bin/python benchmarks/mc_dtype.py --model tiny-llama --limit 8 --rounds 1   # smoke
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
from lightning_drop.measure.lm_eval_tasks import local_task_dir
from lightning_drop.io.model_loading import load_model, native_bf16
from lightning_drop.measure.significance import correctness, paired_stderr

HELLASWAG = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag_val_first1000.jsonl"


def score(model, tok, tasks_dir: Path, limit: int, batch_size: int) -> tuple[float, str]:
    """(seconds, each question's correctness) of one HellaSwag pass."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(tasks_dir)], include_defaults=False)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    out = simple_evaluate(model=lm, tasks=["hellaswag_sample"], limit=limit, task_manager=tm, log_samples=True,
                          verbosity="ERROR", bootstrap_iters=0, random_seed=1234, numpy_random_seed=1234,
                          torch_random_seed=1234, fewshot_random_seed=1234)
    seconds = time.perf_counter() - t0
    metric = primary_metric(clean_metrics(out["results"]["hellaswag_sample"]))
    return seconds, correctness(out["samples"]["hellaswag_sample"], metric)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(HELLASWAG))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"error: HellaSwag data not found: {args.data} (pass --data)", file=sys.stderr)
        return 2
    if args.limit < 2 or args.rounds < 1:
        print("error: --limit must be >= 2 and --rounds >= 1", file=sys.stderr)
        return 2
    tasks_dir = local_task_dir({"hellaswag_sample": args.data}, Path(tempfile.mkdtemp()) / "tasks")
    models = {dt: load_model(args.model, dtype=dt) for dt in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {dt: [] for dt in models}
    correct: dict[str, str] = {}
    for r in range(args.rounds):
        for dt, (model, tok) in (models.items() if r % 2 == 0 else reversed(models.items())):
            seconds, correct[dt] = score(model, tok, tasks_dir, args.limit, args.batch_size)
            times[dt].append(seconds)
            print(f"round {r + 1}: {dt:<9} {seconds:7.1f} s", flush=True)
    fp32, bf16 = correct["float32"], correct["bfloat16"]
    acc = {dt: c.count("1") / len(c) for dt, c in correct.items()}
    print(f"\n{args.model}, HellaSwag n={len(fp32)}, batch {args.batch_size}, native bf16: {native_bf16() or 'no'}")
    print(f"seconds per pass (median of {args.rounds}): float32 {statistics.median(times['float32']):.1f}, "
          f"bfloat16 {statistics.median(times['bfloat16']):.1f}; bf16 speedup "
          f"{statistics.median(times['float32']) / statistics.median(times['bfloat16']):.2f}x")
    print(f"acc_norm: float32 {acc['float32']:.3f}, bfloat16 {acc['bfloat16']:.3f}; change "
          f"{acc['bfloat16'] - acc['float32']:+.3f} ± {paired_stderr(bf16, fp32):.3f} (paired); "
          f"{sum(a != b for a, b in zip(fp32, bf16))} of {len(fp32)} questions answered differently")
    return 0


if __name__ == "__main__":
    sys.exit(main())
