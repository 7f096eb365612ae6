"""Speed at several context lengths, the preset, the clock a device is timed with, CUDA timing. No timing assertions."""

from __future__ import annotations

import copy
import json
import os
from typing import ClassVar

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lightning_drop import apply_drop  # noqa: E402
from lightning_drop.measure import clocks  # noqa: E402
from lightning_drop.measure.context_speed import (  # noqa: E402
    check_context,
    format_context_table,
    parse_lengths,
    preset,
    speed_by_context,
)
from lightning_drop.io.model_loading import load_model  # noqa: E402
from lightning_drop.measure.speed import compare_speed  # noqa: E402


def _pair(attn=(0, 2), mlp=()):
    base, _ = load_model("tiny-llama")
    return base, apply_drop(copy.deepcopy(base), attn=list(attn), mlp=list(mlp))


def _kv_per_token(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4  # fp32


# ------------------------------------------------------------------------------------------------ clocks
class _FixedWatch:
    """A stopwatch whose every region takes one second: what the generation loop adds up becomes countable."""

    made: ClassVar[list[torch.device]] = []

    def __init__(self, device):
        _FixedWatch.made.append(device)

    def start(self):
        pass

    def stop(self):
        return 1.0


def test_the_clock_is_chosen_from_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU
    assert clocks.resolve_clock("wall", cpu) == "wall" and clocks.resolve_clock("process", cpu) == "process"
    assert clocks.resolve_clock("wall", cuda) == clocks.CUDA_EVENTS
    with pytest.raises(ValueError, match="process"):
        clocks.resolve_clock("process", cuda)
    with pytest.raises(ValueError, match="clock must be one of"):
        clocks.resolve_clock("sundial", cpu)
    watch = clocks.stopwatch("process", cpu)
    assert isinstance(watch, clocks.HostStopwatch) and watch.now is clocks.CLOCKS["process"]
    watch.start()
    sum(range(20000))
    assert watch.stop() > 0
    # on a CUDA device "wall" means CUDA events (the event class stands in: there is no GPU to record on)
    monkeypatch.setattr(clocks, "CudaEventStopwatch", _FixedWatch)
    assert isinstance(clocks.stopwatch("wall", cuda), _FixedWatch) and _FixedWatch.made[-1] == cuda


def test_generation_is_timed_by_the_chosen_stopwatch(monkeypatch):
    """Every prefill and decode step of every model goes through `clocks.stopwatch`: one second each here."""
    monkeypatch.setattr(clocks, "stopwatch", lambda clock, device: _FixedWatch(device))
    base, dropped = _pair()
    r = compare_speed(base, dropped, prompt_len=6, gen_len=4, repeats=2, warmup=0)
    for name in ("base", "dropped"):
        assert r[name]["prefill_runs_s"] == [1.0, 1.0] and r[name]["decode_runs_s"] == [3.0, 3.0]
    assert r["speedup"] == {"prefill": 1.0, "decode": 1.0, "total": 1.0}


# ------------------------------------------------------------------------------------------------ lengths
def test_speed_by_context_one_comparison_per_length_with_kv_at_that_length():
    base, attn = _pair()
    _, mlp = _pair(attn=(), mlp=(1,))
    per = speed_by_context({"base": base, "attn": attn, "mlp": mlp}, [8, 24], gen_len=3, repeats=1, warmup=0,
                           ideal=True)
    assert [r["setup"]["prompt_len"] for r in per] == [8, 24] and [r["context_len"] for r in per] == [11, 27]
    kv = _kv_per_token(base)
    for r in per:
        tokens = r["setup"]["prompt_len"] + 2  # the last generated token is never fed back
        assert r["base"]["kv_cache_bytes"] == kv * tokens == r["mlp"]["kv_cache_bytes"]
        assert r["attn"]["kv_cache_bytes"] == kv * tokens // 2 and r["base"]["kv_cache_tokens"] == tokens
        assert set(r["vs_base"]) == {"attn", "mlp"}
        assert r["vs_base"]["attn"]["kv_cache_ratio"] == 0.5 and r["vs_base"]["mlp"]["kv_cache_ratio"] == 1.0
        for vs in r["vs_base"].values():
            assert set(vs["speedup"]) == set(vs["ideal_speedup"]) == {"prefill", "decode", "total"}
            assert all(x > 1 for x in vs["ideal_speedup"].values())  # each drop removes time from the base
            assert vs["realized_gain"]["total"] == pytest.approx((vs["speedup"]["total"] - 1)
                                                                 / (vs["ideal_speedup"]["total"] - 1))
    table = format_context_table(per, {"attn": "attention-2", "mlp": "MLP-1"}).splitlines()
    assert len(table) == 4 and "attention-2 vs base" in table[0] and "realized" in table[1]
    assert table[2].split()[:2] == ["8", "11"] and table[3].split()[:2] == ["24", "27"]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        speed_by_context({"base": base, "attn": attn}, [8, 600], gen_len=3, repeats=1, warmup=0)


def test_profile_drops_times_every_drop_from_the_same_runs():
    """Each drop sums its own modules' times of one profiled run: a drop that removes two others' modules
    is charged exactly their sum, and all share the same base and profiled times."""
    from lightning_drop.measure.ideal_speedup import profile_drops

    base, _ = _pair()
    prof = profile_drops(base, {"attn": ([0, 1], []), "mlp": ([], [2]), "both": ([0, 1], [2])}, prompt_len=8,
                         gen_len=4, repeats=2, warmup=0)
    for phase in ("prefill", "decode", "total"):
        parts = {name: p[phase]["dropped_parts_s"] for name, p in prof.items()}
        assert 0 < parts["attn"] and 0 < parts["mlp"]
        # two repeats: the median is the mean, which adds up
        assert parts["both"] == pytest.approx(parts["attn"] + parts["mlp"], rel=1e-9)
        assert prof["attn"][phase]["profiled_s"] == prof["mlp"][phase]["profiled_s"] == prof["both"][phase]["profiled_s"]
    assert (prof["both"]["attn"], prof["both"]["mlp"]) == ([0, 1], [2])


def test_lengths_presets_and_context_checks():
    assert parse_lengths("128, 512,2048") == [128, 512, 2048] and parse_lengths([4]) == [4]
    for bad, msg in (("", "at least one"), (" , ", "at least one"), ("128,abc", "'abc' is not an integer"),
                     ("0,8", ">= 1"), ([2.5], ">= 1")):
        with pytest.raises(ValueError, match=msg):
            parse_lengths(bad)
    assert preset("paper") == {"prompt_lens": [2048], "gen_len": 2048, "batch_size": 1}
    with pytest.raises(ValueError, match="unknown preset 'fast'; choose from paper"):
        preset("fast")
    check_context([2048], 2048, 4096, "m")  # exactly the positions: allowed
    check_context([2048], 2048, None, "m")  # no limit known
    with pytest.raises(ValueError, match=r"prompt 2048 \+ 2049 generated tokens = 4097 exceeds m's"):
        check_context([128, 2048], 2049, 4096, "m")


def test_speed_command_per_length_json_and_table(tmp_path, capsys):
    from lightning_drop.cli import main
    from lightning_drop.io.dropped_checkpoint import save_dropped

    model, tok = load_model("tiny-llama")
    apply_drop(model, attn=[1, 3])
    save_dropped(model, out_dir=tmp_path / "dropped", tokenizer=tok)
    assert main(["speed", "--model", str(tmp_path / "dropped"), "--baseline", "tiny-llama", "--prompt-lens", "8,16",
                 "--gen-len", "3", "--repeats", "1", "--warmup", "0", "--ideal", "--output",
                 str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.split() and line.split()[0].isdigit()]
    assert [r[:2] for r in rows] == [["8", "11"], ["16", "19"]]
    res = json.loads((tmp_path / "s.json").read_text())
    assert [r["setup"]["prompt_len"] for r in res["per_length"]] == [8, 16]
    # the top level is the first length's comparison, in the single-length shape
    assert res["setup"]["prompt_len"] == 8 and res["kv_ratio"] == 0.5 and res["speedup"] == res["per_length"][0]["speedup"]
    assert res["ideal_speedup"] == res["per_length"][0]["vs_base"]["dropped"]["ideal_speedup"]["total"]
    assert res["per_length"][1]["dropped"]["kv_cache_bytes"] * 2 == res["per_length"][1]["base"]["kv_cache_bytes"]


def test_speed_command_preset_sets_the_workload(tmp_path, monkeypatch):
    """A preset's prompt lengths, generated tokens and batch reach the measurement (a small stand-in preset:
    the paper's 2048 + 2048 exceeds the tiny model's 512 positions, which is refused before loading)."""
    from lightning_drop.measure import context_speed
    from lightning_drop.jobs.speed import speed_main

    monkeypatch.setitem(context_speed.PRESETS, "small", {"prompt_lens": [6, 10], "gen_len": 3, "batch_size": 2})
    res = speed_main("tiny-llama", baseline="tiny-llama", preset="small", repeats=1, warmup=0)
    assert res["preset"] == "small"
    assert [(r["setup"]["prompt_len"], r["setup"]["gen_len"], r["setup"]["batch_size"]) for r in res["per_length"]] \
        == [(6, 3, 2), (10, 3, 2)]

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the context length was checked")

    monkeypatch.setattr("lightning_drop.io.model_loading.load_model", no_loading)
    with pytest.raises(ValueError, match=r"--preset: prompt 2048 \+ 2048 generated tokens = 4096 exceeds"):
        speed_main("tiny-llama", baseline="tiny-llama", preset="paper")


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is visible")
def test_cuda_refused_in_one_line_without_a_gpu(capsys, monkeypatch):
    from lightning_drop.cli import main

    monkeypatch.setattr("lightning_drop.io.model_loading.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["speed", "--model", "tiny-llama", "--device", "cuda", "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-drop speed: error: --device cuda: ")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timing_peak_memory_and_kv(tmp_path):
    """On a GPU: CUDA-event timings and per-model peak memory come back positive, the dropped cache is smaller."""
    from lightning_drop.jobs.speed import speed_main

    base, dropped = _pair()
    base, dropped = base.cuda(), dropped.cuda()
    r = compare_speed(base, dropped, prompt_len=64, gen_len=8, repeats=2, warmup=1)
    assert r["setup"]["clock"] == clocks.CUDA_EVENTS and r["setup"]["device"].startswith("cuda")
    for name in ("base", "dropped"):
        s = r[name]
        assert s["prefill_s"] > 0 and s["decode_s"] > 0
        assert s["peak_cuda_bytes"] > 0 and 0 < s["peak_cuda_extra_bytes"] <= s["peak_cuda_bytes"]
    assert r["dropped"]["kv_cache_bytes"] < r["base"]["kv_cache_bytes"]
    assert compare_speed(base, dropped, prompt_len=16, gen_len=3, repeats=1, warmup=0)["dropped"]["peak_cuda_bytes"] > 0
    with pytest.raises(ValueError, match="process"):
        compare_speed(base, dropped, prompt_len=16, gen_len=3, repeats=1, warmup=0, clock="process")
    res = speed_main("tiny-llama", baseline="tiny-llama", prompt_lens="16,64", gen_len=4, repeats=1, warmup=1,
                     device="cuda", dtype="bf16")
    assert [r["base"]["peak_cuda_bytes"] > 0 for r in res["per_length"]] == [True, True]
