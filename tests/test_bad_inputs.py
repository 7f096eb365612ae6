"""A table of bad inputs through the command line: each must fail with one line, no traceback, nothing changed.

Every case runs the real entry point (`lightning_drop.cli.main`) in process; the whole temporary folder (the
inputs and the would-be outputs) is fingerprinted before and after, so a case that wrote, moved or deleted
anything fails.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from lightning_drop.cli import main
from lightning_drop.io.tiny_models import tiny_model

ERROR_LINE = "error: "


def _fingerprint(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _copy_model(world: Path, name: str, tmp: Path) -> Path:
    import shutil

    dst = tmp / name
    shutil.copytree(world / "model", dst)
    return dst


def _corrupt_safetensors(world: Path, tmp: Path) -> Path:
    d = _copy_model(world, "corrupt", tmp)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return d


def _bin_only(world: Path, tmp: Path) -> Path:
    d = _copy_model(world, "binonly", tmp)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


def _bad_config(world: Path, tmp: Path) -> Path:
    d = _copy_model(world, "badjson", tmp)
    (d / "config.json").write_text('{"model_type": "llama", ')
    return d


def _big_vocab_tokenizer(world: Path, tmp: Path) -> Path:
    """A model whose embedding is smaller than its tokenizer's vocabulary."""
    import lightning_drop as ld

    model, tok = tiny_model("llama", vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    ld.save_dropped(model, tmp / "small-vocab", tok)
    return tmp / "small-vocab"


def _to_export(tmp: Path, family: str = "llama", attn: tuple[int, ...] = (), mlp: tuple[int, ...] = (),
               **overrides) -> Path:
    """A saved tiny model of a family / drop that `export --format nemotron-nas` must refuse."""
    import lightning_drop as ld
    from lightning_drop.core.modeling_dropped import apply_drop

    model, tok = tiny_model(family, **overrides)
    apply_drop(model, attn=list(attn), mlp=list(mlp))
    return ld.save_dropped(model, tmp / "to-export", tok)


def _export(src: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--model", str(src), "--format", "nemotron-nas", "--output", str(out), *extra]


D = "drop"
COMMON = ["--num-samples", "2", "--seq-len", "32", "--num", "1"]
# (id, argv from (world, tmp), substring the error line must contain)
CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("export-into-user-dir", lambda w, t: ["export", "--model", str(w / "model"), "--format", "nemotron-nas",
                                           "--output", str(w / "user")], "not empty"),
    ("export-onto-source", lambda w, t: ["export", "--model", str(w / "model"), "--format", "nemotron-nas",
                                         "--output", str(w / "model"), "--overwrite"], "is the input"),
    ("export-around-source", lambda w, t: ["export", "--model", str(w / "model"), "--format", "gguf",
                                           "--output", str(w), "--overwrite"], "contains the input"),
    ("export-non-llama-family", lambda w, t: _export(_to_export(t, "qwen3"), t / "o"), "Llama-family"),
    ("export-sliding-window", lambda w, t: _export(_to_export(t, "mistral"), t / "o"), "sliding window"),
    ("export-non-silu-mlp", lambda w, t: _export(_to_export(t, hidden_act="gelu"), t / "o"), "hidden_act"),
    ("export-no-attention-left", lambda w, t: _export(_to_export(t, attn=(0, 1, 2, 3)), t / "o"),
     "every attention layer"),
    ("export-starts-with-mlp", lambda w, t: _export(_to_export(t, attn=(0,)), t / "o"), "starts with an MLP"),
    ("export-q8-nemotron", lambda w, t: _export(w / "model", t / "o", "--dtype", "q8_0"), "q8_0"),
    ("drop-into-user-dir", lambda w, t: [D, "--model", str(w / "model"), "--calibration", str(w / "c4.jsonl"),
                                         *COMMON, "--output", str(w / "user")], "not empty"),
    ("drop-unwritable", lambda w, t: [D, "--model", str(w / "model"), "--calibration", str(w / "c4.jsonl"),
                                      *COMMON, "--output", str(w / "results.json" / "out")], "not a directory"),
    ("eval-output-is-dir", lambda w, t: ["eval", "--model", str(w / "model"), "--tasks", "hellaswag_sample",
                                         "--output", str(w / "user")], "is a directory"),
    ("perplexity-output-exists", lambda w, t: ["perplexity", "--model", str(w / "model"), "--data",
                                               str(w / "c4.jsonl"), "--output", str(w / "results.json")],
     "already exists"),
    ("speed-ideal-without-baseline", lambda w, t: ["speed", "--model", str(w / "model"), "--ideal"], "--baseline"),
    ("speed-empty-prompt-lens", lambda w, t: ["speed", "--model", str(w / "model"), "--prompt-lens", ""],
     "at least one length"),
    ("speed-unparsable-prompt-lens", lambda w, t: ["speed", "--model", str(w / "model"), "--prompt-lens", "128,1k"],
     "'1k' is not an integer"),
    ("speed-zero-prompt-len", lambda w, t: ["speed", "--model", str(w / "model"), "--prompt-lens", "0,8"], ">= 1"),
    ("speed-negative-prompt-len", lambda w, t: ["speed", "--model", str(w / "model"), "--prompt-len", "-4"],
     "--prompt-len must be >= 1"),
    ("speed-zero-batch", lambda w, t: ["speed", "--model", str(w / "model"), "--batch-size", "0"],
     "--batch-size must be >= 1"),
    ("speed-unknown-preset", lambda w, t: ["speed", "--model", str(w / "model"), "--preset", "fast"],
     "unknown preset 'fast'"),
    ("speed-context-too-long", lambda w, t: ["speed", "--model", str(w / "model"), "--baseline", "tiny-llama",
                                             "--prompt-lens", "128,500", "--gen-len", "32"],
     "max_position_embeddings (512)"),
    ("perplexity-zero-windows", lambda w, t: ["perplexity", "--model", str(w / "model"), "--data",
                                              str(w / "c4.jsonl"), "--num-windows", "0"], "--num-windows"),
    ("perplexity-nan", lambda w, t: ["perplexity", "--model", str(w / "nan-model"), "--data", str(w / "c4.jsonl"),
                                     "--seq-len", "32", "--num-windows", "2"], "not finite"),
    ("perplexity-missing-field", lambda w, t: ["perplexity", "--model", str(w / "model"), "--data",
                                               str(w / "notext.jsonl")], "no field 'text'"),
    ("perplexity-not-utf8", lambda w, t: ["perplexity", "--model", str(w / "model"), "--data",
                                          str(w / "latin1.txt")], "latin1.txt"),
    ("drop-keep-everything", lambda w, t: [D, "--model", str(w / "model"), "--calibration", str(w / "c4.jsonl"),
                                           *COMMON, "--keep", "0,1,2,3", "--output", str(t / "o")],
     "protects every"),
    ("drop-corrupt-safetensors", lambda w, t: [D, "--model", str(_corrupt_safetensors(w, t)), "--calibration",
                                               str(w / "c4.jsonl"), *COMMON, "--output", str(t / "o")],
     "model.safetensors"),
    ("eval-corrupt-safetensors", lambda w, t: ["eval", "--model", str(_corrupt_safetensors(w, t)), "--data",
                                               f"hellaswag_sample={w / 'hs.jsonl'}"], "model.safetensors"),
    ("speed-corrupt-safetensors", lambda w, t: ["speed", "--model", str(_corrupt_safetensors(w, t)),
                                                "--repeats", "1"], "model.safetensors"),
    ("drop-stream-corrupt", lambda w, t: [D, "--model", str(_corrupt_safetensors(w, t)), "--stream",
                                          "--calibration", str(w / "c4.jsonl"), *COMMON, "--output", str(t / "o")],
     "model.safetensors"),
    ("drop-cuda-on-cpu", lambda w, t: [D, "--model", str(w / "model"), "--stream", "--device", "cuda",
                                       "--calibration", str(w / "c4.jsonl"), *COMMON, "--output", str(t / "o")],
     "cuda"),
    ("eval-record-without-label", lambda w, t: ["eval", "--model", str(w / "model"), "--data",
                                                f"hellaswag_sample={w / 'hs_nolabel.jsonl'}"], "label"),
    ("bin-only-checkpoint", lambda w, t: ["perplexity", "--model", str(_bin_only(w, t)), "--data",
                                          str(w / "c4.jsonl")], "pytorch_model.bin"),
    ("invalid-config-json", lambda w, t: ["perplexity", "--model", str(_bad_config(w, t)), "--data",
                                          str(w / "c4.jsonl")], "config.json"),
    ("drop-not-utf8", lambda w, t: [D, "--model", str(w / "model"), "--calibration", str(w / "latin1.txt"),
                                    *COMMON, "--output", str(t / "o")], "latin1.txt"),
    ("drop-empty-calibration", lambda w, t: [D, "--model", str(w / "model"), "--calibration",
                                             str(w / "empty.jsonl"), *COMMON, "--output", str(t / "o")],
     "empty.jsonl"),
    ("unknown-tokenizer", lambda w, t: [D, "--model", str(w / "model"), "--tokenizer", str(t / "no-such-tok"),
                                        "--calibration", str(w / "c4.jsonl"), *COMMON, "--output", str(t / "o")],
     "no-such-tok"),
    ("tokenizer-larger-than-embedding", lambda w, t: [D, "--model", str(_big_vocab_tokenizer(w, t)), "--stream",
                                                      "--calibration", str(w / "c4.jsonl"), *COMMON,
                                                      "--output", str(t / "o")], "vocabulary"),
]


@pytest.mark.parametrize("name,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, capsys, name, argv, expect):
    _fails_in_one_line(world, tmp_path, capsys, argv(world, tmp_path), expect)  # argv may build a broken input


def test_eval_limit_above_a_tasks_documents(world, tmp_path, capsys, monkeypatch):
    """lm-eval would silently score 3 documents for --limit 4: refused by name and size before any scoring."""
    import lm_eval

    def scoring(*args, **kwargs):
        raise AssertionError("lm-eval started scoring before the limit was checked")

    monkeypatch.setattr(lm_eval, "simple_evaluate", scoring)
    argv = ["eval", "--model", str(world / "model"), "--data", f"hellaswag_sample={world / 'hs.jsonl'}",
            "--limit", "4", "--output", str(tmp_path / "res.json")]
    _fails_in_one_line(world, tmp_path, capsys, argv, "limit 4 is more than the 3 documents of task hellaswag_sample")


def _fails_in_one_line(world: Path, tmp_path: Path, capsys, args: list[str], expect: str) -> None:
    before_world, before_tmp = _fingerprint(world), _fingerprint(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ERROR_LINE in line]
    assert code != 0, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    assert errors[0].startswith(f"lightning-drop {args[0]}: error: "), errors[0]
    assert expect in errors[0], errors[0]
    assert _fingerprint(world) == before_world
    assert _fingerprint(tmp_path) == before_tmp


FIT = ["fit", "--model.model", "tiny-llama", "--data.tokenizer", "tiny-llama", "--data.seq_len", "32",
       "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
       "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
LAYER_DROP = ["--trainer.callbacks+=lightning_drop.callbacks.LayerDrop", "--trainer.callbacks.num"]
FIT_CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("layerdrop-num-too-large", lambda w, t: [*FIT, "--data.source", str(w / "c4.jsonl"), *LAYER_DROP, "9"],
     "at most"),
    ("empty-calibration-data", lambda w, t: [*FIT, "--data.source", str(w / "empty.jsonl")], "empty.jsonl"),
    ("corrupt-model", lambda w, t: [*FIT[:1], "--model.model", str(_corrupt_safetensors(w, t)), *FIT[3:],
                                    "--data.source", str(w / "c4.jsonl")], "model.safetensors"),
    ("missing-ckpt-path", lambda w, t: [*FIT, "--data.source", str(w / "c4.jsonl"), "--ckpt_path",
                                        str(t / "nope.ckpt")], "nope.ckpt"),
    ("garbage-ckpt-path", lambda w, t: [*FIT, "--data.source", str(w / "c4.jsonl"), "--ckpt_path",
                                        str(w / "results.json")], "results.json"),
]


@pytest.mark.parametrize("name,argv,expect", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_errors_are_one_line_after_the_usage(world, tmp_path, name, argv, expect):
    """In a subprocess, as a user runs it (Lightning's log handlers outlive an in-process run's stderr)."""
    args = argv(world, tmp_path)
    before_world, before_tmp = _fingerprint(world), _fingerprint(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lightning_drop.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    err = proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0, err
    assert "Traceback" not in err
    assert lines[-1].startswith("lightning-drop fit: error: ") and expect in lines[-1], err
    assert lines[-2].startswith("usage: lightning-drop fit"), err
    assert _fingerprint(world) == before_world
    assert _fingerprint(tmp_path) == before_tmp
