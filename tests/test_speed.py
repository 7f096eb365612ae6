"""Speed harness: counts, sizes, measured KV bytes, profiling, SDR, SpeedBenchmark. No timing assertions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_drop import apply_drop  # noqa: E402
from lightning_drop.callbacks.speed import SpeedBenchmark  # noqa: E402
from lightning_drop.measure.ideal_speedup import dropped_part_modules, profile_drop, realized_gain  # noqa: E402
from lightning_drop.io.model_loading import load_model  # noqa: E402
from lightning_drop.measure.memory import count_params, kv_cache_bytes_per_token, weight_bytes  # noqa: E402
from lightning_drop.measure.speed import compare_speed, measure_generation, sdr  # noqa: E402


def _tiny(family="llama", attn=(), mlp=()):
    model, tok = load_model(f"tiny-{family}")
    if attn or mlp:
        apply_drop(model, attn=list(attn), mlp=list(mlp))
    return model


def test_measure_generation_counts_and_positive_times():
    r = measure_generation(_tiny(), batch_size=2, prompt_len=10, gen_len=5, repeats=3, warmup=1)
    assert r["prefill_tokens"] == 20 and r["decode_tokens"] == 10
    assert r["prefill_s"] > 0 and r["decode_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert len(r["prefill_runs_s"]) == len(r["decode_runs_s"]) == 3
    assert r["params"] > 0 and r["weight_bytes"] >= 4 * r["params"] and r["kv_bytes_per_token"] > 0


@pytest.mark.parametrize("family,attn", [("llama", ()), ("llama", (0, 2)), ("gemma2", (1,))])
def test_timed_decode_generates_what_generate_does(family, attn):
    """The timed loop really decodes with its KV cache fed back: same greedy tokens as `generate`."""
    from lightning_drop.measure.memory import random_prompt
    from lightning_drop.measure.speed import generate_once

    model = _tiny(family, attn=attn).eval()
    ids = random_prompt(model, 2, 12)  # longer than gemma2's tiny sliding window (8)
    _, _, toks = generate_once(model, ids, gen_len=10)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(toks, ref[:, ids.shape[1]:])


def test_lockstep_generation_equals_separate_runs():
    """Interleaving two models step by step must not mix their caches: each generates what it does alone."""
    from lightning_drop.measure.memory import random_prompt
    from lightning_drop.measure.speed import generate_lockstep, generate_once

    base, dropped = _tiny("gemma2").eval(), _tiny("gemma2", attn=(0, 2)).eval()
    ids = random_prompt(base, 2, 12)
    runs = generate_lockstep({"base": base, "dropped": dropped}, ids, gen_len=8, flip=True)
    for name, m in (("base", base), ("dropped", dropped)):
        p, d, toks = runs[name]
        assert p > 0 and d > 0
        assert torch.equal(toks, generate_once(m, ids, gen_len=8)[2])
    assert not torch.equal(runs["base"][2], runs["dropped"][2])  # really two different models


def test_place_weights_alike_copies_storage_and_keeps_values_and_ties():
    from lightning_drop.measure.speed import place_weights_alike

    model = _tiny()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    x = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        ref = model(x).logits
    place_weights_alike(model)
    for n, p in model.named_parameters():
        assert p.data_ptr() != before[n][0] and torch.equal(p, before[n][1])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_measure_generation_validates_arguments():
    with pytest.raises(ValueError, match="gen_len"):
        measure_generation(_tiny(), gen_len=1)
    with pytest.raises(ValueError, match="repeats"):
        measure_generation(_tiny(), repeats=0)


def test_kv_bytes_of_base_match_the_config():
    model = _tiny()
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    expected = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4  # fp32 keys + values
    assert kv_cache_bytes_per_token(model) == expected


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma2"])
def test_kv_bytes_halve_when_half_the_attention_layers_go(family):
    base = _tiny(family)
    n = base.config.num_hidden_layers
    dropped = _tiny(family, attn=range(0, n, 2))  # layer 0 included
    kv_b, kv_d = kv_cache_bytes_per_token(base, prompt_len=6), kv_cache_bytes_per_token(dropped, prompt_len=6)
    assert kv_b > 0 and kv_d == kv_b / 2


def test_mlp_drop_keeps_kv_but_removes_weights():
    base, dropped = _tiny(), _tiny(mlp=[1, 2])
    assert kv_cache_bytes_per_token(dropped) == kv_cache_bytes_per_token(base)
    removed = sum(p.numel() for m in dropped_part_modules(base, mlp=[1, 2]) for p in m.parameters())
    assert count_params(base) - count_params(dropped) == removed > 0
    assert weight_bytes(base) - weight_bytes(dropped) == 4 * removed


def test_compare_speed_alternates_and_reports_ratios():
    base, dropped = _tiny(), _tiny(attn=[0, 2])
    r = compare_speed(base, dropped, batch_size=1, prompt_len=8, gen_len=4, repeats=3, warmup=1)
    for name in ("base", "dropped"):
        assert r[name]["decode_tokens"] == 4 and len(r[name]["decode_runs_s"]) == 3
    assert set(r["speedup"]) == {"prefill", "decode", "total"} and all(v > 0 for v in r["speedup"].values())
    # the speedup is the median of per-repeat ratios of side-by-side timings
    b, d = r["base"]["decode_runs_s"], r["dropped"]["decode_runs_s"]
    assert r["speedup_runs"]["decode"] == pytest.approx([x / y for x, y in zip(b, d)])
    assert r["speedup"]["decode"] == pytest.approx(sorted(r["speedup_runs"]["decode"])[1])
    assert r["setup"]["interleave"] == "step"
    assert compare_speed(base, dropped, prompt_len=8, gen_len=4, repeats=1, warmup=0,
                         interleave="run")["setup"]["interleave"] == "run"
    with pytest.raises(ValueError, match="interleave"):
        compare_speed(base, dropped, prompt_len=8, gen_len=4, interleave="token")
    assert r["kv_ratio"] == 0.5 and r["param_ratio"] < 1 and r["peak_rss_bytes"] > 0


def test_profile_drop_finds_time_in_dropped_parts():
    base = _tiny()
    assert len(dropped_part_modules(base, attn=[1], mlp=[2])) == 4  # two sublayers + their pre-norms
    prof = profile_drop(base, attn=[0, 1], batch_size=1, prompt_len=8, gen_len=4, repeats=1, warmup=0)
    for phase in ("prefill", "decode", "total"):
        assert 0 < prof[phase]["dropped_parts_s"] < prof[phase]["profiled_s"]  # parts inside the same run
        assert 0 < prof[phase]["dropped_share"] < 1
        assert prof[phase]["ideal_speedup"] == pytest.approx(1 / (1 - prof[phase]["dropped_share"]))
    with pytest.raises(ValueError, match="out of range"):
        dropped_part_modules(base, attn=[99])


def test_sdr_and_realized_gain():
    # -2.4 points of 73.9 for a 1.48x speedup (paper, Llama-2-70B): gamma = 3.25% / 48%
    assert sdr(73.9, 71.5, 1.48) == pytest.approx((2.4 / 73.9 * 100) / 48.0)
    assert sdr(50.0, 49.0, 1.0) is None
    assert realized_gain(1.18, 1.2) == pytest.approx(0.9)


class _Wrap(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.randint(0, 256, (2, 8)), batch_size=2)


def test_speed_benchmark_callback(tmp_path):
    with pytest.raises(ValueError, match="gen_len"):
        SpeedBenchmark(gen_len=1)
    with pytest.raises(ValueError, match="baseline"):
        SpeedBenchmark(ideal=True)
    cb = SpeedBenchmark(baseline="tiny-llama", batch_size=1, prompt_len=8, gen_len=4, repeats=1, warmup=0,
                        ideal=True, output=str(tmp_path / "speed.json"))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, callbacks=[cb], logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Wrap(_tiny(attn=[0, 2])))
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["kv_ratio"] == 0.5 and saved["ideal_speedup"] > 1 and "realized_gain" in saved
    assert cb.state_dict()["results"]["kv_ratio"] == 0.5
    logged = Path(trainer.logger.log_dir, "metrics.csv").read_text()
    assert "speed/speedup_total" in logged and "speed/kv_bytes_per_token" in logged


def test_speed_main_with_baseline_and_sdr(tmp_path):
    from lightning_drop.io.dropped_checkpoint import save_dropped
    from lightning_drop.jobs.speed import speed_main

    model, tok = load_model("tiny-llama")
    apply_drop(model, attn=[1, 3])
    save_dropped(model, out_dir=tmp_path / "dropped", tokenizer=tok)
    (tmp_path / "e.json").write_text(json.dumps({"average": 0.40}))
    (tmp_path / "b.json").write_text(json.dumps({"average": 0.50}))
    res = speed_main(str(tmp_path / "dropped"), baseline="tiny-llama", prompt_len=8, gen_len=3, repeats=1, warmup=0,
                     output=str(tmp_path / "s.json"), eval_results=str(tmp_path / "e.json"),
                     baseline_eval_results=str(tmp_path / "b.json"))
    assert res["kv_ratio"] == 0.5
    assert res["sdr"] == pytest.approx(20.0 / (100 * (res["speedup"]["total"] - 1)))
    assert json.loads((tmp_path / "s.json").read_text())["kv_ratio"] == 0.5


def test_process_clock_and_bad_clock():
    r = measure_generation(_tiny(), batch_size=1, prompt_len=4, gen_len=3, repeats=1, warmup=0, clock="process")
    assert r["prefill_s"] > 0 and r["decode_s"] > 0
    with pytest.raises(ValueError, match="clock"):
        measure_generation(_tiny(), clock="sundial")


def test_speed_command_process_clock_and_threads(tmp_path, capsys):
    """`lightning-drop speed` with the steady settings; a bad value is one line."""
    from lightning_drop.io.dropped_checkpoint import save_dropped
    from lightning_drop.cli import main

    model, tok = load_model("tiny-llama")
    apply_drop(model, attn=[0, 2])
    save_dropped(model, out_dir=tmp_path / "dropped", tokenizer=tok)
    threads = torch.get_num_threads()
    try:
        assert main(["speed", "--model", str(tmp_path / "dropped"), "--baseline", "tiny-llama", "--prompt-len", "8",
                     "--gen-len", "3", "--repeats", "1", "--warmup", "0", "--clock", "process", "--threads", "1",
                     "--output", str(tmp_path / "s.json")]) == 0
        res = json.loads((tmp_path / "s.json").read_text())
        assert res["setup"]["clock"] == "process" and res["setup"]["threads"] == 1
        assert res["setup"]["interleave"] == "step" and res["kv_ratio"] == 0.5
        capsys.readouterr()
        assert main(["speed", "--model", "tiny-llama", "--threads", "0"]) == 2
        assert capsys.readouterr().err.strip().endswith("threads must be >= 1, got 0")
    finally:
        torch.set_num_threads(threads)
