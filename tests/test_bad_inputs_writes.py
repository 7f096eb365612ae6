"""Writing outputs through the command line: what a target may be, what a killed or concurrent run leaves, what a
full disk or a signal does. Each case asserts the exit status, the one line, and what is (not) on disk.

Uses the inputs (`world`) and the checks of `test_bad_inputs`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_bad_inputs import COMMON, D, ERROR_LINE, FIT, _fails_in_one_line, _fingerprint
from test_study import tiny_config

from lightning_drop.cli import main

DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _drop(w: Path, out: Path | str, *extra: str) -> list[str]:
    return [D, "--model", str(w / "model"), "--calibration", str(w / "c4.jsonl"), *COMMON, "--output", str(out),
            *extra]


def _copy_model(w: Path, tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(w / "model", tmp / "ck"))


# ----------------------------------------------------------------------------- targets refused before any work
TARGETS = [
    ("perplexity-into-its-model", lambda w, t: ["perplexity", "--model", str(_copy_model(w, t)), "--data",
                                                str(w / "c4.jsonl"), "--output", str(t / "ck" / "model.safetensors"),
                                                "--overwrite"], "is inside the input"),
    ("drop-into-its-model", lambda w, t: _drop(w, w / "model" / "dropped", "--overwrite"), "is inside the input"),
    ("export-into-its-model", lambda w, t: ["export", "--model", str(_copy_model(w, t)), "--format", "gguf",
                                            "--output", str(t / "ck" / "m.gguf")], "is inside the input"),
    ("drop-output-empty", lambda w, t: _drop(w, ""), "--output is empty"),
    ("eval-output-empty", lambda w, t: ["eval", "--model", str(w / "model"), "--data",
                                        f"hellaswag_sample={w / 'hs.jsonl'}", "--output", ""], "--output is empty"),
]


@pytest.mark.parametrize("name,argv,expect", TARGETS, ids=[c[0] for c in TARGETS])
def test_bad_target_is_one_line_and_changes_nothing(world, tmp_path, capsys, name, argv, expect):
    _fails_in_one_line(world, tmp_path, capsys, argv(world, tmp_path), expect)


def test_output_dot_is_the_working_directory(world, tmp_path, capsys, monkeypatch):
    """`--output .` would replace the folder the user is in: refused, also with --overwrite."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    _fails_in_one_line(world, tmp_path, capsys, _drop(world, ".", "--overwrite"), "working directory")


def test_a_dangling_symlink_output_is_refused(world, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    code = main(_drop(world, tmp_path / "link"))
    errors = [line for line in capsys.readouterr().err.splitlines() if ERROR_LINE in line]
    assert code == 2 and len(errors) == 1 and "link is a symbolic link to" in errors[0], errors
    assert "which does not exist" in errors[0]
    assert [p.name for p in tmp_path.iterdir()] == ["link"] and os.readlink(tmp_path / "link") == str(
        tmp_path / "nowhere")


def test_symlinked_output_is_followed_and_the_link_stays(world, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main(_drop(world, tmp_path / "link")) == 0
    assert (tmp_path / "link").is_symlink() and (real / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


# ----------------------------------------------------------------------------- temporaries of a killed run
def test_a_users_lookalike_entries_beside_the_target_survive(world, tmp_path, capsys):
    """`.out.old-backup` and `.out.tmp-x` are names a temporary could have, but this package did not write them."""
    backup, tmp_file = tmp_path / ".out.old-backup", tmp_path / ".out.tmp-x"
    backup.mkdir()
    (backup / "weights.bin").write_text("mine")
    tmp_file.write_text("mine too")
    hour_ago = time.time() - 3600
    for p in (backup, tmp_file):
        os.utime(p, (hour_ago, hour_ago))
    before = {k: v for k, v in _fingerprint(tmp_path).items() if k.startswith(".out.")}
    assert main(_drop(world, tmp_path / "out")) == 0
    after = _fingerprint(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith(".out.")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-backup", ".out.tmp-x", "out"]


# ----------------------------------------------------------------------------- study output folders
def _study_config(tmp: Path, c4: Path) -> Path:
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp / "unused", c4, speed={"enabled": False})))
    return path


def test_study_refuses_a_users_folder_with_a_cache_subfolder(world, tmp_path, capsys, c4_path):
    out = tmp_path / "mine"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "notes.txt").write_text("mine")
    (out / "results.json").write_text('{"mine": true}\n')
    (out / "report.md").write_text("# my report\n")
    config = _study_config(tmp_path, c4_path)
    _fails_in_one_line(world, tmp_path, capsys, ["study", "--config", str(config), "--output", str(out)],
                       "not the output of a lightning-drop study")


@pytest.mark.parametrize("entry", [[1, 2], {"attn": "x", "mlp": []}, {"mlp": []}])
def test_a_study_cache_entry_of_the_wrong_shape_is_one_line(world, tmp_path, capsys, c4_path, entry):
    from lightning_drop.jobs.study import CacheKeys, StudyConfig
    from lightning_drop.jobs.study.cache import MANIFEST, WRITTEN_BY

    config = _study_config(tmp_path, c4_path)
    cfg = StudyConfig.from_dict(yaml.safe_load(config.read_text()))
    sweep = cfg.sweeps[0]
    cache = tmp_path / "out" / "cache"
    cache.mkdir(parents=True)
    (cache / MANIFEST).write_text(json.dumps({"written_by": WRITTEN_BY, "cache_version": 1}))
    bad = cache / f"scores-{CacheKeys(cfg).scores(cfg.calibration_for(sweep), sweep.metric)}.json"
    bad.write_text(json.dumps(entry))
    _fails_in_one_line(world, tmp_path, capsys, ["study", "--config", str(config), "--output",
                                                 str(tmp_path / "out")], str(bad))


def test_a_results_file_of_the_wrong_shape_is_one_line(world, tmp_path, capsys):
    for i, content in enumerate(["[1, 2]", '{"average": "high"}', "{"]):
        results = tmp_path / f"eval{i}.json"
        results.write_text(content)
        _fails_in_one_line(world, tmp_path, capsys, ["speed", "--model", str(world / "model"), "--eval-results",
                                                     str(results), "--repeats", "1"], str(results))


@pytest.mark.parametrize("index", ["[1, 2]", '{"weight_map": {"lm_head.weight": 3}}'])
def test_a_shard_index_of_the_wrong_shape_is_one_line(world, tmp_path, capsys, index):
    ck = _copy_model(world, tmp_path)
    (ck / "model.safetensors.index.json").write_text(index)
    _fails_in_one_line(world, tmp_path, capsys, [D, "--model", str(ck), "--stream", "--calibration",
                                                 str(world / "c4.jsonl"), *COMMON, "--output", str(tmp_path / "o")],
                       str(ck / "model.safetensors.index.json"))


# ----------------------------------------------------------------------------- full disk
def _disk_full_after_half(state: dict, filename: str, **kwargs) -> None:
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 4096)  # the part that fitted
    raise SafetensorError(DISK_FULL)


def _fails_disk_full(world, tmp_path, capsys, argv: list[str]) -> str:
    before_world, before_tmp = _fingerprint(world), _fingerprint(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if ERROR_LINE in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"lightning-drop {argv[0]}: error: could not write {tmp_path / 'o'}"), errors[0]
    assert "model.safetensors: No space left on device" in errors[0], errors[0]
    assert _fingerprint(world) == before_world and _fingerprint(tmp_path) == before_tmp
    return out


def test_disk_full_during_drop_prints_the_drop_lists_and_writes_nothing(world, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _disk_full_after_half)
    out = _fails_disk_full(world, tmp_path, capsys, _drop(world, tmp_path / "o"))
    assert out.startswith("dropped attention [") and "not written" in out, out


def test_disk_full_during_streamed_drop(world, tmp_path, capsys, monkeypatch):
    import errno

    from lightning_drop.io import safetensors_io

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".safetensors") and "w" in mode:
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return f

    monkeypatch.setattr(safetensors_io, "open", full_open, raising=False)
    out = _fails_disk_full(world, tmp_path, capsys, _drop(world, tmp_path / "o", "--stream"))
    assert out.startswith("dropped attention [") and "not written" in out, out


def test_disk_full_during_export(world, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda state, filename, **kw: _disk_full_after_half(
        state, filename))
    _fails_disk_full(world, tmp_path, capsys, ["export", "--model", str(world / "model"), "--format",
                                               "nemotron-nas", "--output", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- signals and concurrent runs
def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lightning_drop.cli", *args], cwd=cwd, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            # a background job inherits SIGINT ignored; a terminal delivers it with the default
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, text: bytes, timeout: float = 240) -> bytes:
    """Read the run's stdout and stderr until `text` shows (the run is where the test wants it); what stderr said."""
    import select

    seen, err = b"", b""
    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout, proc.stderr], [], [], 1.0)
        for stream in ready:
            chunk = os.read(stream.fileno(), 4096)
            seen += chunk
            err += chunk if stream is proc.stderr else b""
        if proc.poll() is not None and not ready:
            break
    assert text in seen, seen.decode()
    return err


def _interrupted(proc: subprocess.Popen, seen: bytes, signum: int, command: str) -> None:
    proc.send_signal(signum)
    err = (seen + proc.communicate(timeout=180)[1]).decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"lightning-drop {command}: interrupted", err
    assert "Traceback" not in err


def test_a_second_run_on_the_same_output_is_refused_and_sigterm_is_interrupted(world, tmp_path, capsys, c4_path):
    """While one drop writes `out`, a second is refused in one line; SIGTERM then ends the first like Ctrl-C."""
    out = tmp_path / "out"
    first = _start(["drop", "--model", "tiny-llama", "--calibration", str(c4_path), "--num-samples", "256",
                    "--seq-len", "512", "--batch-size", "1", "--num", "3", "--schedule", "iterative",
                    "--output", str(out)], tmp_path)
    try:
        seen = _wait_for(first, b"calibration:")
        _fails_in_one_line(world, tmp_path, capsys, _drop(world, out, "--overwrite"),
                           f"{out} is being written by another lightning-drop run (pid {first.pid})")
        _interrupted(first, seen, signal.SIGTERM, "drop")
    finally:
        first.kill()
    assert list(tmp_path.iterdir()) == []
    assert main(_drop(world, out)) == 0  # the lock went with the run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_fit_interrupted_is_one_line_and_130(world, tmp_path, signum):
    args = [*FIT, "--data.source", str(world / "c4.jsonl"), "--trainer.max_steps", "100000"]
    proc = _start(args, tmp_path)
    try:
        seen = _wait_for(proc, b"Total params")  # the model summary: the trainer's fit has begun
        _interrupted(proc, seen, signum, "fit")
    finally:
        proc.kill()
