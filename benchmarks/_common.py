"""Shared by the benchmarks: SmolLM2 with N attention layers dropped, chosen by cosine importance."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

C4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "c4_demo.jsonl"


def attention_drop(model, tokenizer, num: int, calib_windows: int = 8, seq_len: int = 256) -> tuple[list[int], str]:
    """Attention layers to drop: lowest cosine importance when `lightning_drop.scoring.importance` is there and the
    C4 sample exists, else the deepest `num` layers. Returns (indices, how they were chosen)."""
    sets, how = importance_drops(model, tokenizer, num, ("attn",), calib_windows, seq_len)
    return sets["attn"][0], how


def importance_drops(model, tokenizer, num: int, targets=("attn", "mlp", "block"), calib_windows: int = 8,
                     seq_len: int = 256) -> tuple[dict[str, tuple[list[int], list[int]]], str]:
    """{target: (attention indices, MLP indices)} of `num` modules to drop per target, from one cosine scoring
    pass on C4 when `lightning_drop.scoring.importance` and the sample are there, else the deepest `num` layers.
    Returns (sets, how they were chosen)."""
    n = model.config.num_hidden_layers
    deepest = list(range(n - num, n))

    def fallback(why: str) -> tuple[dict[str, tuple[list[int], list[int]]], str]:
        kinds = {"attn": (deepest, []), "mlp": ([], deepest), "block": (deepest, deepest)}
        return {t: kinds[t] for t in targets}, f"deepest ({why})"

    try:
        from lightning_drop.scoring.importance import compute_importance
        from lightning_drop.scoring.selection import select_modules
    except ImportError:
        return fallback("lightning_drop.scoring.importance not available")
    if not C4.is_file():
        return fallback(f"{C4} not found")
    from lightning_drop.io.text_data import load_documents, make_windows

    windows = make_windows(tokenizer, load_documents(C4), seq_len, calib_windows)
    scores = compute_importance(model, list(windows.split(2)), metric="cosine")
    return ({t: select_modules(scores, t, num) for t in targets},
            f"cosine importance on {calib_windows} x {seq_len} C4 tokens")


def ref_logprobs(model, ids: list[int]):
    """Next-token log-probabilities [len(ids), vocab] in float64, the reference engines are compared with."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation without stopping at EOS (as the engine side does)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def machine_label(extra: str = "") -> str:
    """What a printed timing ran on: CPU count, torch threads and the load, which move timings most."""
    import torch

    label = (f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
             f"load avg {os.getloadavg()[0]:.1f}")
    return f"{label}, {extra}" if extra else label


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """The benchmark's result as JSON at `path` (when one was given)."""
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


def add_engine_args(p: Any) -> None:
    """The options every engine check shares (llama.cpp, vLLM): what runs, the held-out text, the workload."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-docs", type=int, default=4, help="held-out C4 docs (the last ones of the file)")
    p.add_argument("--eval-tokens", type=int, default=256)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", default=None, help="write the results here")
