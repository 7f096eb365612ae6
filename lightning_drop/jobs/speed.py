"""`lightning-drop speed`: prefill/decode speed, KV-cache bytes and size of a saved model, side by side with a
baseline in one run (the measures are `lightning_drop.measure.speed`'s). Nothing heavy is imported until it runs."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from ..io.atomic_io import read_json, write_json
from ..io.output_targets import check_output
from ..errors import UserError
from ..core.options import Clock, Interleave

SpeedDtype = Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]
#: the dtype names `--dtype` takes, short spellings included, and the torch dtype each means
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32", "bf16": "bfloat16",
          "fp16": "float16"}


def _read_average(path: str | None, option: str) -> float | None:
    """The average score in an eval JSON (`lightning-drop eval --output`), read before any model loads."""
    if not path:
        return None
    data = read_json(path, "the JSON written by `lightning-drop eval --output`", {"average": (int, float)}, option)
    avg = data["average"]
    if isinstance(avg, bool) or not math.isfinite(avg) or avg < 0:
        raise UserError(f"{option} {path}: 'average' must be a score >= 0, got {json.dumps(avg)[:40]}")
    return float(avg)


def _workload(preset: str | None, prompt_len: int | None, prompt_lens: str | None, gen_len: int | None,
              batch_size: int | None) -> tuple[list[int], int, int]:
    """(prompt lengths, gen_len, batch size) from the options: a preset fixes all three, so giving one of them
    beside it is refused rather than silently overridden."""
    from ..measure.context_speed import parse_lengths
    from ..measure.context_speed import preset as named_preset

    if prompt_len is not None and prompt_lens is not None:
        raise UserError("give either --prompt-len (one length) or --prompt-lens (several), not both")
    if preset is not None:
        work = named_preset(preset)
        given = [o for o, v in (("--prompt-len", prompt_len), ("--prompt-lens", prompt_lens), ("--gen-len", gen_len),
                                ("--batch-size", batch_size)) if v is not None]
        if given:
            raise UserError(f"--preset {preset} sets prompt {work['prompt_lens']}, --gen-len {work['gen_len']} and "
                            f"--batch-size {work['batch_size']}; drop {', '.join(given)}")
        return list(work["prompt_lens"]), work["gen_len"], work["batch_size"]
    lengths = parse_lengths(prompt_lens) if prompt_lens is not None else [128 if prompt_len is None else prompt_len]
    return lengths, 128 if gen_len is None else gen_len, 1 if batch_size is None else batch_size


def speed_main(model: str, baseline: str | None = None, batch_size: int | None = None, prompt_len: int | None = None,
               prompt_lens: str | None = None, gen_len: int | None = None, preset: str | None = None,
               repeats: int = 3, warmup: int = 1, output: str | None = None,
               eval_results: str | None = None, baseline_eval_results: str | None = None,
               ideal: bool = False, clock: Clock = "wall", interleave: Interleave = "step",
               threads: int | None = None, device: str = "cpu", dtype: SpeedDtype = "float32",
               tokenizer: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Prompt then greedy generation with the KV cache; baseline and model are timed side by side after
    warm-up (in lock step by default), medians of --repeats, at each prompt length.

    The JSON holds `per_length` (one comparison per prompt length: speedups, each model's KV-cache bytes per
    token and at that length, with --ideal the ideal speedup and the realized share of it) and, at the top
    level, the first length's comparison in the shape a single-length run has always written.

    Args:
        model: checkpoint dir, hub id or catalogue name of the model to time
        baseline: model to compare against (dir or catalogue name)
        batch_size: prompts generated at once (default 1)
        prompt_len: prompt tokens (prefill; default 128)
        prompt_lens: several prompt lengths, comma-separated (e.g. 128,512,2048): one comparison each
        gen_len: generated tokens (decode; default 128)
        preset: a named workload: paper = prompt 2048 + 2048 generated tokens, batch 1
        repeats: timed runs; medians are reported
        warmup: untimed runs of each model first
        output: JSON file for the results
        eval_results: eval JSON of --model (for SDR)
        baseline_eval_results: eval JSON of --baseline (for SDR)
        ideal: also profile the baseline for the ideal speedup (at each length)
        clock: process = this process's CPU time (with --threads 1: steady on a shared CPU machine); on CUDA, wall is timed with CUDA events
        interleave: step: the two models take turns at every decode step; run: whole generations alternate
        threads: torch threads (default: torch's own)
        device: where the models run (cpu, cuda, cuda:1); on CUDA the peak memory of each model is reported
        dtype: weights' dtype (bf16 = bfloat16, fp16 = float16)
        tokenizer: tokenizer (directory, hub id or catalogue name) for a model without one of its own (the
            prompts are random token ids: it is loaded with the model, not used for timing)
        overwrite: replace an existing --output file
    """
    import torch

    from ..measure.clocks import resolve_clock
    from ..measure.context_speed import (
        check_context,
        format_context_table,
        max_positions,
        positions_before_loading,
        speed_by_context,
    )
    from ..io.model_loading import load_model
    from ..measure.memory import peak_rss_bytes
    from ..measure.speed import INTERLEAVE, measure_generation, print_speed, sdr
    from .drop_request import check_device

    if ideal and not baseline:
        raise UserError("--ideal needs --baseline: the ideal speedup is profiled on the undropped model")
    lengths, gen_len, batch_size = _workload(preset, prompt_len, prompt_lens, gen_len, batch_size)
    for name, value in (("--batch-size", batch_size), ("--prompt-len", min(lengths)), ("--repeats", repeats)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if gen_len < 2:  # the first token comes from the prefill: decode needs at least one more
        raise UserError(f"--gen-len must be >= 2, got {gen_len}")
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {warmup}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dev = check_device(device, "--device")
    if output:
        check_output(output, kind="file", overwrite=overwrite,
                     sources=[model, baseline, eval_results, baseline_eval_results, tokenizer])
    resolve_clock(clock, dev)
    d_avg = _read_average(eval_results, "--eval-results")
    b_avg = _read_average(baseline_eval_results, "--baseline-eval-results")
    if b_avg == 0:
        raise UserError(f"--baseline-eval-results {baseline_eval_results}: an average of 0 leaves nothing to degrade")
    if interleave not in INTERLEAVE:
        raise UserError(f"interleave must be one of {', '.join(INTERLEAVE)}, got {interleave!r}")
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    option = "--prompt-lens" if prompt_lens is not None else "--preset" if preset else "--prompt-len"
    refs = [model] + ([baseline] if baseline else [])
    for ref in refs:
        check_context(lengths, gen_len, positions_before_loading(ref), ref, option)
    loaded = []  # a list: a model may be compared with itself, two copies then
    for ref in refs:
        m, _ = load_model(ref, dtype=DTYPES[dtype], tokenizer=tokenizer)
        check_context(lengths, gen_len, max_positions(m.config), ref, option)
        loaded.append(m.to(dev))
    net = loaded[0]
    if baseline:
        per_length = speed_by_context({"base": loaded[1], "dropped": net}, lengths, gen_len, batch_size,
                                      repeats, warmup, clock=clock, interleave=interleave, ideal=ideal)
    else:
        per_length = [{"dropped": measure_generation(net, batch_size, n, gen_len, repeats, warmup, clock=clock),
                       "context_len": n + gen_len} for n in lengths]
    res = {**per_length[0], "per_length": per_length, "peak_rss_bytes": peak_rss_bytes(),
           "warnings": [w for r in per_length for w in r.get("warnings", [])]}
    res["model"], res["baseline"], res["preset"] = model, baseline, preset
    if baseline and ideal:
        vs = per_length[0]["vs_base"]["dropped"]
        res["ideal_speedup"], res["realized_gain"] = vs["ideal_speedup"]["total"], vs["realized_gain"]["total"]
    if baseline and d_avg is not None and b_avg is not None:
        res["sdr"] = sdr(b_avg, d_avg, res["speedup"]["total"])
    if output:
        write_json(output, res)
    if baseline and len(lengths) > 1:
        print(f"{model} vs {baseline}: batch {batch_size}, {gen_len} generated tokens, median of {repeats} "
              f"per-repeat ratios ({per_length[0]['setup']['clock']} clock, {per_length[0]['setup']['device']})")
        print(format_context_table(per_length))
        print(f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
    elif len(lengths) > 1:
        for n, r in zip(lengths, per_length):
            print(f"prompt {n}:")
            print_speed({**r, "peak_rss_bytes": res["peak_rss_bytes"]})
    else:
        print_speed(res)
    for warning in res["warnings"]:
        print(f"warning: {warning}")
    return res
