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
then re-applies the checkpoint's drops instead of scoring again. `--trainer.strategy fsdp2`
names `lightning_drop.lightning.distributed.FSDP2Strategy`.

A mistake in the configuration is one `UserError` line that names the file (or the command line), the key
and what was expected, instead of jsonargparse's usage text and its nested report of every Union subtype
(`explain_parse_error`). A resume whose checkpoint holds another model than the configured one is refused
before the fit starts.

`lightning-drop fit ...` (or `python -m lightning_drop.cli fit ...`) is the entry point: it turns these
errors into one line and re-launches itself correctly for Lightning's DDP subprocess launcher.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_drop.errors import UserError
from lightning_drop.lightning.config_errors import (
    check_moved_class_paths,
    explain_parse_error,
    options_of,
    read_config_files,
)

SUBCOMMANDS = ("fit", "validate", "test")
DEFAULT_MODEL = "lightning_drop.lightning.module.DropModule"
DEFAULT_DATA = "lightning_drop.lightning.datamodule.TextDataModule"


def _looks_local(path: str) -> bool:
    """Not one of Lightning's named checkpoints ("last", "best", ...) nor a URL."""
    return "://" not in path and path not in ("last", "best", "hpc", "registry") and not path.startswith("registry:")


class DropCLI(LightningCLI):
    """LightningCLI with DropModule / TextDataModule as defaults; a resume path known before setup."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # raise instead of printing the whole usage: `parse_arguments` turns the error into one line
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        configs = read_config_files(args) if isinstance(args, (list, tuple)) else {}
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            subcommand = next((a for a in args or () if a in SUBCOMMANDS), None)
            subparser = getattr(self, "_subcommand_parsers", {}).get(subcommand, parser)
            raise UserError(explain_parse_error(str(err), list(args or ()), configs, subparser)) from None

    def before_fit(self) -> None:
        # `trainer.ckpt_path = path` is Lightning's user-managed resume path: the same restore, but visible
        # to `Callback.setup` (see lightning_drop.lightning.distributed.resume_path). "last"/"best"/URLs stay as given.
        from lightning_drop.lightning.distributed import check_strategy

        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        # every rank runs this command: one line each, before any work
        check_strategy(self.trainer.strategy, self.model)
        self._check_save_dir()
        path = config.get("ckpt_path")
        if isinstance(path, (str, os.PathLike)) and os.path.exists(path):
            self._refuse_other_model(path, config)
            self.trainer.ckpt_path = path
            config["ckpt_path"] = None

    def _check_save_dir(self) -> None:
        """DropModule's `save_dir`, checked before the trainer's setup writes anything (the config it saves, the
        logger's run folder); DropModule.setup checks again where `{log_dir}` is a logger's new run folder."""
        from lightning_drop.lightning.module import LOG_DIR, DropModule

        save_dir = getattr(self.model, "hparams", {}).get("save_dir") if isinstance(self.model, DropModule) else None
        if save_dir and (LOG_DIR not in str(save_dir) or not self.trainer.loggers):
            self.model.check_save_dir(str(self.trainer.default_root_dir))

    def _refuse_other_model(self, path: str | os.PathLike, config: Any) -> None:
        """A DropModule resume must restore the configured model: checked here, before setup prepares data and
        callbacks score or drop (DropModule.on_load_checkpoint checks again, for `Trainer.fit(ckpt_path=...)`)."""
        from lightning_drop.lightning.module import DropModule
        from lightning_drop.io.training_checkpoint import CKPT_KEY, checkpoint_meta, refuse_other_model

        if not isinstance(self.model, DropModule) or config.get("weights_only") is False:
            return  # (a checkpoint of pickled objects is read by Lightning's own loader, when the user opts in)
        meta = checkpoint_meta(path)
        if meta is not None:  # None: a directory layout other than Lightning's (DeepSpeed's)
            refuse_other_model(meta.get(CKPT_KEY), self.model.hf_model.config.to_dict(), f"--ckpt_path {path}")

    def _parse_ckpt_path(self) -> None:
        """Restore `--ckpt_path` with `weights_only=True` unless `--weights_only false` opts out, and check a
        local checkpoint before anything reads it (LightningCLI does, right here): some of Lightning's
        loaders unpickle anything (FSDP full and sharded checkpoints, URLs when `weights_only` is unset),
        which would run code the file carries."""
        from lightning_drop.io.training_checkpoint import verify_checkpoint

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
        configured = self._model_arguments()
        try:
            super()._parse_ckpt_path()  # the checkpoint's hyperparameters replace the configured model's
        except argparse.ArgumentError as err:
            problem = explain_parse_error(str(err), [], {}, self._subcommand_parsers.get(subcommand, self.parser))
            raise UserError(f"--ckpt_path {config.get('ckpt_path') if config is not None else ''}: the model "
                            f"hyperparameters saved in it do not fit: {problem}") from None
        model = self.config.get(subcommand, {}).get("model") if subcommand else None
        saved = dict(model.get("dict_kwargs") or {}) if hasattr(model, "get") else {}  # passed on unchecked
        class_path = str(model.get("class_path")) if saved else ""
        unknown = sorted(set(saved) - set(options_of(class_path) or saved))
        if unknown:
            raise UserError(f"--ckpt_path {config.get('ckpt_path')}: the model hyperparameters saved in it do not "
                            f"fit: {', '.join(unknown)}: unknown option of {class_path.rsplit('.', 1)[-1]} (saved by "
                            "another version?)")
        if configured:
            self._refuse_other_arguments(configured, self._model_arguments() or {})

    def _model_arguments(self) -> dict[str, Any] | None:
        """The DropModule arguments that decide which model trains (those given: not None)."""
        from lightning_drop.lightning.module import DropModule

        subcommand = self.config.get("subcommand")
        model = self.config.get(subcommand, {}).get("model") if subcommand else None
        class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
        module, _, name = str(class_path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return None
        if not (isinstance(cls, type) and issubclass(cls, DropModule)):
            return None
        init = model.get("init_args") or {}
        return {key: init.get(key) for key in ("model", "init_config") if init.get(key) is not None}

    def _refuse_other_arguments(self, configured: dict[str, Any], restored: dict[str, Any]) -> None:
        """LightningCLI resumes with the model arguments saved in the checkpoint, silently replacing the
        configured ones: a configured model that is not the checkpoint's is refused instead."""
        def same(a: Any, b: Any) -> bool:
            if isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
                return os.path.samefile(a, b)
            return a == b

        if any(not same(value, restored.get(key)) for key, value in configured.items()):
            subcommand = self.config.get("subcommand")
            path = self.config.get(subcommand, {}).get("ckpt_path")
            saved = ", ".join(f"{key}: {restored.get(key)}" for key in configured)
            given = ", ".join(f"{key}: {value}" for key, value in configured.items())
            raise UserError(f"--ckpt_path {path} was trained with {saved}, not the configured {given}: resume "
                            "with the model it was trained on, or start a new fit without --ckpt_path")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}


def run_lightning_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> DropCLI:
    """Parse `args` (`[subcommand, --flags...]`; None = `sys.argv[1:]`), build everything, run the subcommand.

    `run=False` only instantiates (no subcommand in `args` then). Extra keyword arguments go to `DropCLI`.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning_drop  # noqa: F401  (registers the dropped classes with transformers' Auto classes)
    import lightning_drop.lightning.distributed  # noqa: F401  (registers the `fsdp2` strategy name)
    from lightning_drop.io.model_loading import no_stdin_prompts

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

