"""Writers never destroy what they did not write, clean up after themselves, and write ordinary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightning_drop.io import atomic_io

from lightning_drop.io.atomic_io import atomic_dir, atomic_write_text, remove_stale_temporaries, write_json
from lightning_drop.io.output_targets import check_output
from lightning_drop.errors import UserError


def test_check_output_refuses_non_empty_targets_and_sources(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        check_output(user)
    assert check_output(user, overwrite=True) == user
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is the input"):
        check_output(src, overwrite=True, sources=[src])
    with pytest.raises(UserError, match="contains the input"):
        check_output(tmp_path, overwrite=True, sources=[src])
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        check_output(tmp_path / "r.json", kind="file")
    with pytest.raises(UserError, match="is a directory"):
        check_output(user, kind="file", overwrite=True)
    with pytest.raises(UserError, match="not a directory"):
        check_output(tmp_path / "r.json" / "out")
    assert (user / "notes.txt").read_text() == "mine"


def test_unwritable_place_is_refused_before_work():
    with pytest.raises(UserError, match="not writable|not a directory"):
        check_output("/proc/lightning-drop-out")


def test_save_dropped_never_wipes_a_users_folder_or_its_source(tmp_path):
    import lightning_drop as ld
    from lightning_drop.io.tiny_models import tiny_model

    model, tok = tiny_model("llama")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="overwrite=True"):
        ld.save_dropped(model, user, tok)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    src = ld.save_dropped(model, tmp_path / "src", tok)
    loaded, _ = ld.load_model(str(src))
    with pytest.raises(UserError, match="is the input"):
        ld.save_dropped(loaded, src, tok, overwrite=True)
    assert (src / "config.json").is_file()


def _killed_writer(dest: Path, *, swap: bool = False) -> None:
    """A writer killed (SIGKILL: no clean-up runs) while it writes `dest`, or, with `swap`, after it parked the
    previous `dest` and before the new one took its place."""
    body = ("os.replace(dest, atomic_io._new_temporary(dest, 'old') / 'x')" if swap else
            "(tmp / 'big.bin').write_bytes(b'x' * 1000)")
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from lightning_drop.io import atomic_io
        dest = Path({str(dest)!r})
        with atomic_io.atomic_dir(dest) as tmp:
            {body}
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    """Only what this package provably wrote (its marker inside) is removed: a user's entries with look-alike
    names, and unmarked temporaries of older versions, stay."""
    dest = tmp_path / "ckpt"
    _killed_writer(dest)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert len(stale) == 1 and (stale[0] / "ckpt" / "big.bin").is_file()
    dead = stale[0].name.split("-")[1]
    users = [tmp_path / ".ckpt.old-backup", tmp_path / f".ckpt.tmp-{dead}-abc", tmp_path / ".ckpt.tmp-x"]
    users[0].mkdir()
    (users[0] / "weights.bin").write_text("mine")
    users[1].mkdir()
    (users[1] / atomic_io.MARKER).write_text("not the marker of this folder")
    users[2].write_text("mine too")
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-abc"  # a running process's temporary stays
    live.mkdir()
    (live / atomic_io.MARKER).write_text(atomic_io._marker_text(live))
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("a")
    assert not stale[0].exists() and live.exists() and all(p.exists() for p in users)
    assert (users[0] / "weights.bin").read_text() == "mine" and users[2].read_text() == "mine too"
    assert (dest / "a.txt").read_text() == "a"
    assert remove_stale_temporaries(dest) == []


def test_a_previous_target_parked_by_a_killed_writer_comes_back(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    _killed_writer(dest, swap=True)
    assert not dest.exists()
    assert len(remove_stale_temporaries(dest)) == 2  # its new checkpoint and the parked old one
    assert (dest / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_targets_inside_an_input_empty_or_above_the_working_directory_are_refused(tmp_path, monkeypatch):
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_text("weights")
    with pytest.raises(UserError, match="is inside the input"):
        check_output(src / "model.safetensors", kind="file", overwrite=True, sources=[src])
    with pytest.raises(UserError, match="is inside the input"):
        check_output(src / "new", overwrite=True, sources=[src])
    with pytest.raises(UserError, match="is empty"):
        check_output("", overwrite=True)
    monkeypatch.chdir(src)
    for path in (".", "..", str(tmp_path)):
        with pytest.raises(UserError, match="working directory"):
            check_output(path, overwrite=True)
    assert (src / "model.safetensors").read_text() == "weights"


def test_a_symlinked_target_is_followed_and_the_link_stays(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert check_output(link, overwrite=True) == real
    with atomic_dir(link) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and [p.name for p in real.iterdir()] == ["new.txt"]
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="which does not exist"):
        check_output(tmp_path / "gone")


def test_sigterm_during_a_write_removes_the_temporary(tmp_path):
    """A killed run leaves no hidden temporary behind (the old checkpoint, if any, stays)."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "old.txt").write_text("old")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from lightning_drop.io.atomic_io import atomic_dir, install_signal_cleanup
        install_signal_cleanup()
        with atomic_dir(Path({str(tmp_path / 'ckpt')!r})) as tmp:
            (tmp / "big.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "old.txt").read_text() == "old"


def test_ctrl_c_in_the_cli_prints_one_line_and_cleans_up(tmp_path, c4_path):
    """SIGINT while the drop command calibrates: 'interrupted', exit 130, nothing left in the output's folder."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lightning_drop.cli", "drop", "--model", "tiny-llama",
                             "--calibration", str(c4_path), "--num-samples", "256", "--seq-len", "512",
                             "--batch-size", "1", "--num", "3", "--schedule", "iterative", "--output", str(out)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            # a job started in the background of a shell inherits SIGINT ignored (and Python then
                            # never raises KeyboardInterrupt); a user's terminal delivers it with the default action
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    deadline = time.monotonic() + 120
    while b"calibration:" not in seen and time.monotonic() < deadline:  # interrupt while it calibrates
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    proc.send_signal(signal.SIGINT)
    err = (seen + proc.communicate(timeout=60)[1]).decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "lightning-drop drop: interrupted"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        write_json(tmp_path / "results.json", {"a": 1})
        from lightning_drop.io.atomic_io import save_figure
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        save_figure(plt.figure(), tmp_path / "f.png")
    finally:
        os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == \
        {"report.md": 0o644, "results.json": 0o644, "f.png": 0o644}
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
