"""The jobs layer: commands above the library, their options derived from typed signatures."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from lightning_drop.cli import COMMANDS, build_parser
from lightning_drop.errors import UserError
from lightning_drop.jobs.commandline import Command, add_command

REPO = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_never_imports_jobs():
    """Every module outside jobs/, cli.py and lightning/cli.py imports without pulling in the jobs layer."""
    code = """
import json, pkgutil, importlib, sys
import lightning_drop
skip = ("lightning_drop.jobs", "lightning_drop.cli", "lightning_drop.lightning.cli")
names, todo = [], [("lightning_drop.", lightning_drop.__path__)]
while todo:  # walk_packages would import every package it walks into, jobs included
    prefix, path = todo.pop()
    for m in pkgutil.iter_modules(path, prefix):
        if not m.name.startswith(skip):
            module = importlib.import_module(m.name)
            names.append(m.name)
            if m.ispkg:
                todo.append((m.name + ".", module.__path__))
print(json.dumps([len(names), sorted(m for m in sys.modules if m.startswith("lightning_drop.jobs"))]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert count > 20 and jobs == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_job_parameter_is_an_option_with_the_signature_default(name):
    command = COMMANDS[name]
    sig = inspect.signature(command.function())
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[name]
    dests = {a.dest: a for a in parser._actions}
    for param in command.options():
        assert param in dests, f"{name}: no option for {param}"
    assert set(command.options()) == set(sig.parameters) - set(command.hidden)
    for param in command.options():
        default = sig.parameters[param].default
        if default is not inspect.Parameter.empty:
            assert dests[param].default == default, (name, param)


def _typed(model: str, keep: list[int] | None = None, tasks: list[str] | str | None = None,
           limit: int | float | None = None, mode: Literal["a", "b"] = "a", dry: bool = False,
           pairs: list[str] | None = None, seq_len: int = 8, field: str = "text") -> dict:
    """A job.

    Args:
        model: the model
        seq_len: tokens
    """
    return dict(locals())


def test_signature_types_become_the_established_spellings():
    command = Command("typed", "tests.test_jobs:_typed", help="h", repeated={"pairs": "K=V"},
                      flags={"field": "--text-field"})
    parser = argparse.ArgumentParser(prog="x")
    typed = add_command(parser.add_subparsers(dest="command"), command)
    assert "tokens" in typed.format_help() and "the model" in typed.format_help()  # help from the docstring
    args = parser.parse_args(["typed", "--model", "m", "--keep", "0,2", "--tasks", "a, b", "--limit", "5",
                              "--mode", "b", "--dry", "--pairs", "k=v", "--pairs", "l=w", "--seq-len", "3",
                              "--text-field", "body"])
    assert command.run(args) == dict(model="m", keep=[0, 2], tasks=["a", "b"], limit=5, mode="b", dry=True,
                                     pairs=["k=v", "l=w"], seq_len=3, field="body")
    assert parser.parse_args(["typed", "--model", "m", "--limit", "0.25"]).limit == 0.25
    defaults = command.run(parser.parse_args(["typed", "--model", "m"]))
    assert defaults == dict(model="m", keep=None, tasks=None, limit=None, mode="a", dry=False, pairs=None,
                            seq_len=8, field="text")
    for bad in (["--keep", "a"], ["--mode", "c"], ["--limit", "x"], ["--dry", "yes"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["typed", "--model", "m", *bad])
    with pytest.raises(SystemExit):
        parser.parse_args(["typed"])  # --model is required: it has no default


def test_a_flag_that_defaults_to_true_is_refused():
    def job(on: bool = True) -> None:
        """Args:
        on: x
        """

    import types

    module = types.ModuleType("ld_test_flag")
    module.job = job
    sys.modules["ld_test_flag"] = module
    try:
        with pytest.raises(TypeError, match="default to False"):
            add_command(argparse.ArgumentParser().add_subparsers(), Command("j", "ld_test_flag:job", help="h"))
    finally:
        del sys.modules["ld_test_flag"]


def test_an_old_class_path_gets_one_error_naming_the_new_one(tmp_path, capsys):
    """A user's YAML written against a module that moved (`lightning_drop.module.DropModule`) is refused in
    one line that names the class's path now, before anything is built or written."""
    from lightning_drop.cli import main

    text = (REPO / "configs" / "track_random_init.yaml").read_text()
    old = text.replace("lightning_drop.lightning.module.", "lightning_drop.module.")
    assert old != text
    (tmp_path / "old.yaml").write_text(old)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["fit", "--config", str(tmp_path / "old.yaml"), "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == ["lightning-drop fit: error: class_path lightning_drop.module.DropModule no longer exists: "
                      "use lightning_drop.lightning.module.DropModule"], err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(UserError, match="use lightning_drop.vision.image_data.ImageDataModule"):
        from lightning_drop.lightning.config_errors import check_moved_class_paths

        check_moved_class_paths(["--data.class_path=lightning_drop.vision.data.ImageDataModule"])
    with pytest.raises(UserError, match="VisionLayerDrop no longer exists: use lightning_drop.callbacks.LayerDrop$"):
        check_moved_class_paths(["--trainer.callbacks+=lightning_drop.vision.callbacks.VisionLayerDrop"])
    with pytest.raises(UserError, match="use lightning_drop.lightning.module.DropModule$"):
        check_moved_class_paths(["--model.class_path=lightning_drop.vision.lightning_module.VisionDropModule"])
