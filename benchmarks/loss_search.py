"""Loss-based selection: what the shared-prefix evaluation saves, and what a loss-greedy search buys.

1. One round of the `loss` metric over every block of the model (or `--target`), evaluated two ways in one
   run on the same batches: the shared prefix (one pass capturing every layer's output, then per candidate only
   the layers from its own on; `lightning_drop.scoring.loss_metric`) against one full forward per candidate.
   Prints both times, the ratio (target <= 0.6x) and the largest difference between the two sets of scores.
2. With `--greedy N`: N blocks dropped by the loss greedy (`--schedule iterative --step 1`, SLEB) and by
   one-shot cosine (the paper's rule), each on a copy of the model, on the same calibration windows; prints
   the selection cost of both (forward passes, seconds) and the held-out perplexity of both: the
   `--heldout` windows of the calibration source that come right after the calibration windows.

    python benchmarks/loss_search.py [--model smollm2-135m] [--num-samples 1] [--seq-len 256] [--repeats 3]
        [--greedy 8 --greedy-samples 2 --heldout 32] [--no-round]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from datetime import date

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_label, write_json  # noqa: E402

import torch  # noqa: E402

from lightning_drop.io.model_loading import load_model  # noqa: E402
from lightning_drop.io.text_data import load_documents, make_windows  # noqa: E402
from lightning_drop.measure.evaluation import perplexity  # noqa: E402
from lightning_drop.scoring.loss_metric import loss_scores  # noqa: E402
from lightning_drop.scoring.schedule import drop_by_importance  # noqa: E402
from lightning_drop.scoring.selection import target_kinds  # noqa: E402


def one_round(model, batches, target: str, repeats: int) -> dict:
    inputs = [{"input_ids": b} for b in batches]
    kinds = target_kinds(target)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(repeats):  # alternate which goes first: load that drifts over minutes hits both
        for reuse in ((True, False) if r % 2 == 0 else (False, True)):
            runs[reuse].append(loss_scores(model, inputs, kinds, reuse_prefix=reuse))
    shared, full = runs[True][0], runs[False][0]
    diff = max(abs(a - b) for k in kinds for a, b in zip(shared["rows"][k], full["rows"][k]) if a is not None)
    s, f = shared["cost"], full["cost"]
    ts = statistics.median(x["cost"]["seconds"] for x in runs[True])
    tf = statistics.median(x["cost"]["seconds"] for x in runs[False])
    print(f"one round of loss scores, {target} target, {s['candidates']} candidates, median of {repeats} "
          "alternating runs:")
    print(f"  shared prefix        {ts:8.1f} s  {s['forward_passes']:6.2f} forward passes, "
          f"{s['head_passes']:g} LM head passes")
    print(f"  full forward each    {tf:8.1f} s  {f['forward_passes']:6.2f} forward passes, "
          f"{f['head_passes']:g} LM head passes")
    print(f"  ratio                {ts / tf:8.3f}x  (target <= 0.6x); layer forwards "
          f"{s['forward_passes'] / f['forward_passes']:.3f}x; largest score difference {diff:.2e}")
    return {"shared": s, "full": f, "shared_runs_s": [x["cost"]["seconds"] for x in runs[True]],
            "full_runs_s": [x["cost"]["seconds"] for x in runs[False]], "ratio": ts / tf, "max_score_diff": diff}


def greedy_vs_cosine(model, windows, calib: int, num: int, batch_size: int) -> dict:
    batches = list(windows[:calib].split(batch_size))
    heldout = windows[calib:]
    out = {"base_perplexity": perplexity(model, heldout, batch_size=batch_size)}
    print(f"{num} blocks on {calib} x {windows.shape[1]} calibration tokens; held-out perplexity on the next "
          f"{heldout.shape[0]} windows (base {out['base_perplexity']:.2f}):")
    for name, kwargs in (("cosine one-shot", {"metric": "cosine"}),
                         ("loss greedy", {"metric": "loss", "schedule": "iterative", "step": 1})):
        dropped = copy.deepcopy(model)
        result = drop_by_importance(dropped, batches, "block", num, **kwargs)
        ppl = perplexity(dropped, heldout, batch_size=batch_size)
        cost = result.cost()
        print(f"  {name:16} blocks {result.attn}  perplexity {ppl:8.2f}  selection {cost['forward_passes']:7.2f} "
              f"forward passes, {cost['seconds']:7.1f} s")
        out[name] = {"blocks": result.attn, "perplexity": ppl, **cost}
        del dropped
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="c4-sample")
    p.add_argument("--target", default="block")
    p.add_argument("--num-samples", type=int, default=1, help="calibration windows of the cost round")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--greedy", type=int, default=0, help="blocks to drop by loss greedy and by cosine (0: skip)")
    p.add_argument("--greedy-samples", type=int, default=2, help="calibration windows of the greedy comparison")
    p.add_argument("--heldout", type=int, default=32, help="held-out windows after the calibration windows")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each evaluation (median)")
    p.add_argument("--no-round", action="store_true", help="skip part 1 (the cost of one round)")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)

    model, tok = load_model(a.model)
    model.eval()
    calib = max(a.num_samples, a.greedy_samples if a.greedy else 0)
    windows = make_windows(tok, load_documents(a.calibration), a.seq_len,
                           calib + (a.heldout if a.greedy else 0))
    res = {"date": date.today().isoformat(), "machine": machine_label(), "model": a.model,
           "seq_len": a.seq_len, "torch_threads": torch.get_num_threads()}
    print(f"{a.model}, windows of {a.seq_len} tokens of {a.calibration} ({res['date']}, {res['machine']})")
    with torch.no_grad():
        model(input_ids=windows[:1], use_cache=False)  # warm-up: neither variant pays for first-call costs
    t0 = time.perf_counter()
    if not a.no_round:
        res["round"] = one_round(model, list(windows[:a.num_samples].split(a.batch_size)), a.target, a.repeats)
    if a.greedy:
        res["greedy"] = greedy_vs_cosine(model, windows, a.greedy_samples, a.greedy, a.batch_size)
    print(f"total {time.perf_counter() - t0:.0f} s")
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
