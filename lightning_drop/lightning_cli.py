"""`lightning-drop fit|validate|test` through Lightning's `LightningCLI`.

`run_lightning_cli(["fit", "--config", "configs/drop_and_recover.yaml"])` is what `lightning-drop fit --config
configs/drop_and_recover.yaml` runs. The model and data default to `DropModule` and `TextDataModule`, so
`--model.model tiny-llama --data.seq_len 64` works without any YAML; any other LightningModule /
LightningDataModule can be named with `class_path`. Callbacks go under `trainer.callbacks` as
`class_path: lightning_drop.callbacks.LayerDrop` + `init_args`, and configs compose with repeated `--config`.

The tokenizer is not linked between model and data: `data.init_args.tokenizer` is set on its own (a link
would forbid setting it and fail for other module classes); `DropModule.setup` refuses a datamodule
tokenizer with more tokens than the model embeds. `fit --ckpt_path PATH` with a local PATH is handed to
the trainer as `trainer.ckpt_path` before `fit`, so callbacks and `DropModule.configure_model` know in
`setup` that this fit resumes (Lightning itself reveals `fit(ckpt_path=...)` only after setup); LayerDrop
then re-applies the checkpoint's drops instead of scoring again. `--trainer.strategy fsdp_decoder_layers`
names `lightning_drop.distributed.DecoderLayerFSDPStrategy`.

Run as a module (`python -m lightning_drop.lightning_cli fit ...`) it re-launches itself correctly for
Lightning's DDP subprocess launcher.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_drop.errors import UserError

SUBCOMMANDS = ("fit", "validate", "test")
DEFAULT_MODEL = "lightning_drop.lightning_module.DropModule"
DEFAULT_DATA = "lightning_drop.lightning_datamodule.TextDataModule"


#: class_path prefixes (modules or classes) that moved -> where they are now; read only for a class_path
#: that does not import, so the user learns the new name instead of an import error
MOVED_CLASS_PATHS = {
    "lightning_drop.models": "lightning_drop.model_loading",
    "lightning_drop.module": "lightning_drop.lightning_module",
    "lightning_drop.data": "lightning_drop.text_data",
    "lightning_drop.datamodule": "lightning_drop.lightning_datamodule",
    "lightning_drop.checkpoint": "lightning_drop.dropped_checkpoint",
    "lightning_drop.drop_job": "lightning_drop.jobs.drop",
    "lightning_drop.study": "lightning_drop.jobs.study",
    "lightning_drop.report": "lightning_drop.jobs.study.report",
    "lightning_drop.vision.module": "lightning_drop.vision.lightning_module",
    "lightning_drop.vision.data": "lightning_drop.vision.image_data",
}


def check_moved_class_paths(args: Sequence[str]) -> None:
    """Refuse a class_path (on the command line or in a `--config` YAML) written against a module that
    moved, naming the new path; jsonargparse would only say that the old one does not import."""
    import importlib.util

    import yaml

    values: list[Any] = []
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("-c", "--config"):
            path = value or (args[i + 1] if i + 1 < len(args) else "")
            try:
                with open(path, encoding="utf-8") as f:
                    values.append(yaml.safe_load(f))
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                pass  # reported by LightningCLI's own parsing
        else:
            values.append(value or arg)
    while values:
        value = values.pop()
        if isinstance(value, dict):
            values.extend(value.values())
        elif isinstance(value, list):
            values.extend(value)
        elif isinstance(value, str) and value.startswith("lightning_drop."):
            old = max((k for k in MOVED_CLASS_PATHS if value == k or value.startswith(k + ".")), key=len, default=None)
            module = value.rpartition(".")[0]
            if old is None:
                continue
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:
                found = False
            if not found:
                raise UserError(f"class_path {value} no longer exists: use "
                                f"{MOVED_CLASS_PATHS[old]}{value[len(old):]}")


def _looks_local(path: str) -> bool:
    """Not one of Lightning's named checkpoints ("last", "best", ...) nor a URL."""
    return "://" not in path and path not in ("last", "best", "hpc", "registry") and not path.startswith("registry:")


class DropCLI(LightningCLI):
    """LightningCLI with DropModule / TextDataModule as defaults; a resume path known before setup."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})

    def before_fit(self) -> None:
        # `trainer.ckpt_path = path` is Lightning's user-managed resume path: the same restore, but visible
        # to `Callback.setup` (see lightning_drop.distributed.resume_path). "last"/"best"/URLs stay as given.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        path = config.get("ckpt_path")
        if isinstance(path, (str, os.PathLike)) and os.path.exists(path):
            self.trainer.ckpt_path = path
            config["ckpt_path"] = None

    def _parse_ckpt_path(self) -> None:
        """Restore `--ckpt_path` with `weights_only=True` unless `--weights_only false` opts out, and check a
        local checkpoint before anything reads it (LightningCLI does, right here): some of Lightning's
        loaders unpickle anything (FSDP full and sharded checkpoints, URLs when `weights_only` is unset),
        which would run code the file carries."""
        from .training_checkpoint import verify_checkpoint

        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is not None and "weights_only" in config:
            if config.get("weights_only") is None:
                config["weights_only"] = True
            path = config.get("ckpt_path")
            if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) and _looks_local(str(path)):
                raise UserError(f"--ckpt_path {path}: no such file or directory")
            if config["weights_only"] and isinstance(path, (str, os.PathLike)) and os.path.exists(path):
                verify_checkpoint(path)
        super()._parse_ckpt_path()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}


def run_lightning_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> DropCLI:
    """Parse `args` (`[subcommand, --flags...]`; None = `sys.argv[1:]`), build everything, run the subcommand.

    `run=False` only instantiates (no subcommand in `args` then). Extra keyword arguments go to `DropCLI`.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning_drop  # noqa: F401  (registers the dropped classes with transformers' Auto classes)
    import lightning_drop.distributed  # noqa: F401  (registers the `fsdp_decoder_layers` strategy name)
    from lightning_drop.model_loading import no_stdin_prompts

    no_stdin_prompts()

    args = list(sys.argv[1:] if args is None else args)
    check_moved_class_paths(args)
    if run and args and not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
        raise SystemExit(f"lightning-drop: unknown subcommand {args[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    options: dict[str, Any] = dict(
        model_class=pl.LightningModule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        run=run,
        args=args,
    )
    options.update(kwargs)
    with warnings.catch_warnings():
        # `lightning-drop fit ...` passes its own argv on: not the mistake this warning is about.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return DropCLI(**options)


def main() -> None:
    run_lightning_cli(sys.argv[1:])


if __name__ == "__main__":
    main()
