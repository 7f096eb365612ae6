"""`lightning-drop`: one entry point for every job.

`fit|validate|test` go to LightningCLI (YAML configs); the other subcommands are plain typed options.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .errors import UserError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got '{text}'") from err


def _limit(value: float | None) -> int | float | None:
    """lm-eval's limit: a count when >= 1, a fraction below."""
    return int(value) if value is not None and value >= 1 else value


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_drop(sub: argparse._SubParsersAction) -> None:
    from .options import METRICS, SCHEDULES, TARGETS, CalibrationConfig

    d = CalibrationConfig()
    p = sub.add_parser("drop", help="score modules on calibration text and write a dropped checkpoint",
                       description="Score every block, attention and MLP sublayer (S = 1 - cos(X, Y) by default) "
                                   "on calibration text, drop the lowest-scoring modules, and write the dropped "
                                   "checkpoint with importance.json and importance.png.")
    p.add_argument("--model", required=True, help="local checkpoint dir, .gguf file, hub id, or catalogue name "
                                                  "(smollm2-135m, tiny-llama, ...)")
    p.add_argument("--target", choices=TARGETS, default="attn",
                   help="what to drop: whole blocks, attention or MLP sublayers, or attention+MLP ranked jointly")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--num", type=int, help="number of modules to drop (joint: attention and MLP counted together)")
    g.add_argument("--ratio", type=float, help="fraction of modules to drop, in (0, 1)")
    p.add_argument("--metric", choices=METRICS, default="cosine", help="importance metric (default: the paper's)")
    p.add_argument("--schedule", choices=SCHEDULES, default="one-shot",
                   help="one-shot: score once; iterative: re-score after every --step drops")
    p.add_argument("--step", type=int, default=1, help="modules dropped per round with --schedule iterative")
    p.add_argument("--keep", type=_int_list, default=[], help="comma-separated layer indices never to drop")
    p.add_argument("--calibration", default=d.source,
                   help="calibration text: .txt file or dir, .json/.jsonl, .parquet, a HF dataset "
                        "name[:config][@split], or c4-sample / wiki-sample / tinystories-sample (offline)")
    p.add_argument("--text-field", default=d.text_field, help="text field of json/jsonl/parquet/HF sources")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="calibration windows (paper: 256)")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="tokens per window (paper: 2048; capped by the model's context)")
    p.add_argument("--shuffle", action="store_true", help="sample windows at random instead of the first N")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for --shuffle and the random metric")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights dtype while scoring (scores accumulate in float64 regardless)")
    p.add_argument("--save-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the written checkpoint (auto: the source checkpoint's own dtype)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (directory, hub id or catalogue name) when the model dir has none")
    p.add_argument("--stream", action="store_true",
                   help="models larger than memory: score one decoder layer at a time from the safetensors "
                        "shards and write the dropped checkpoint shard by shard (needs a local checkpoint dir)")
    p.add_argument("--device", default="cpu", help="--stream: device each layer runs on (cpu, cuda, cuda:1)")
    p.add_argument("--offload-dir", default=None,
                   help="--stream: keep the calibration hidden states memory-mapped in this directory, not in RAM")
    p.add_argument("--max-shard-size", default="2GB", help="--stream: largest output shard (e.g. 2GB, 500MB)")
    p.add_argument("--output", required=True, help="directory for the dropped checkpoint and the report")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    p.set_defaults(func=_run_drop)


def _run_drop(a: argparse.Namespace) -> None:
    from .drop_job import DropJob, run_drop
    from .options import CalibrationConfig

    job = DropJob(model=a.model, target=a.target, num=a.num, ratio=a.ratio, metric=a.metric, schedule=a.schedule,
                  step=a.step, keep=a.keep, batch_size=a.batch_size, dtype=a.dtype, save_dtype=a.save_dtype,
                  tokenizer=a.tokenizer,
                  output=a.output, overwrite=a.overwrite, stream=a.stream, device=a.device,
                  offload_dir=a.offload_dir, max_shard_size=a.max_shard_size,
                  calibration=CalibrationConfig(source=a.calibration, text_field=a.text_field,
                                                num_samples=a.num_samples, seq_len=a.seq_len, shuffle=a.shuffle,
                                                seed=a.seed))
    report = run_drop(job)
    print(f"dropped attention {report['drop_attn_list']} MLP {report['drop_mlp_list']} "
          f"({report['metric']}, {report['schedule']}); wrote {a.output} (importance.json, importance.png)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="lm-eval tasks on a model (in memory)",
                       description="Run lm-eval tasks on a (dropped) model. Local task YAMLs work offline "
                                   "through --include-path; --preset paper names the paper's eight tasks.")
    p.add_argument("--model", required=True, help="checkpoint dir, hub id or catalogue name")
    p.add_argument("--tasks", type=_str_list, default=None, help="comma-separated lm-eval task names")
    p.add_argument("--preset", default=None, help="named task set, e.g. 'paper'")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: task/preset's)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (int) or fraction (<1)")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--data", action="append", default=None, metavar="TASK=FILE",
                   help="a shipped task with its data file, e.g. hellaswag_sample=hs.jsonl (repeatable)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=lambda a: _call("lightning_drop.evaluation", "eval_main", model=a.model, tasks=a.tasks,
                                        preset=a.preset, num_fewshot=a.num_fewshot,
                                        limit=_limit(a.limit), include_path=a.include_path,
                                        batch_size=a.batch_size, output=a.output, data=a.data,
                                        overwrite=a.overwrite))


def _add_perplexity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity on held-out text")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True,
                   help="held-out text: .txt file or dir, .json/.jsonl (--text-field), .parquet, a sample name")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-field", default="text")
    p.add_argument("--output", default=None, help="JSON file for the result")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=lambda a: _call("lightning_drop.evaluation", "perplexity_main", model=a.model, data=a.data,
                                        seq_len=a.seq_len, num_windows=a.num_windows, batch_size=a.batch_size,
                                        field=a.text_field, output=a.output, overwrite=a.overwrite))


def _add_speed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speed", help="prefill/decode speed, KV-cache bytes, size; vs a baseline in one run",
                       description="Prompt then greedy generation with the KV cache; baseline and model are timed "
                                   "side by side after warm-up (in lock step by default), medians of --repeats.")
    p.add_argument("--model", required=True)
    p.add_argument("--baseline", default=None, help="model to compare against (dir or catalogue name)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-results", default=None, help="eval JSON of --model (for SDR)")
    p.add_argument("--baseline-eval-results", default=None, help="eval JSON of --baseline (for SDR)")
    p.add_argument("--ideal", action="store_true", help="also profile the baseline for the ideal speedup")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process = this process's CPU time (with --threads 1: steady on a shared CPU machine)")
    p.add_argument("--interleave", choices=("step", "run"), default="step",
                   help="step: the two models take turns at every decode step; run: whole generations alternate")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=lambda a: _call("lightning_drop.speed", "speed_main", model=a.model, baseline=a.baseline,
                                        overwrite=a.overwrite,
                                        batch_size=a.batch_size, prompt_len=a.prompt_len, gen_len=a.gen_len,
                                        repeats=a.repeats, warmup=a.warmup, output=a.output,
                                        eval_results=a.eval_results, baseline_eval_results=a.baseline_eval_results,
                                        ideal=a.ideal, clock=a.clock, interleave=a.interleave, threads=a.threads))


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="4/8-bit AWQ or GPTQ of a saved (dropped) model")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output / --baseline-output")
    p.add_argument("--method", choices=("awq", "gptq"), default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None, help="default: largest of 128/64/32 dividing every width")
    p.add_argument("--calibration", default=None, help="calibration text source (default: C4 sample)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--backend", default="gptqmodel", help="gptqmodel (works on CPU); autoawq/auto-gptq explain why not")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype the quantizer runs in (default: bf16 where the CPU/GPU has it, else float32)")
    p.add_argument("--eval-data", default=None, help="held-out text to compare perplexity before/after")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --seq-len for perplexity")
    p.add_argument("--eval-skip-windows", type=int, default=None,
                   help="windows of --eval-data to skip first (default: as many as calibration used)")
    p.add_argument("--baseline", default=None,
                   help="the undropped model: quantized the same way into --baseline-output, so the quality "
                        "table has the paper's four rows (baseline, +quant, dropped, +quant)")
    p.add_argument("--baseline-output", default=None, help="where the quantized baseline goes (default: OUTPUT-baseline)")
    p.add_argument("--tasks", type=_str_list, default=None, help="lm-eval tasks for the quality table")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (int) or fraction (<1)")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--task-results", action="append", default=None, metavar="LABEL=FILE",
                   help="a row's scores from `lightning-drop eval --output` instead of running --tasks "
                        "(LABEL: baseline, baseline+quant, dropped, dropped+quant); repeatable")
    p.set_defaults(func=lambda a: _call("lightning_drop.quantize", "quantize_main", model=a.model, output=a.output,
                                        method=a.method, bits=a.bits, group_size=a.group_size,
                                        calibration=a.calibration, num_samples=a.num_samples, seq_len=a.seq_len,
                                        backend=a.backend, eval_data=a.eval_data, eval_windows=a.eval_windows,
                                        eval_skip_windows=a.eval_skip_windows, dtype=a.dtype, baseline=a.baseline,
                                        baseline_output=a.baseline_output, tasks=a.tasks,
                                        num_fewshot=a.num_fewshot, limit=_limit(a.limit),
                                        include_path=a.include_path, task_results=a.task_results,
                                        overwrite=a.overwrite))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export for inference engines: Nemotron-NAS (vLLM, TensorRT-LLM) or GGUF")
    p.add_argument("--model", required=True)
    p.add_argument("--format", choices=("nemotron-nas", "gguf"), required=True)
    p.add_argument("--output", required=True, help="directory (nemotron-nas) or .gguf file")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                   help="tensor type (default: bf16 for nemotron-nas, f16 for gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=_run_export)


def _run_export(a: argparse.Namespace) -> None:
    if a.format == "gguf":
        from .export.gguf_deci import export_gguf

        path = export_gguf(a.model, a.output, dtype=a.dtype or "f16", overwrite=a.overwrite)
    else:
        if a.dtype == "q8_0":
            raise UserError("q8_0 is a GGUF type; nemotron-nas takes f32, f16 or bf16")
        from .export.nemotron import export_nemotron_nas

        path = export_nemotron_nas(a.model, a.output, dtype=a.dtype or "bf16", overwrite=a.overwrite)
    print(f"wrote {path}")


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="sweep targets x number dropped; report with plots (configs/study/*.yaml)")
    p.add_argument("--config", required=True, help="study YAML (see configs/study/)")
    p.add_argument("--output", default=None, help="override the output directory of the config")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output directory that is not an earlier run of this study")
    p.add_argument("--budget", default=None, help="automated selection: e.g. speedup=1.2, params=0.8, kv=0.5")
    p.add_argument("--max-quality-loss", type=float, default=None,
                   help="automated selection: largest allowed relative quality loss (e.g. 0.05)")
    p.set_defaults(func=lambda a: _call("lightning_drop.study", "study_main", config=a.config, output=a.output,
                                        budget=a.budget, max_quality_loss=a.max_quality_loss,
                                        overwrite=a.overwrite))


def _call(module: str, name: str, **kwargs: object) -> object:
    import importlib

    return getattr(importlib.import_module(module), name)(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-drop",
        description="Find and remove redundant blocks, attention and MLP sublayers of transformers. "
                    "Also: fit|validate|test --config CONFIG.yaml (LightningCLI).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_drop, _add_eval, _add_perplexity, _add_speed, _add_quantize, _add_export, _add_study):
        add(sub)
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `lightning-drop {name} --help`)", add_help=False)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input was wrong (or an optional part is missing), not that the code is."""
    types: list[type[BaseException]] = [UserError, OSError, ModuleNotFoundError]
    if "lightning_drop.quantize" in sys.modules:
        types.append(sys.modules["lightning_drop.quantize"].QuantizationBackendError)
    if "lightning.pytorch" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        types.append(MisconfigurationException)
    return tuple(types)


def _user_cause(err: BaseException) -> BaseException | None:
    """The user's mistake behind `err`: itself, or an exception it was raised from (jsonargparse wraps the
    errors raised while it instantiates classes)."""
    kinds, seen = _user_errors(), set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def _close_progress_bars() -> None:
    """Close open tqdm bars now: closed later (when the interrupted frames are freed) they would redraw
    below the last message."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    from .atomic_io import cleanup_temporaries, install_signal_cleanup

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    install_signal_cleanup()
    command = argv[0] if argv else "lightning-drop"
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            from .lightning_cli import run_lightning_cli

            try:
                run_lightning_cli(argv)
            except Exception as err:
                cause = _user_cause(err)
                if cause is None:
                    raise
                # after LightningCLI's own usage line, as its parser errors look
                print(f"usage: lightning-drop {command} [-h] [-c CONFIG] [--print_config] ...", file=sys.stderr)
                print(f"lightning-drop {command}: error: {_one_line(cause)}", file=sys.stderr)
                return 2
            return 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        from .models import no_stdin_prompts

        no_stdin_prompts()
        func: Callable[[argparse.Namespace], object] = args.func
        try:
            func(args)
        except Exception as err:
            cause = _user_cause(err)
            if cause is None:
                raise
            print(f"lightning-drop {args.command}: error: {_one_line(cause)}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        cleanup_temporaries()
        _close_progress_bars()
        print(f"lightning-drop {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
