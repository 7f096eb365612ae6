"""Named extension points: the shipped choices by name, a user's own as a callable or an importable name.

Importance metrics, drop schedules and selection rules are each one `Registry`. A value given where one of
them is expected may be a registered name (`"cosine"`), a callable (Python), or a dotted name
(`"my_package.metrics.dot"`, which a YAML `metric:` or `schedule:` can hold) that imports to a callable.
A callable's signature is checked the moment it is registered or resolved, so a wrong one is a one-line
error before any model work rather than a traceback in the middle of a calibration pass.

Torch-free (the command line's `--help` reads the shipped names through `options`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from ..errors import UserError

T = TypeVar("T")


def check_arity(fn: Callable[..., Any], arity: int, what: str) -> None:
    """Refuse `fn` unless it can be called with exactly `arity` positional arguments."""
    if not callable(fn):
        raise UserError(f"{what} must be callable, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a readable signature: trusted as given
    try:
        signature.bind(*range(arity))
    except TypeError:
        raise UserError(f"{what} {getattr(fn, '__name__', fn)!s}{signature} must take {arity} positional "
                        f"argument{'s' if arity != 1 else ''}") from None


def import_dotted(name: str, what: str) -> Any:
    """The object a dotted name (`package.module.attribute`) names; one line when it does not import."""
    module, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"{what} '{name}' does not import: {err}") from None


class Registry(Generic[T]):
    """Name -> entry, where an entry is built from a callable by `make` (which also validates it).

    `what` names the kind of entry in messages ("metric", "schedule", ...).
    """

    def __init__(self, what: str, make: Callable[[str, Any], T]) -> None:
        self.what = what
        self._make = make
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: Any) -> T:
        """Add (or replace) `name`; `value` is validated now. Returns the entry."""
        if not isinstance(name, str) or not name or "." in name:
            raise UserError(f"a {self.what} name must be a non-empty string without dots, got {name!r}")
        entry = self._make(name, value)
        self._entries[name] = entry
        return entry

    def resolve(self, value: Any) -> T:
        """The entry for a registered name, a dotted importable name or a callable (validated)."""
        if isinstance(value, str):
            if value in self._entries:
                return self._entries[value]
            if "." not in value:
                raise UserError(f"unknown {self.what} '{value}'; choose from {', '.join(self._entries)} "
                                f"or give an importable name (package.module.function)")
            return self._make(value, import_dotted(value, self.what))
        name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return self._make(name.lstrip("."), value)  # `make` returns an entry given as such unchanged

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
