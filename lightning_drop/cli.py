"""`lightning-drop`: one entry point for every job.

A table from subcommand to job function (`lightning_drop.jobs`); each command's options are derived from its
job's typed signature and docstring (`jobs.commandline`). `fit|validate|test` go to LightningCLI (YAML configs).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import UserError
from .jobs.commandline import Command, add_command

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("drop", "lightning_drop.jobs.drop:drop_main", one_of=("num", "ratio", "span"),
            help="score modules on calibration text and write a dropped checkpoint"),
    Command("eval", "lightning_drop.jobs.evaluate:eval_main", repeated={"data": "TASK=FILE"},
            hidden=("offline_data",), help="lm-eval tasks on a model (in memory)"),
    Command("perplexity", "lightning_drop.jobs.evaluate:perplexity_main", flags={"field": "--text-field"},
            help="perplexity on held-out text"),
    Command("speed", "lightning_drop.jobs.speed:speed_main",
            help="prefill/decode speed, KV-cache bytes, size; vs a baseline in one run"),
    Command("quantize", "lightning_drop.jobs.quantize:quantize_main", repeated={"task_results": "LABEL=FILE"},
            help="4/8-bit AWQ or GPTQ of a saved (dropped) model"),
    Command("export", "lightning_drop.jobs.export:export_main",
            help="export for inference engines: Nemotron-NAS (vLLM, TensorRT-LLM) or GGUF"),
    Command("families", "lightning_drop.jobs.families:families_main",
            help="every causal-LM model type of the installed transformers: supported, not yet, or refused"),
    Command("track", "lightning_drop.jobs.track:track_main", many=("models",),
            help="importance of every layer across a series of checkpoints (.ckpt, directories, hub@revision)"),
    Command("study", "lightning_drop.jobs.study:study_main",
            help="sweep targets x number dropped; report with plots (configs/study/*.yaml)"),
)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-drop",
        description="Find and remove redundant blocks, attention and MLP sublayers of transformers. "
                    "Also: fit|validate|test --config CONFIG.yaml (LightningCLI).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        add_command(sub, command)
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `lightning-drop {name} --help`)", add_help=False)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input was wrong (or an optional part is missing), not that the code is."""
    types: list[type[BaseException]] = [UserError, OSError, ModuleNotFoundError]
    if "lightning_drop.measure.quantize" in sys.modules:
        types.append(sys.modules["lightning_drop.measure.quantize"].QuantizationBackendError)
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
        # a bar interrupted inside its constructor, after it drew its first line, closes without ending that line
        unfinished = hasattr(bar, "sp") and not hasattr(bar, "last_print_t") and not getattr(bar, "disable", True)
        bar.close()
        if unfinished:
            bar.fp.write("\n")


def _interruption(err: BaseException) -> bool:
    """Whether `err` ends the run because the user stopped it: Ctrl-C, SIGTERM, or the `sys.exit(1)` with which
    Lightning's trainer answers a Ctrl-C."""
    from .io.atomic_io import Terminated

    if isinstance(err, (KeyboardInterrupt, Terminated)):
        return True
    return isinstance(err, SystemExit) and isinstance(err.__context__, (KeyboardInterrupt, Terminated))


def main(argv: Sequence[str] | None = None) -> int:
    from .io.atomic_io import cleanup_temporaries, install_signal_cleanup
    from .io.output_targets import lock_targets, release_targets

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    install_signal_cleanup()
    command = argv[0] if argv else "lightning-drop"
    lock_targets()  # until this run ends, a second run writing one of its targets is refused
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            from .lightning.cli import run_lightning_cli

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
        if args.command is None:
            parser.print_help()
            return 2
        from .io.model_loading import no_stdin_prompts

        no_stdin_prompts()
        try:
            COMMANDS[args.command].run(args)
        except Exception as err:
            cause = _user_cause(err)
            if cause is None:
                raise
            print(f"lightning-drop {args.command}: error: {_one_line(cause)}", file=sys.stderr)
            return 2
    except (KeyboardInterrupt, SystemExit) as err:
        if not _interruption(err):
            raise
        cleanup_temporaries()
        _close_progress_bars()
        print(f"lightning-drop {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        release_targets()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
