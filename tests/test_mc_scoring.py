"""`SharedContextLM` gives lm-eval's own log-likelihoods while running each context once."""

from __future__ import annotations

import functools

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from lightning_drop.mc_scoring import SharedContextLM
from lightning_drop.model_loading import load_model
from lightning_drop.modeling_dropped import apply_drop


def _requests(tok, n: int, data) -> list:
    import json

    reqs = []
    for line in data.read_text().splitlines()[:n]:
        rec = json.loads(line)
        ctx = tok(rec["ctx"]).input_ids
        reqs += [((rec["ctx"], " " + e), ctx, tok(" " + e).input_ids) for e in rec["endings"]]
    return reqs


@pytest.mark.parametrize("drop", [None, "attn", "mlp"])
def test_log_likelihoods_equal_hflm(shared_dir, drop):
    model, tok = load_model("tiny-llama")
    model.eval()
    if drop:
        apply_drop(model, attn=[0, 2] if drop == "attn" else [], mlp=[1] if drop == "mlp" else [])
    reqs = _requests(tok, 6, shared_dir / "data" / "hellaswag_val_first1000.jsonl")
    reqs.append((("", " alone"), [tok.eos_token_id or 0], tok(" alone").input_ids))  # a one-token context
    too_long = list(range(5, 5 + 300))
    reqs.append((("long", " tail"), too_long, [7, 8, 9]))  # beyond max_length: HFLM's own truncation
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", max_length=128)
    ours = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu", max_length=128)
    want = ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(got) == len(want) == len(reqs)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # the choices of one context differ, so a shared-context bug (wrong cache row, wrong offset) would show
    assert len({round(x, 3) for x, _ in got[:4]}) > 1


def test_the_context_runs_once_per_group(shared_dir, monkeypatch):
    model, tok = load_model("tiny-llama")
    model.eval()
    reqs = _requests(tok, 5, shared_dir / "data" / "hellaswag_val_first1000.jsonl")
    calls = []
    real = type(model).forward

    @functools.wraps(real)  # the same signature: the cache argument keeps its name
    def counting(self, input_ids=None, **kw):
        calls.append(tuple(input_ids.shape))
        return real(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", counting)
    lm = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    with torch.no_grad():
        lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    # per example: one forward of the context (batch 1), one of its 4 choices (batch 4)
    assert len(calls) == 10 and sorted(b for b, _ in calls) == [1] * 5 + [4] * 5
