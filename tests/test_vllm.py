"""vLLM's CPU build (its own venv, `.venv-vllm`) runs the Nemotron-NAS exports of dropped SmolLM2-135M.

The tests that run vLLM are slow (every model load takes a minute or more on 2 CPUs) and skip, with the
install line, where `.venv-vllm` is absent, so `make test` on a fresh clone skips them;
`make setup-vllm && make test-engines` runs them. The benchmark's own drop choice and comparison are tested
without vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
SCRIPT = ROOT / "benchmarks" / "vllm_engine.py"
PROMPT = "The license grants you the right to"

sys.path.insert(0, str(SCRIPT.parent))


@pytest.fixture(scope="module")
def vllm_env() -> dict[str, str]:
    """The environment vLLM runs in (the benchmark's), or a skip that says how to install it."""
    if not VLLM_PY.is_file():
        pytest.skip(f"{VLLM_PY} absent: build it with `make setup-vllm`")
    from vllm_engine import engine_env

    env = engine_env()
    probe = subprocess.run([str(VLLM_PY), "-c", "import vllm"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        pytest.skip(f"vllm does not import in .venv-vllm ({probe.stderr.strip().splitlines()[-1:]}); "
                    f"rebuild it with `rm -rf .venv-vllm && make setup-vllm`")
    return env


@pytest.mark.slow
def test_vllm_matches_dropped_smollm2(vllm_env, tmp_path):
    """Prompt log-probs within 1e-3 of ours (fp32) and identical greedy output: base and four drops."""
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--check-only", "--eval-docs", "2", "--eval-tokens", "128",
                          "--work-dir", str(tmp_path), "--json", str(report)],
                         capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    drops = result["drops"]
    assert drops["attn"]["attn"] and not drops["attn"]["mlp"] and drops["mlp"]["mlp"] and not drops["mlp"]["attn"]
    assert drops["block"]["attn"] == drops["block"]["mlp"]
    mixed = drops["mixed"]
    assert set(mixed["attn"]) - set(mixed["mlp"]) and set(mixed["mlp"]) - set(mixed["attn"])
    assert set(mixed["attn"]) & set(mixed["mlp"])  # attention-only, MLP-only and empty layers in one model
    for name in ("base", "attn", "mlp", "block", "mixed"):
        r = result[name]
        print(name, "max |logprob diff| target", r["max_target_logprob_diff"], "top-k", r["max_logprob_diff"])
        assert r["logprobs_compared"] > 2 * 127
        assert r["max_target_logprob_diff"] < 1e-3 and r["max_logprob_diff"] < 1e-3
        assert r["greedy_agree"], r["greedy_text"]
    # fewer attention layers, more KV-cache blocks from the same VLLM_CPU_KVCACHE_SPACE
    assert result["attn"]["kv_blocks"] > result["base"]["kv_blocks"] == result["mlp"]["kv_blocks"]


def test_drop_sets_and_comparison(tmp_path):
    """The benchmark's own logic, without vLLM: `mixed` holds all three layer shapes, and the comparison
    finds the largest difference at the target token and over every token vLLM returned."""
    import numpy as np

    from lightning_drop.scoring.importance import ImportanceScores
    from vllm_engine import compare, drop_sets

    n = 12
    scores = ImportanceScores("cosine", attn=[0.5 - 0.01 * i for i in range(n)], mlp=[0.2 + 0.01 * i for i in range(n)],
                              block=[0.3 + 0.02 * ((5 * i) % n) for i in range(n)])
    sets = drop_sets(scores, n_attn=4, n_mlp=4, n_block=4)
    assert sets["base"] == ([], []) and sets["attn"] == ([8, 9, 10, 11], []) and sets["mlp"] == ([], [0, 1, 2, 3])
    assert sets["block"][0] == sets["block"][1] and len(sets["block"][0]) == 4
    attn, mlp = map(set, sets["mixed"])
    assert attn - mlp and mlp - attn and attn & mlp

    ref = np.log(np.full((3, 5), 0.2))
    np.save(tmp_path / "ref.npy", ref)
    ids = [0, 3, 4]
    engine = [[[[3, ref[0, 3] + 1e-4], [1, ref[0, 1] - 5e-4]]], [[[4, ref[1, 4] - 2e-4]]]]
    got = compare([str(tmp_path / "ref.npy")], [ids], [engine[0] + engine[1]])
    assert got["max_target_logprob_diff"] == pytest.approx(2e-4) and got["max_logprob_diff"] == pytest.approx(5e-4)
    assert got["logprobs_compared"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.strip() else {}


@pytest.mark.slow
def test_vllm_serve_completion_is_our_greedy_text(vllm_env, tmp_path):
    """`vllm serve` on the export answers an OpenAI completion request (temperature 0) with our greedy text."""
    import torch

    from lightning_drop.io.dropped_checkpoint import save_dropped
    from lightning_drop.core.modeling_dropped import apply_drop
    from lightning_drop.io.model_loading import load_model
    from _common import greedy

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    apply_drop(model, attn=[5, 6, 7, 20, 25, 26, 28, 29])  # the 8 lowest cosine scores on C4
    save_dropped(model, tmp_path / "dropped", tokenizer=tok)
    export = subprocess.run([sys.executable, "-m", "lightning_drop.cli", "export", "--model", str(tmp_path / "dropped"),
                             "--format", "nemotron-nas", "--output", str(tmp_path / "nas"), "--dtype", "f32"],
                            capture_output=True, text=True, timeout=1800)
    assert export.returncode == 0, export.stderr[-2000:]
    prompt = tok(PROMPT).input_ids
    ours = greedy(model, prompt, 32)

    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [str(VLLM_PY.parent / "vllm"), "serve", str(tmp_path / "nas"), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "dropped", "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
           "--trust-remote-code", "--no-enable-prefix-caching"]
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=vllm_env, cwd=tmp_path,
                                start_new_session=True)  # its own process group: the engine processes go with it
    try:
        deadline = time.monotonic() + 1200
        while True:
            assert proc.poll() is None, f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                _request(f"{base}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"vllm serve not up in 1200 s:\n{log.read_text()[-4000:]}"
                time.sleep(2)
        models = _request(f"{base}/v1/models")
        assert [m["id"] for m in models["data"]] == ["dropped"]
        answer = _request(f"{base}/v1/completions", {
            "model": "dropped", "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}, timeout=900)
        choice = answer["choices"][0]
        assert answer["usage"]["completion_tokens"] == 32
        assert choice["prompt_token_ids"] == prompt
        assert choice["token_ids"] == ours
        assert choice["text"] == tok.decode(ours, skip_special_tokens=True)
        print("vllm serve:", repr(choice["text"]))
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # engine processes that outlived the API server
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
