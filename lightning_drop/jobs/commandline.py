"""A job's typed signature and docstring, as `argparse` options with the command line's spellings.

Each parameter becomes `--name-with-dashes` (or the spelling a `Command` names), its type and default come
from the annotation, its help from the docstring's `Args:` section:

- `bool` (default False): a bare flag, `--overwrite`;
- `Literal[...]`: those choices; `int`, `float`, `str`: that type; `X | None`: optional, default None;
- `list[int]` / `Sequence[str]`: one comma-separated value, `--keep 0,1`, `--tasks a,b`;
- `int | float`: a count when >= 1, a fraction below (lm-eval's `limit`);
- a parameter named in `Command.repeated`: a repeatable `--data TASK=FILE`, collected in a list;
- a parameter named in `Command.many`: several values after one option, `--models a b c`.

jsonargparse derives options from signatures too, but spells them `--seq_len`, wants `--overwrite true`,
`--keep [0,1]` and reports type errors over several lines; the commands keep their established spellings.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any, Callable, Literal, Mapping, Union

from ..errors import UserError, command_line_options


@dataclasses.dataclass(frozen=True)
class Command:
    """One `lightning-drop` subcommand: the job it runs and how its options are spelled."""

    name: str
    job: str  # "module:function", imported when the parser is built (job modules import nothing heavy)
    help: str
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)  # parameter -> option, when not --dashed
    repeated: Mapping[str, str] = dataclasses.field(default_factory=dict)  # parameter -> METAVAR (repeatable)
    one_of: tuple[str, ...] = ()  # parameters of which exactly one must be given
    many: tuple[str, ...] = ()  # parameters that take several values after one option (`--models a b c`)
    hidden: tuple[str, ...] = ()  # parameters the command line does not offer (their defaults apply)

    def function(self) -> Callable[..., Any]:
        module, _, name = self.job.partition(":")
        return getattr(importlib.import_module(module), name)

    def options(self) -> list[str]:
        """The job parameters the command line sets."""
        return [p for p in inspect.signature(self.function()).parameters if p not in self.hidden]

    def option(self, name: str) -> str:
        """The command-line spelling of parameter `name`."""
        return self.flags.get(name, "--" + name.replace("_", "-"))

    def run(self, args: argparse.Namespace) -> Any:
        values = {p: getattr(args, p) for p in self.options()}
        for name, value in values.items():
            # an empty path would mean "no output" to some jobs and the working directory to others
            if _is_path(name) and isinstance(value, str) and not value.strip():
                raise UserError(f"{self.option(name)} is empty: give a path")
        with command_line_options({p: self.option(p) for p in values}):  # messages then name --options
            return self.function()(**values)


def _is_path(parameter: str) -> bool:
    """Parameters that name a place to write, by the naming convention of the jobs."""
    return parameter == "output" or parameter.endswith(("_dir", "_output"))


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _count_or_fraction(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(value) if value >= 1 else value


def _members(hint: Any) -> list[Any]:
    """The types of a union (`X | None` -> [X]), or [hint]."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def _is_sequence(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return isinstance(origin, type) and issubclass(origin, collections.abc.Sequence) and origin is not str


def _kind(name: str, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for a parameter annotated `hint`."""
    members = _members(hint)
    sequences = [m for m in members if _is_sequence(m)]
    if sequences:
        (item,) = typing.get_args(sequences[0]) or (str,)
        return {"type": _int_list if item is int else _str_list}
    if set(members) == {int, float}:
        return {"type": _count_or_fraction}
    if len(members) == 1:
        (only,) = members
        if only is bool:
            return {"action": "store_true"}
        if typing.get_origin(only) is Literal:
            choices = typing.get_args(only)
            return {"type": type(choices[0]), "choices": choices}
        if only in (int, float, str):
            return {"type": only}
    raise TypeError(f"parameter {name!r}: no command-line form for {hint!r}")


def _param_help(func: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: help}) of a Google-style docstring."""
    import docstring_parser

    text = inspect.getdoc(func) or ""
    doc = docstring_parser.parse(text)
    first = text.split("\n\n")[0]  # the summary; later paragraphs speak to Python callers
    return " ".join(first.split()), {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


def add_command(sub: argparse._SubParsersAction, command: Command) -> argparse.ArgumentParser:
    """The subparser of `command`, its options derived from the job's signature."""
    func = command.function()
    hints = typing.get_type_hints(func)
    description, helps = _param_help(func)
    parser = sub.add_parser(command.name, help=command.help, description=description)
    group = parser.add_mutually_exclusive_group(required=True) if command.one_of else None
    for name, param in inspect.signature(func).parameters.items():
        if name in command.hidden:
            continue
        option = command.option(name)
        if name in command.repeated:
            kwargs: dict[str, Any] = {"action": "append", "metavar": command.repeated[name]}
        elif name in command.many:
            kwargs = {"nargs": "+", "metavar": name.rstrip("s").upper()}
        else:
            kwargs = _kind(name, hints[name])
            if "choices" not in kwargs and kwargs.get("action") != "store_true":
                kwargs["metavar"] = option.lstrip("-").replace("-", "_").upper()  # as argparse names --option
        required = param.default is inspect.Parameter.empty
        if kwargs.get("action") == "store_true" and param.default is not False:
            raise TypeError(f"parameter {name!r}: a flag must default to False")
        kwargs.update(dest=name, help=helps.get(name))
        if name in command.one_of:
            (group or parser).add_argument(option, **kwargs)
        else:
            if kwargs.get("action") != "store_true":
                kwargs["default"] = None if required else param.default
            parser.add_argument(option, required=required, **kwargs)
    return parser
