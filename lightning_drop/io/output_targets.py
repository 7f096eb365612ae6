"""Where a job may write, decided before any long work starts (the writing itself is `atomic_io`'s):
- a non-empty target is replaced only when the caller says so (`overwrite`);
- a target that is, contains, or lies inside one of the job's own inputs is refused, and so are an empty path
  and the working directory or a folder above it;
- a symbolic link is followed: the result goes where it points, and the link stays;
- the place must be writable (probed with a real temporary entry, which also works for root and read-only
  file systems);
- inside a command-line run (`lock_targets`), the target is locked until the run ends, so a second run
  writing the same place is refused at its start instead of silently replacing (or being replaced by) the first.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import UserError, param
from .atomic_io import follow_link

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
    target = follow_link(given)
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
