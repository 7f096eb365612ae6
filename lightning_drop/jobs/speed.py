"""`lightning-drop speed`: prefill/decode speed, KV-cache bytes and size of a saved model, side by side with a
baseline in one run (the measures are `lightning_drop.speed`'s). Nothing heavy is imported until it runs."""

from __future__ import annotations

import json
from typing import Any

from ..atomic_io import check_output, write_json
from ..errors import UserError
from ..options import Clock, Interleave


def _read_average(path: str | None) -> float | None:
    if not path:
        return None
    with open(path) as fh:
        data = json.load(fh)
    avg = data.get("average")
    if avg is None:
        raise UserError(f"{path} has no 'average' (expected the JSON written by `lightning-drop eval`)")
    return float(avg)


def speed_main(model: str, baseline: str | None = None, batch_size: int = 1, prompt_len: int = 128,
               gen_len: int = 128, repeats: int = 3, warmup: int = 1, output: str | None = None,
               eval_results: str | None = None, baseline_eval_results: str | None = None,
               ideal: bool = False, clock: Clock = "wall", interleave: Interleave = "step",
               threads: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Prompt then greedy generation with the KV cache; baseline and model are timed side by side after
    warm-up (in lock step by default), medians of --repeats.

    Args:
        model: checkpoint dir, hub id or catalogue name of the model to time
        baseline: model to compare against (dir or catalogue name)
        batch_size: prompts generated at once
        prompt_len: prompt tokens (prefill)
        gen_len: generated tokens (decode)
        repeats: timed runs; medians are reported
        warmup: untimed runs of each model first
        output: JSON file for the results
        eval_results: eval JSON of --model (for SDR)
        baseline_eval_results: eval JSON of --baseline (for SDR)
        ideal: also profile the baseline for the ideal speedup
        clock: process = this process's CPU time (with --threads 1: steady on a shared CPU machine)
        interleave: step: the two models take turns at every decode step; run: whole generations alternate
        threads: torch threads (default: torch's own)
        overwrite: replace an existing --output file
    """
    import torch

    from ..ideal_speedup import profile_drop, realized_gain
    from ..model_loading import load_model
    from ..speed import (
        INTERLEAVE,
        _clock,
        compare_speed,
        measure_generation,
        peak_rss_bytes,
        print_speed,
        sdr,
    )

    if ideal and not baseline:
        raise UserError("--ideal needs --baseline: the ideal speedup is profiled on the undropped model")
    for name, value in (("--batch-size", batch_size), ("--prompt-len", prompt_len), ("--gen-len", gen_len),
                        ("--repeats", repeats)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {warmup}")
    if output:
        check_output(output, kind="file", overwrite=overwrite,
                     sources=[model, baseline, eval_results, baseline_eval_results])
    _clock(clock)
    if interleave not in INTERLEAVE:
        raise UserError(f"interleave must be one of {', '.join(INTERLEAVE)}, got {interleave!r}")
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    net, _ = load_model(model)
    if baseline:
        base, _ = load_model(baseline)
        res = compare_speed(base, net, batch_size, prompt_len, gen_len, repeats, warmup, clock=clock,
                            interleave=interleave)
    else:
        res = {"dropped": measure_generation(net, batch_size, prompt_len, gen_len, repeats, warmup, clock=clock)}
        res["peak_rss_bytes"] = peak_rss_bytes()
    res["model"], res["baseline"] = model, baseline
    if baseline and ideal:
        from ..modeling_dropped import dropped_layers

        a, m = dropped_layers(net)
        prof = profile_drop(base, a, m, batch_size, prompt_len, gen_len, repeats, warmup, clock=clock)
        res["ideal_speedup"] = prof["total"]["ideal_speedup"]
        res["realized_gain"] = realized_gain(res["speedup"]["total"], res["ideal_speedup"])
    d_avg, b_avg = _read_average(eval_results), _read_average(baseline_eval_results)
    if baseline and d_avg is not None and b_avg is not None:
        res["sdr"] = sdr(b_avg, d_avg, res["speedup"]["total"])
    if output:
        write_json(output, res)
    print_speed(res)
    return res
