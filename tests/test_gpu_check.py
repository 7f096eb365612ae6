"""`scripts/gpu_check.py` (`make gpu-check`): its arguments, its plan through the real command line, and its
one-line stop without CUDA; on a CUDA machine, `eval --device cuda` scores as on the CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_drop.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop where no CUDA device is visible")
def test_without_cuda_it_stops_at_once_in_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    done = _run("--output", str(out), "--work", str(tmp_path / "work"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device"), done.stderr
    assert not out.exists() and not (tmp_path / "work").exists() and done.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--skip", "tests,nope"], "--skip: unknown step(s) nope; choose from tests, drop, speed, eval, sharded"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--limit", "many"], "argument --limit: invalid int value: 'many'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_end_in_one_error_line_before_anything_runs(tmp_path, args, message):
    done = _run("--output", str(tmp_path / "gpu.json"), *args)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(message), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "gpu.json"
    out.write_text("mine")
    done = _run("--output", str(out))
    assert done.returncode == 2 and "already exists (pass --overwrite to replace it)" in done.stderr
    assert out.read_text() == "mine"
    assert _script().parse_args(["--output", str(out), "--overwrite"]).overwrite


def test_the_plan_parses_with_the_real_command_line_and_honours_skip(tmp_path):
    gpu = _script()
    steps = gpu.plan(gpu.parse_args(["--output", str(tmp_path / "o.json")]), tmp_path)
    assert list(steps) == list(gpu.STEPS)
    assert steps["tests"] == [[sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]]
    parser = build_parser()
    for name in ("drop", "speed", "eval"):
        for cmd in steps[name]:
            assert cmd[:3] == [sys.executable, "-m", "lightning_drop.cli"] and cmd[3] == name
            parsed = parser.parse_args(cmd[3:])  # an option the command does not have fails here
            assert getattr(parsed, "device", None) == "cuda"
    speed = parser.parse_args(steps["speed"][0][3:])
    assert speed.preset == "paper" and speed.dtype == "bf16" and speed.baseline == "smollm2-135m"
    assert [c[c.index("--model") + 1] for c in steps["eval"]] == ["smollm2-135m", str(tmp_path / "attn8")]
    sharded = sorted((REPO / "configs" / "sharded").glob("*.yaml"))
    assert [c[c.index("--config") + 1] for c in steps["sharded"]] == [str(p) for p in sharded]
    fewer = gpu.plan(gpu.parse_args(["--output", str(tmp_path / "o.json"), "--skip", "tests,sharded"]), tmp_path)
    assert list(fewer) == ["drop", "speed", "eval"]


def test_a_failed_step_is_recorded_and_stops_its_own_commands(tmp_path):
    gpu = _script()
    ok = [sys.executable, "-c", "print('fine')"]
    bad = [sys.executable, "-c", "import sys; print('broken', file=sys.stderr); sys.exit(3)"]
    step = gpu.run_step([ok, bad, ok], limit=60)
    assert step["ok"] is False and [r["returncode"] for r in step["runs"]] == [0, 3]
    assert "broken" in step["runs"][1]["output_tail"]
    slow = gpu.run_step([[sys.executable, "-c", "import time; time.sleep(30)"]], limit=1)
    assert slow["runs"][0]["returncode"] == 124 and "timed out" in slow["runs"][0]["output_tail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is visible")
def test_eval_refuses_a_cuda_device_it_cannot_use_before_loading(tmp_path, capsys, monkeypatch):
    import lightning_drop.io.model_loading as model_loading

    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "res.json"
    assert main(["eval", "--model", "tiny-llama", "--tasks", "hellaswag", "--device", "cuda",
                 "--output", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--device cuda: " in err[0] and "use --device cpu" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_on_cuda_scores_as_on_the_cpu(tmp_path, shared_dir):
    data = shared_dir / "data" / "hellaswag_val_first1000.jsonl"
    res = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert main(["eval", "--model", "tiny-llama", "--data", f"hellaswag_sample={data}", "--limit", "20",
                     "--device", device, "--output", str(out)]) == 0
        res[device] = json.loads(out.read_text())
    assert res["cuda"]["n_samples"] == res["cpu"]["n_samples"] == {"hellaswag_sample": 20}
    # float32 on both: a question may flip where two endings tie to rounding, no more
    assert abs(res["cuda"]["scores"]["hellaswag_sample"] - res["cpu"]["scores"]["hellaswag_sample"]) <= 0.1
