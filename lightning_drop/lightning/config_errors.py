"""Configuration mistakes of `fit|validate|test` explained in one line.

jsonargparse reports a wrong key or value as its usage text plus a nested report of every Union subtype it
tried; a user needs the file, the key and what was expected. A class_path that names a module that has moved
gets its new name instead of an import error.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Sequence

from lightning_drop.errors import UserError

#: class_path prefixes (modules or classes) that moved -> where they are now; read only for a class_path
#: that does not import, so the user learns the new name instead of an import error
MOVED_CLASS_PATHS = {
    "lightning_drop.architectures": "lightning_drop.core.architectures",
    "lightning_drop.decoder_families": "lightning_drop.core.decoder_families",
    "lightning_drop.vision_families": "lightning_drop.core.vision_families",
    "lightning_drop.modeling_dropped": "lightning_drop.core.modeling_dropped",
    "lightning_drop.options": "lightning_drop.core.options",
    "lightning_drop.importance": "lightning_drop.scoring.importance",
    "lightning_drop.importance_metrics": "lightning_drop.scoring.metrics",
    "lightning_drop.registry": "lightning_drop.scoring.registry",
    "lightning_drop.selection": "lightning_drop.scoring.selection",
    "lightning_drop.schedule": "lightning_drop.scoring.schedule",
    "lightning_drop.streaming": "lightning_drop.scoring.streaming",
    "lightning_drop.streamed_writer": "lightning_drop.scoring.streamed_writer",
    "lightning_drop.dropped_checkpoint": "lightning_drop.io.dropped_checkpoint",
    "lightning_drop.training_checkpoint": "lightning_drop.io.training_checkpoint",
    "lightning_drop.safetensors_io": "lightning_drop.io.safetensors_io",
    "lightning_drop.atomic_io": "lightning_drop.io.atomic_io",
    "lightning_drop.text_data": "lightning_drop.io.text_data",
    "lightning_drop.model_loading": "lightning_drop.io.model_loading",
    "lightning_drop.nemotron_nas": "lightning_drop.io.nemotron_nas",
    "lightning_drop.teacher_logits": "lightning_drop.io.teacher_logits",
    "lightning_drop.evaluation": "lightning_drop.measure.evaluation",
    "lightning_drop.significance": "lightning_drop.measure.significance",
    "lightning_drop.lm_eval_tasks": "lightning_drop.measure.lm_eval_tasks",
    "lightning_drop.speed": "lightning_drop.measure.speed",
    "lightning_drop.context_speed": "lightning_drop.measure.context_speed",
    "lightning_drop.clocks": "lightning_drop.measure.clocks",
    "lightning_drop.ideal_speedup": "lightning_drop.measure.ideal_speedup",
    "lightning_drop.quantize": "lightning_drop.measure.quantize",
    "lightning_drop.quality_table": "lightning_drop.measure.quality_table",
    "lightning_drop.plots": "lightning_drop.measure.plots",
    "lightning_drop.sublayer_check": "lightning_drop.measure.sublayer_check",
    "lightning_drop.lightning_module": "lightning_drop.lightning.module",
    "lightning_drop.lightning_datamodule": "lightning_drop.lightning.datamodule",
    "lightning_drop.lightning_cli": "lightning_drop.lightning.cli",
    "lightning_drop.distributed": "lightning_drop.lightning.distributed",
    "lightning_drop.models": "lightning_drop.io.model_loading",
    "lightning_drop.module": "lightning_drop.lightning.module",
    "lightning_drop.data": "lightning_drop.io.text_data",
    "lightning_drop.datamodule": "lightning_drop.lightning.datamodule",
    "lightning_drop.checkpoint": "lightning_drop.io.dropped_checkpoint",
    "lightning_drop.drop_job": "lightning_drop.jobs.drop",
    "lightning_drop.study": "lightning_drop.jobs.study",
    "lightning_drop.report": "lightning_drop.jobs.study.report",
    "lightning_drop.vision.module.VisionDropModule": "lightning_drop.lightning.module.DropModule",
    "lightning_drop.vision.lightning_module.VisionDropModule": "lightning_drop.lightning.module.DropModule",
    "lightning_drop.vision.callbacks.VisionLayerDrop": "lightning_drop.callbacks.LayerDrop",
    "lightning_drop.vision.callbacks.VisionImportanceTracker": "lightning_drop.callbacks.ImportanceTracker",
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


def read_config_files(args: Sequence[str]) -> dict[str, Any]:
    """{file: its YAML} for each `--config` in `args`, each checked first, so that a mistake names the file
    (jsonargparse names a YAML syntax error's place `"<unicode string>"`); inline YAML text is read too."""
    import yaml

    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    values += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    configs: dict[str, Any] = {}
    for value in values:
        path = Path(value)
        inline = not path.exists() and not isinstance(_yaml_or_none(value), str)  # YAML text, not a path
        if not inline and not path.exists():
            raise UserError(f"--config {value}: no such file")
        if not inline and not path.is_file():
            raise UserError(f"--config {value} is not a file")
        name = "the --config text" if inline else value
        try:
            data = yaml.safe_load(value if inline else path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"{value} is not UTF-8 text (byte {err.start})") from None
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            context = (f" ({err.context} at line {err.context_mark.line + 1})"
                       if err.context and err.context_mark is not None else "")
            raise UserError(f"{name}{where}: YAML syntax error: {err.problem}{context}") from None
        except yaml.YAMLError as err:
            raise UserError(f"{name}: not YAML: {' '.join(str(err).split())}") from None
        if data is not None and not isinstance(data, dict):
            raise UserError(f"{name}: expected a mapping of options (trainer:, model:, data:, ...) at the top "
                            f"level, not a {type(data).__name__}")
        configs[name] = data or {}
    return configs


def _yaml_or_none(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


_KEY = re.compile(r'^Parser key "([^"]+)":?\s*(.*)$')
_CLASS = re.compile(r"^- Problem with given class_path '([^']+)':$")
_UNKNOWN = re.compile(r"^Option '([^']+)' is not accepted$")
_EXPECTED = re.compile(r"^-?\s*Expected an? (.+?)(?:\. Got value: (.*))?$")
_NOT_ACCEPTED = re.compile(r"^Subcommand '\w+' does not accept option '([^']+)'$")


def _tree(lines: list[str]) -> list[tuple[str, list]]:
    """jsonargparse's indented report as (line, children) nodes."""
    nodes: list[tuple[str, list]] = []
    while lines:
        indent = len(lines[0]) - len(lines[0].lstrip())
        end = next((i for i in range(1, len(lines)) if len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines))
        nodes.append((lines[0].strip(), _tree(lines[1:end])))
        lines = lines[end:]
    return nodes


def _type_name(text: str) -> str:
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return {"NoneType": "null"}.get(text, text)


def _leaf(nodes: list[tuple[str, list]]) -> tuple[list[Any], str, str | None]:
    """(key path, problem, the value given) at the bottom of the report: the `Parser key` and class_path levels
    lead to the line that says what is wrong; a Union's other subtypes are alternatives the user did not mean."""
    if not nodes:
        return [], "", None
    text, children = nodes[0]
    given = next((t.split(":", 1)[1].strip() for t, _ in nodes if t.startswith("Given value:")), None)
    key, unknown, expected = _KEY.match(text), _UNKNOWN.match(text), _EXPECTED.match(text)
    if key:
        path, problem, got = _leaf(children or [(key.group(2), [])])
        return [*key.group(1).split("."), *path], problem, got
    if unknown:
        return [unknown.group(1)], "unknown option", None
    if expected:
        got = expected.group(2) if expected.group(2) is not None else given
        return [], f"expected {_type_name(expected.group(1))}" + (f", got {got}" if got is not None else ""), got
    if text.startswith("Does not validate against any of the Union subtypes"):
        errors = next((c for t, c in nodes if t == "Errors:"), [])
        for item, sub in errors:
            klass = _CLASS.match(item)
            if klass:
                path, problem, got = _leaf(sub)
                if not path and not problem.startswith("expected"):
                    return [("class", klass.group(1)), "class_path"], _no_class(klass.group(1), problem), None
                return [("class", klass.group(1)), *path], problem, got
        kinds = [_type_name(m.group(1)) if (m := _EXPECTED.match(t)) else
                 re.sub(r"^- Not a valid subclass of (\w+).*", r"a \1 (class_path and init_args)", t)
                 for t, _ in errors]
        return [], f"expected {' or '.join(kinds)}" + (f", got {given}" if given is not None else ""), given
    return [], " ".join([text] + [t for t, _ in children]), None


def _no_class(class_path: str, problem: str) -> str:
    """Why `class_path` cannot be used, with the close match of a misspelt class name."""
    module, _, name = class_path.rpartition(".")
    try:
        close = difflib.get_close_matches(name, dir(importlib.import_module(module)), n=1)
    except ImportError:
        close = []
    return f"cannot use {class_path} ({problem})" + (f"; did you mean {module}.{close[0]}?" if close else "")


def _locate(data: Any, path: list[Any]) -> tuple[str, bool, Any]:
    """The key as the user wrote it in `data` (list indices, `init_args` where given), whether it is there, and
    its value there (None unless a plain value)."""
    parts: list[str] = []
    found = bool(path)
    for seg in path:
        if isinstance(seg, tuple):  # a class_path level: the list entry naming that class, then its init_args
            if isinstance(data, list):
                names = [e if isinstance(e, str) else e.get("class_path") if isinstance(e, dict) else None
                         for e in data]
                hits = [j for j, n in enumerate(names) if n and (n == seg[1] or seg[1].endswith("." + n))]
                parts[-1] += f"[{hits[0]}]" if hits else ""
                data = data[hits[0]] if hits else None
            if not isinstance(data, dict) or "init_args" in data:
                parts.append("init_args")
                data = data.get("init_args") if isinstance(data, dict) else None
            continue
        parts.append(str(seg))
        found = found and isinstance(data, dict) and seg in data
        data = data.get(seg) if isinstance(data, dict) else None
    return ".".join(parts), found, data if isinstance(data, (str, int, float, bool)) else None


def _on_command_line(key: str, args: Sequence[str]) -> list[tuple[str, str | None]]:
    """(`--option`, its value) of each option in `args` that sets `key`."""
    plain, found = re.sub(r"\[\d+\]|\.init_args", "", key), []
    for i, arg in enumerate(args):
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        name = name.rstrip("+")
        if name and (re.sub(r"\.init_args", "", name) == plain or plain.startswith(name + ".")):
            found.append((f"--{name}", value if eq else (args[i + 1] if i + 1 < len(args) else None)))
    return found


def options_of(class_path: str) -> list[str]:
    """The keyword options of the class `class_path` names (none known: it cannot be imported or takes **kwargs)."""
    module, _, name = class_path.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return []
    return [p.name for p in params if p.kind != p.VAR_POSITIONAL]


def explain_parse_error(message: str, args: list[str], configs: dict[str, Any], parser: Any) -> str:
    """One line for a jsonargparse error: where (the config file or the command-line option), which key,
    what was expected (and the close match of an unknown option)."""
    message = message.replace('"<unicode string>"', "the --config text")  # YAML given inline
    lines = [line for line in message.splitlines() if line.strip()]
    top = _NOT_ACCEPTED.match(lines[0].strip()) if lines else None
    if top:  # a key no class takes: the first unknown level, with the known keys beside it
        path, known = top.group(1).split("."), [a.dest.split(".") for a in parser._actions]
        depth = 0
        while depth < len(path) and any(d[:depth + 1] == path[:depth + 1] for d in known):
            depth += 1
        siblings = sorted({d[depth] for d in known if len(d) > depth and d[:depth] == path[:depth]})
        path, options, problem, got = path[:depth + 1], siblings, "unknown option", None
    else:
        path, problem, got = _leaf(_tree(lines))
        classes = [seg[1] for seg in path if isinstance(seg, tuple)]
        options = options_of(classes[-1]) if problem == "unknown option" and classes else []
        if problem == "unknown option" and classes:
            problem = f"unknown option of {classes[-1].rsplit('.', 1)[-1]}"
    if not path:
        return " ".join(message.split())
    # the last place that sets the key and, where several do, gives the value that failed
    key = _locate(None, path)[0]
    places = [(f"{name}: {k}", value) for name, data in configs.items()
              for k, found, value in [_locate(data, path)] if found] + _on_command_line(key, args)
    fitting = [where for where, value in places if got is None or value is None or str(value) == got]
    where = (fitting or [where for where, _ in places] or [f"--{key}"])[-1]
    leaf = str(path[-1])
    close = difflib.get_close_matches(leaf, options, n=1) if problem.startswith("unknown option") else []
    if close:
        problem += f" (did you mean '{close[0]}'?)"
    elif options:
        problem += f" (expected one of: {', '.join(options[:24])}{', ...' if len(options) > 24 else ''})"
    return f"{where}: {problem}"
