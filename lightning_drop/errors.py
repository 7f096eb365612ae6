"""The one exception type for mistakes in a user's input, and how a message names what the user should change.

The command line prints a `UserError` as one line and exits non-zero; any other exception is a bug and keeps its
traceback. It subclasses `ValueError` so that code catching bad values keeps working.

A message that tells the user which parameter to set names it with `param`: the same library code is called from
Python (`include_path=`) and from the command line (`--include-path`), and each reader must see their own
spelling. The command line declares its spellings with `command_line_options` while a job runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user (an option, a file, a config key): reported in one line, without a traceback."""


#: parameter name -> option spelling, while a command-line job runs (None: called from Python)
_OPTIONS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("lightning_drop_options",
                                                                                     default=None)


@contextlib.contextmanager
def command_line_options(options: Mapping[str, str]) -> Iterator[None]:
    """While inside, `param` spells parameters as these options (parameter -> `--option`)."""
    token = _OPTIONS.set(dict(options))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def param(name: str, value: str = "", cli_value: str = "") -> str:
    """How the user sets parameter `name` where they are: `--include-path` on the command line (followed by
    `cli_value` when given: `--preset paper`), `include_path=` in Python (followed by `value`: `preset='paper'`).

    On the command line a parameter the running command does not declare is spelled as its option would be.
    """
    options = _OPTIONS.get()
    if options is None:
        return f"{name}={value}"
    option = options.get(name, "--" + name.replace("_", "-"))
    return f"{option} {cli_value}" if cli_value else option


def input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """`path` as a regular file to read, or one line saying why not: reading a FIFO, a socket or a device would
    block or never end, so those are refused before they are opened."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {p}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {p} is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" \
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise UserError(f"{what} {p} is {kind}; give a regular file (reading it could block forever)")
    return p
