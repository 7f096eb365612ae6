"""Scoring pass vs plain forward: what importance scoring costs on top of the forward it needs anyway.

Times `importance.compute_importance(model, batches)` (the hooked pass over the decoder, scores for blocks,
attention and MLP at once) against a plain `torch.no_grad()` forward of the same decoder (no LM head, no
hooks) over the same tokens, alternately in one run (plain, scored, plain, scored, ... after a warm-up of
each), and prints the ratio of the medians. Target: <= 1.15x. The hooks compute the three
norms of each layer's states once and reduce masked sums straight into the metric states.

    python benchmarks/scoring_overhead.py [--model smollm2-135m] [--num-samples 4] [--seq-len 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_drop.io.text_data import calibration_windows, CalibrationConfig  # noqa: E402
from lightning_drop.scoring.forward_pass import decoder_body  # noqa: E402
from lightning_drop.scoring.importance import compute_importance  # noqa: E402
from lightning_drop.io.model_loading import load_model  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_label, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="c4-sample")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--metric", default="cosine")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tok = load_model(a.model)
    windows = calibration_windows(tok, CalibrationConfig(source=a.calibration, num_samples=a.num_samples,
                                                         seq_len=a.seq_len))
    batches = [windows[i:i + a.batch_size] for i in range(0, len(windows), a.batch_size)]
    runner = decoder_body(model)

    @torch.no_grad()
    def plain() -> None:
        for b in batches:
            runner(input_ids=b, use_cache=False)

    def scored() -> None:
        compute_importance(model, batches, metric=a.metric)

    variants = [("plain", plain), ("scored", scored)]
    for _, fn in variants:
        fn()  # warm-up of each
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(a.repeats):
        for name, fn in (variants if r % 2 == 0 else variants[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_plain, t_scored = times["plain"], times["scored"]
    mp, ms = statistics.median(t_plain), statistics.median(t_scored)
    res = {"date": date.today().isoformat(), "machine": machine_label(),
           "model": a.model, "tokens": int(windows.numel()), "repeats": a.repeats, "metric": a.metric,
           "plain_forward_s": mp, "scoring_pass_s": ms, "ratio": ms / mp,
           "plain_runs_s": t_plain, "scoring_runs_s": t_scored}
    print(f"scoring overhead on {a.model}: {windows.shape[0]} x {windows.shape[1]} tokens, median of {a.repeats} "
          f"alternate runs ({res['date']}, {res['machine']})")
    print(f"  plain no_grad decoder forward  {mp:8.3f} s")
    print(f"  compute_importance ({a.metric})  {ms:8.3f} s")
    print(f"  ratio                          {ms / mp:8.3f}x  (target <= 1.15x)")
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
