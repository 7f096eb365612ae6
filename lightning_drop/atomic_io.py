"""Every file and directory the package writes goes through here.

Writes land in a temporary sibling that is renamed into place only when complete, so a crash, Ctrl-C or
SIGTERM never leaves a half-written checkpoint or report where a user's files were. This is the only module
that renames into place. The rules for a target, checked before any long work starts:
- a non-empty target is replaced only when the caller says so (`overwrite`);
- a target that is, or contains, one of the job's own inputs is refused;
- the place must be writable (probed with a real temporary entry, which also works for root and read-only
  file systems).
Temporaries carry the writer's pid in their name, so the next run can remove those a killed run left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError, param

_LIVE: set[Path] = set()
_LOCK = threading.Lock()
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[^.]*$")
#: temporaries without a pid (older versions) are left alone this long, in case their writer is still running
_LEGACY_GRACE_S = 600.0


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


def _temp_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove temporaries of `dest` left by writers that are no longer running; returns what was removed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for entry in dest.parent.iterdir():
        m = _TEMP.match(entry.name)
        if not m or m.group("name") != dest.name or entry in _LIVE:
            continue
        pid = m.group("pid")
        if pid is not None:
            stale = int(pid) != os.getpid() and not _pid_alive(int(pid))
        else:
            stale = time.time() - entry.lstat().st_mtime > _LEGACY_GRACE_S
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _track(path: Path) -> None:
    with _LOCK:
        _LIVE.add(path)


def _untrack(path: Path) -> None:
    with _LOCK:
        _LIVE.discard(path)


def cleanup_temporaries() -> None:
    """Remove every temporary this process still has open (called when the process is told to stop)."""
    with _LOCK:
        live = list(_LIVE)
        _LIVE.clear()
    for path in live:
        _remove(path)


def install_signal_cleanup() -> None:
    """Turn SIGTERM into a normal exit, so that the writers' cleanup runs as it does for Ctrl-C.

    Only the main thread may set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def _terminate(signum: int, frame: Any) -> None:
        cleanup_temporaries()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)


def _same_or_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def check_output(path: str | os.PathLike, *, kind: str = "dir", overwrite: bool = False,
                 sources: Iterable[str | os.PathLike | None] = (), option: str = "--output",
                 hint: str | None = None) -> Path:
    """Refuse a target that would destroy something, before any work starts; returns it as a Path.

    `kind` is "dir" (a checkpoint, a report folder) or "file". `sources` are the job's inputs (model directories,
    data files): the target may be neither one of them nor a folder holding one.
    """
    if kind not in ("dir", "file"):
        raise UserError(f"kind must be 'dir' or 'file', got {kind!r}")
    target = Path(path).expanduser()
    resolved = target.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        source = Path(src).expanduser().resolve()
        if _same_or_inside(source, resolved):
            what = "is" if source == resolved else "contains"
            raise UserError(f"{option} {target} {what} the input {src}: writing there would destroy it")
    if target.exists() or target.is_symlink():
        if kind == "dir" and not target.is_dir():
            raise UserError(f"{option} {target} exists and is not a directory")
        if kind == "file" and target.is_dir():
            raise UserError(f"{option} {target} is a directory; give a file path")
        non_empty = any(target.iterdir()) if kind == "dir" else True
        if non_empty and not overwrite:
            what = "already exists and is not empty" if kind == "dir" else "already exists"
            hint = hint or f"pass {param('overwrite', 'True')} to replace it"
            raise UserError(f"{option} {target} {what} ({hint})")
    _probe_writable(target, option)
    return target


def _probe_writable(target: Path, option: str) -> None:
    """Create and remove a temporary entry where the target's temporary will go."""
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise UserError(f"{option} {target}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".lightning-drop-probe-", dir=parent)
    except OSError as err:
        raise UserError(f"{option} {target} is not writable: {err.strerror or err}") from None
    os.rmdir(probe)


@contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `dest`; on success it replaces `dest`, on failure it vanishes.

    Whether `dest` may be replaced is the caller's decision (see `check_output`). A previous `dest` survives a
    failed rename.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "tmp"), dir=dest.parent))
    _track(tmp)
    try:
        yield tmp
        make_shareable(tmp)
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "old"), dir=dest.parent))
            _track(old)
            try:
                os.replace(dest, old / "x")
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    os.replace(old / "x", dest)  # put the previous one back
                    raise
            finally:
                _remove(old)
                _untrack(old)
        else:
            os.replace(tmp, dest)
    finally:
        _untrack(tmp)
        if tmp.exists():
            _remove(tmp)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (for writers that take a file name); renamed into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    _track(tmp)
    try:
        yield tmp
        make_shareable(tmp)
        os.replace(tmp, path)
    finally:
        _untrack(tmp)
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically, with ordinary permissions."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomic, indented, key-sorted JSON (values JSON cannot hold are written as strings)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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
