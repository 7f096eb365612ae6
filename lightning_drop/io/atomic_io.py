"""Every file and directory the package writes goes through here.

Writes land in a temporary sibling that is renamed into place only when complete, so a crash, Ctrl-C or
SIGTERM never leaves a half-written checkpoint or report where a user's files were. This is the only module
that renames into place; whether a target may be written at all is `output_targets`' decision, taken before
any long work starts. A symbolic link at a target is followed: the result goes where it points, and the link
stays. A temporary is a hidden sibling folder that holds a marker naming it: the next write to the same target
removes those whose writer has died, and never anything without that marker (a user's `.out.old-backup` is
not ours).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping

from ..errors import UserError, input_file

_LIVE: dict[Path, Path] = {}  # temporary -> the target it belongs to
_LOCK = threading.Lock()
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]+$")
#: the file inside each temporary that proves this package made it; its text names the temporary
MARKER = ".lightning-drop-temporary"
#: errno values that mean the machine could not store the result (not that an input was missing)
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class Terminated(SystemExit):
    """SIGTERM, raised where the main thread is: the command line reports it as an interruption."""


class WriteFailed(UserError):
    """The machine could not store a result (disk full, quota, read-only): nothing was replaced."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(root: str | os.PathLike) -> None:
    """Give `root` (and what is below it) the modes a plain `open(..., "w")` / `mkdir` would: mkstemp and mkdtemp
    make 0600/0700 entries, which other users of a shared checkpoint could not read."""
    mask = _umask()
    root = Path(root)
    for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _marker_text(temporary: Path) -> str:
    return f"lightning-drop {temporary.name}\n"


def _new_temporary(dest: Path, kind: str) -> Path:
    """A marked, hidden folder next to `dest` (same file system, so the final rename is atomic)."""
    wrapper = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{kind}-{os.getpid()}-", dir=dest.parent))
    with _LOCK:
        _LIVE[wrapper] = dest
    (wrapper / MARKER).write_text(_marker_text(wrapper))
    return wrapper


def _ours(entry: Path) -> bool:
    marker = entry / MARKER
    try:
        return (entry.is_dir() and not entry.is_symlink() and marker.is_file() and not marker.is_symlink()
                and marker.read_text() == _marker_text(entry))
    except (OSError, UnicodeDecodeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard(wrapper: Path, dest: Path) -> None:
    """Remove a temporary; a previous target parked in an `old` one (the swap was cut short) goes back first."""
    m = _TEMP.match(wrapper.name)
    parked = wrapper / "x"
    if m and m.group("kind") == "old" and (parked.exists() or parked.is_symlink()) \
            and not (dest.exists() or dest.is_symlink()):
        os.replace(parked, dest)
    shutil.rmtree(wrapper, ignore_errors=True)
    with _LOCK:
        _LIVE.pop(wrapper, None)


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `dest` that this package made and whose writer is no longer running; returns
    what was removed. Entries without the marker are left alone, whatever their name."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for entry in dest.parent.iterdir():
        m = _TEMP.match(entry.name)
        if not m or m.group("name") != dest.name or entry in _LIVE:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not _pid_alive(pid) and _ours(entry):
            _discard(entry, dest)
            removed.append(entry)
    return removed


def cleanup_temporaries() -> None:
    """Remove every temporary this process still has open (called when the process is told to stop)."""
    with _LOCK:
        live = list(_LIVE.items())
    for wrapper, dest in live:
        _discard(wrapper, dest)


def install_signal_cleanup() -> None:
    """Turn SIGTERM into an exception (`Terminated`), so that the writers' cleanup runs as it does for Ctrl-C.

    Only the main thread may set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def _terminate(signum: int, frame: Any) -> None:
        cleanup_temporaries()
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)


def follow_link(path: Path) -> Path:
    """Where a symbolic link at `path` points (the link itself is the user's and stays); `path` otherwise."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _storage_failure(err: BaseException, wrapper: Path, dest: Path) -> WriteFailed | None:
    """`err` as one line naming the file being written, when it means the machine could not store it.

    safetensors reports a full disk as a `SafetensorError` (not an `OSError`) that names no file: the file
    is the newest one in the temporary, the one the writer was filling when the disk ran out.
    """
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        reason = err.strerror or str(err)
    elif type(err).__name__ == "SafetensorError" and "IoError" in str(err):
        m = re.search(r'message: "([^"]+)"', str(err))
        reason = m.group(1) if m else " ".join(str(err).split())
    else:
        return None
    files = [p for p in wrapper.rglob("*") if p.is_file() and p.name != MARKER]
    newest = max(files, key=lambda p: (p.stat().st_mtime_ns, p.stat().st_size), default=None)
    named = dest if newest is None else dest.parent / newest.relative_to(wrapper)  # the payload is named as dest
    return WriteFailed(f"could not write {named}: {reason}; nothing was replaced")


@contextmanager
def _writing(dest: Path) -> Iterator[Path]:
    """A marked temporary folder next to `dest` (removed at the end, whatever happens); storage failures of the
    writer become `WriteFailed`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    wrapper = _new_temporary(dest, "tmp")
    try:
        try:
            yield wrapper
        except Exception as err:
            failure = _storage_failure(err, wrapper, dest)
            if failure is None:
                raise
            raise failure from None
    finally:
        _discard(wrapper, dest)


@contextmanager
def _staged(dest: str | os.PathLike, make: Callable[[Path], None], install: Callable[[Path, Path], None]
            ) -> Iterator[Path]:
    """A temporary made by `make` next to `dest` (a symbolic link at `dest` is followed), given ordinary
    permissions and put in place by `install(tmp, dest)` on success; it vanishes on failure."""
    dest = follow_link(Path(dest))
    with _writing(dest) as wrapper:
        tmp = wrapper / dest.name
        make(tmp)
        yield tmp
        make_shareable(tmp)
        install(tmp, dest)


def _replace_keeping_previous(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`; a previous `dest` is parked in a marked temporary and put back if that fails."""
    if not (dest.exists() or dest.is_symlink()):
        os.replace(tmp, dest)
        return
    old = _new_temporary(dest, "old")
    try:
        os.replace(dest, old / "x")
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old / "x", dest)  # put the previous one back
            raise
    finally:
        _discard(old, dest)


def atomic_dir(dest: str | os.PathLike) -> ContextManager[Path]:
    """Yield a temporary directory next to `dest`; on success it replaces `dest`, on failure it vanishes.

    Whether `dest` may be replaced is the caller's decision (`output_targets.check_output`). A previous `dest` survives a
    failed rename. A symbolic link at `dest` is followed.
    """
    return _staged(dest, Path.mkdir, _replace_keeping_previous)


def atomic_file(path: str | os.PathLike) -> ContextManager[Path]:
    """Yield a temporary path next to `path` (for writers that take a file name; same name and suffix); renamed
    into place on success. A symbolic link at `path` is followed."""
    return _staged(path, Path.touch, os.replace)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically, with ordinary permissions."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomic, indented, key-sorted JSON (values JSON cannot hold are written as strings)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str, keys: Mapping[str, type | tuple[type, ...]] = {},
              option: str = "results file") -> Any:
    """A JSON object this package wrote (a results file, a cache entry, a manifest), read back; one line that names
    the file (as `option` gave it) and what is wrong when it is not valid JSON, not an object, or lacks one of
    `keys` of its type."""
    path = input_file(path, option)
    label = f"{option} {path}" if option.startswith("--") else str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{label} is not valid JSON ({err}); expected {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"{label} holds a JSON {type(data).__name__}, not an object; expected {what}")
    for key, kind in keys.items():
        if not isinstance(data.get(key), kind):
            found = "no" if key not in data else f"a {type(data[key]).__name__} as"
            raise UserError(f"{label} has {found} '{key}'; expected {what}")
    return data


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return path
