"""The jobs layer: commands above the library, their options derived from typed signatures, old paths kept."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lightning_drop.cli import COMMANDS, build_parser
from lightning_drop.jobs.commandline import Command, add_command

REPO = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_never_imports_jobs():
    """Every module outside jobs/, cli.py and lightning_cli.py imports without pulling in the jobs layer."""
    code = """
import json, pkgutil, importlib, sys
import lightning_drop
skip = ("lightning_drop.jobs", "lightning_drop.cli", "lightning_drop.lightning_cli")
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


def test_old_import_paths_reach_the_jobs():
    import lightning_drop.drop_job as old_drop
    from lightning_drop.drop_job import DropJob, run_drop

    import lightning_drop.jobs.drop as drop
    from lightning_drop import evaluation, quantize, speed
    from lightning_drop.jobs import evaluate as eval_jobs
    from lightning_drop.jobs import quantize as quantize_jobs
    from lightning_drop.jobs import speed as speed_jobs

    assert old_drop is drop and DropJob is drop.DropJob and run_drop is drop.run_drop
    assert drop.__spec__.name == "lightning_drop.jobs.drop"  # the alias did not rename the real module
    assert evaluation.eval_main is eval_jobs.eval_main and evaluation.perplexity_main is eval_jobs.perplexity_main
    assert speed.speed_main is speed_jobs.speed_main and quantize.quantize_main is quantize_jobs.quantize_main
    with pytest.raises(AttributeError):
        evaluation.no_such_name  # noqa: B018


def test_old_study_and_report_paths_reach_the_study_package():
    import lightning_drop.jobs.study as study
    import lightning_drop.jobs.study.report as report
    import lightning_drop.study as old_study
    from lightning_drop import report as old_report
    from lightning_drop.study import Study, StudyConfig, _derive, study_main

    assert old_study is study and old_report is report
    assert Study is study.run.Study and StudyConfig is study.config.StudyConfig and _derive is study.budget.derive
    assert study_main is study.run.study_main and old_report.write_report is report.write_report
    assert study.__spec__.name == "lightning_drop.jobs.study" and report.__spec__.name == "lightning_drop.jobs.study.report"


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


def test_old_vision_entry_runs_the_one_lightning_cli():
    """`python -m lightning_drop.vision.run` (the vision stack's old entry) is `lightning-drop fit|validate|test`."""
    import lightning_drop.lightning_cli as lightning_cli
    import lightning_drop.vision.run as old

    assert old is lightning_cli
    proc = subprocess.run([sys.executable, "-m", "lightning_drop.vision.run", "fit", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--trainer.callbacks" in proc.stdout and "--ckpt_path" in proc.stdout


RENAMED = {"models": "model_loading", "module": "lightning_module", "datamodule": "lightning_datamodule",
           "data": "text_data", "checkpoint": "dropped_checkpoint", "vision.module": "vision.lightning_module",
           "vision.data": "vision.image_data"}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_renamed_modules_answer_to_their_old_names(old):
    import importlib

    new = importlib.import_module(f"lightning_drop.{RENAMED[old]}")
    assert importlib.import_module(f"lightning_drop.{old}") is new
    assert new.__spec__.name == f"lightning_drop.{RENAMED[old]}"


def test_configs_with_the_old_class_paths_still_parse(tmp_path):
    """A user's YAML written against `lightning_drop.module.DropModule` keeps working after the rename."""
    text = (REPO / "configs" / "track_random_init.yaml").read_text()
    old = text.replace("lightning_drop.lightning_module.", "lightning_drop.module.").replace(
        "lightning_drop.lightning_datamodule.", "lightning_drop.datamodule.")
    assert old != text
    (tmp_path / "old.yaml").write_text(old)
    proc = subprocess.run([sys.executable, "-m", "lightning_drop.lightning_cli", "fit", "--config",
                           str(tmp_path / "old.yaml"), "--print_config"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["class_path"].endswith("DropModule")
    assert printed["data"]["class_path"].endswith("TextDataModule")
