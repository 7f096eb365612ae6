"""Every file and directory the package writes goes through here.

Writes land in a temporary sibling that is renamed into place only when complete, so a crash, Ctrl-C or
SIGTERM never leaves a half-written checkpoint or report where a user's files were. This is the only module
that renames into place. The rules for a target, checked before any long work starts:
- a non-empty target is replaced only when the caller says so (`overwrite`);
- a target that is, contains, or lies inside one of the job's own inputs is refused, and so are an empty path
  and the working directory or a folder above it;
- a symbolic link is followed: the result goes where it points, and the link stays;
- the place must be writable (probed with a real temporary entry, which also works for root and read-only
  file systems);
- inside a command-line run (`lock_targets`), the target is locked until the run ends, so a second run
  writing the same place is refused at its start instead of silently replacing (or being replaced by) the first.
A temporary is a hidden sibling folder that holds a marker naming it: the next write to the same target removes
those whose writer has died, and never anything without that marker (a user's `.out.old-backup` is not ours).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping

from ..errors import UserError, input_file, param

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


# ------------------------------------------------------------------------------------------------ locking
_HELD: dict[str, tuple[int, Path]] | None = None  # resolved target -> (fd, lock file); None: no run open


def lock_targets() -> None:
    """Start a run: every target `check_output` accepts from now on stays locked (see `_lock`) until
    `release_targets`."""
    global _HELD
    if _HELD is None:
        _HELD = {}


def release_targets() -> None:
    """End the run `lock_targets` started: its targets are free for other runs again."""
    global _HELD
    held, _HELD = _HELD or {}, None
    for fd, path in held.values():
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"lightning-drop-locks-{os.getuid() if hasattr(os, 'getuid') else 0}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _lock(resolved: Path, option: str, target: Path) -> None:
    """Hold an exclusive lock named by the target's real path, or refuse: another run is writing there.

    The lock files live in the temporary directory (not beside the target: nothing of the user's folder changes)
    and are removed on release; a run that dies releases its locks with its file descriptors.
    Only global rank zero locks: the other ranks of a distributed run check the same targets but never write.
    """
    try:
        import fcntl
    except ImportError:  # no flock here: the check at the start is all there is
        return
    key = str(resolved)
    if _HELD is None or key in _HELD or os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", "0") != "0":
        return
    path = _lock_dir() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").split()[:1]
            os.close(fd)
            who = f" (pid {holder[0]})" if holder else ""
            raise UserError(f"{option} {target} is being written by another lightning-drop run{who}; "
                            f"wait for it to finish or choose another path") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its holder removed while we waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {key}\n".encode())
    _HELD[key] = (fd, path)


def _same_or_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def _follow(path: Path) -> Path:
    """Where a symbolic link at `path` points (the link itself is the user's and stays); `path` otherwise."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output(path: str | os.PathLike, *, kind: str = "dir", overwrite: bool = False,
                 sources: Iterable[str | os.PathLike | None] = (), option: str = "--output",
                 hint: str | None = None) -> Path:
    """Refuse a target that would destroy something, before any work starts; returns it as a Path.

    `kind` is "dir" (a checkpoint, a report folder) or "file". `sources` are the job's inputs (model directories,
    data files): the target may be none of them, no folder holding one, and no place inside one. After
    `lock_targets` the accepted target stays locked until `release_targets`.
    """
    if kind not in ("dir", "file"):
        raise UserError(f"kind must be 'dir' or 'file', got {kind!r}")
    if not str(path).strip():
        raise UserError(f"{option} is empty: give the path to write")
    given = Path(path).expanduser()
    if given.is_symlink() and not given.exists():
        raise UserError(f"{option} {given} is a symbolic link to {os.readlink(given)}, which does not exist")
    target = _follow(given)
    resolved = target.resolve()
    if _same_or_inside(Path(os.path.realpath(os.curdir)), resolved):
        raise UserError(f"{option} {given} is the working directory or a folder above it; give a new path")
    for src in sources:
        if src is None or not str(src).strip() or not Path(src).expanduser().exists():
            continue
        source = Path(src).expanduser().resolve()
        if _same_or_inside(source, resolved) or _same_or_inside(resolved, source):
            if _same_or_inside(source, resolved):
                what, harm = ("is" if source == resolved else "contains"), "destroy"
            else:
                what, harm = "is inside", "change"
            raise UserError(f"{option} {given} {what} the input {src}: writing there would {harm} it")
    _lock(resolved, option, given)
    if target.exists():
        if kind == "dir" and not target.is_dir():
            raise UserError(f"{option} {given} exists and is not a directory")
        if kind == "file" and target.is_dir():
            raise UserError(f"{option} {given} is a directory; give a file path")
        non_empty = any(target.iterdir()) if kind == "dir" else True
        if non_empty and not overwrite:
            what = "already exists and is not empty" if kind == "dir" else "already exists"
            hint = hint or f"pass {param('overwrite', 'True')} to replace it"
            raise UserError(f"{option} {given} {what} ({hint})")
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
    dest = _follow(Path(dest))
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

    Whether `dest` may be replaced is the caller's decision (see `check_output`). A previous `dest` survives a
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
