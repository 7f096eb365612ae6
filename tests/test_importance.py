"""Importance scores equal a direct computation; padding is excluded; DDP agrees; selection is right."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lightning_drop import apply_drop, dropped_layers
from lightning_drop.scoring.importance import compute_importance, token_scores
from lightning_drop.io.tiny_models import tiny_model
from lightning_drop.scoring.schedule import drop_by_importance
from lightning_drop.scoring.selection import resolve_num, select_modules


def _windows(n=3, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seq), generator=g)


@torch.no_grad()
def direct_scores(model, ids, metric="cosine"):
    """Layer by layer, without hooks: X, h and Y computed from the modules themselves."""
    inner = model.model
    x = inner.embed_tokens(ids)  # Gemma's embedding module applies its own sqrt(hidden) scale
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    pe = inner.rotary_emb(x, position_ids=pos)
    t = ids.shape[1]
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]  # explicit: eager attention adds no mask itself
    sums = {k: [0.0] * len(inner.layers) for k in ("attn", "mlp", "block")}
    sandwich = hasattr(inner.layers[0], "pre_feedforward_layernorm")
    post_norm = not hasattr(inner.layers[0], "input_layernorm")  # OLMo2: norms after each sublayer only
    for i, layer in enumerate(inner.layers):
        attn_in = x if post_norm else layer.input_layernorm(x)
        a = layer.self_attn(hidden_states=attn_in, position_embeddings=pe, attention_mask=causal)[0]
        h = x + (layer.post_attention_layernorm(a) if sandwich or post_norm else a)
        if post_norm:
            y = h + layer.post_feedforward_layernorm(layer.mlp(h))
        elif sandwich:
            y = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        else:
            y = h + layer.mlp(layer.post_attention_layernorm(h))
        torch.testing.assert_close(y, layer(x, position_embeddings=pe, attention_mask=causal), atol=1e-5, rtol=1e-5)
        for kind, (a_, b_) in {"attn": (x, h), "mlp": (h, y), "block": (x, y)}.items():
            sums[kind][i] = token_scores(metric, a_, b_).double().mean().item()
        x = y
    return sums


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2"])
@pytest.mark.parametrize("metric", ["cosine", "angular", "relative_magnitude"])
def test_scores_equal_direct_computation(family, metric):
    model, _ = tiny_model(family, num_layers=3, sliding_window=64) if family == "gemma2" else tiny_model(family, 3)
    ids = _windows()
    got = compute_importance(model, [ids[:2], ids[2:]], metric=metric)
    ref = direct_scores(model, ids, metric)
    for kind in ("attn", "mlp", "block"):
        assert got.row(kind) == pytest.approx(ref[kind], abs=1e-5)
    assert got.num_tokens == ids.numel()


def test_padding_tokens_are_excluded():
    model, _ = tiny_model("llama")
    a, b = _windows(1, 20, 1), _windows(1, 12, 2)
    padded = torch.cat([b, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    batch = {"input_ids": torch.cat([a, padded]), "attention_mask": torch.cat([torch.ones(1, 20), torch.cat(
        [torch.ones(1, 12), torch.zeros(1, 8)], dim=1)]).long()}
    got = compute_importance(model, [batch])
    sa, sb = compute_importance(model, [a]), compute_importance(model, [b])
    for kind in ("attn", "mlp", "block"):
        expected = [(20 * x + 12 * y) / 32 for x, y in zip(sa.row(kind), sb.row(kind))]
        assert got.row(kind) == pytest.approx(expected, abs=1e-6)
    assert got.num_tokens == 32


def test_left_padding_and_nonfinite_pad_states_are_excluded():
    """Left padding as generation batches use it; whatever the pad positions hold never reaches the score."""
    model, _ = tiny_model("llama")
    a, b = _windows(1, 20, 1), _windows(1, 12, 2)
    batch = {"input_ids": torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], dim=1)]),
             "attention_mask": torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 8), torch.ones(1, 12)], 1)]).long()}
    sa, sb = compute_importance(model, [a]), compute_importance(model, [b])
    # Poison the pad positions of the last layer's output with NaN: a masked product (NaN * 0) would let
    # it into the last layer's MLP and block sums.
    last = model.model.layers[-1]

    def poison(module, args, output):
        out = (output[0] if isinstance(output, tuple) else output).clone()
        out[1, :8] = float("nan")
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = last.register_forward_hook(poison)
    try:
        got = compute_importance(model, [batch])
    finally:
        handle.remove()
    # The left-padded row's real tokens attend only to real tokens (RoPE is relative, so the shifted
    # positions change nothing): every score is the token-weighted mean of the two unpadded runs.
    for kind in ("attn", "mlp", "block"):
        expected = [(20 * x + 12 * y) / 32 for x, y in zip(sa.row(kind), sb.row(kind))]
        assert got.row(kind) == pytest.approx(expected, abs=1e-5)
    assert got.num_tokens == 32


def test_no_residual_scores_sublayer_output_against_its_input():
    model, _ = tiny_model("llama", 2)
    ids = _windows(2, 16)
    got = compute_importance(model, [ids], metric="cosine_no_residual")
    inner = model.model
    with torch.no_grad():
        x = inner.embed_tokens(ids)
        pe = inner.rotary_emb(x, position_ids=torch.arange(16).unsqueeze(0))
        layer = inner.layers[0]
        n = layer.input_layernorm(x)
        a = layer.self_attn(hidden_states=n, position_embeddings=pe, attention_mask=None)[0]
    expected = (1 - F.cosine_similarity(n, a, dim=-1)).double().mean().item()
    assert got.attn[0] == pytest.approx(expected, abs=1e-5)
    assert got.attn != compute_importance(model, [ids]).attn


def test_dropped_modules_score_none_and_survivor_still_scored():
    model, _ = tiny_model("llama")
    apply_drop(model, attn=[1])
    s = compute_importance(model, [_windows()])
    assert s.attn[1] is None and s.mlp[1] is not None and s.mlp[1] > 0 and s.block[1] is not None


def test_positional_metrics():
    model, _ = tiny_model("llama")
    rev = compute_importance(model, [_windows()], metric="reverse")
    assert select_modules(rev, "attn", 2) == ([2, 3], [])
    r1 = compute_importance(model, [_windows()], metric="random", seed=3)
    r2 = compute_importance(model, [_windows()], metric="random", seed=3)
    assert r1.attn == r2.attn and r1.attn != compute_importance(model, [_windows()], metric="random", seed=4).attn


def test_selection_targets_and_ties():
    from lightning_drop.scoring.importance import ImportanceScores

    s = ImportanceScores("cosine", attn=[0.5, 0.1, 0.1, 0.9], mlp=[0.05, 0.3, 0.2, 0.95], block=[0.6, 0.4, 0.3, 1.0])
    assert select_modules(s, "attn", 2) == ([1, 2], [])
    assert select_modules(s, "mlp", 2) == ([], [0, 2])
    assert select_modules(s, "block", 1) == ([2], [2])
    assert select_modules(s, "joint", 3) == ([1, 2], [0])
    assert select_modules(s, "attn", 1, keep=[1]) == ([2], [])
    with pytest.raises(ValueError, match="only 4"):
        select_modules(s, "attn", 5)
    with pytest.raises(ValueError, match="unknown target"):
        select_modules(s, "heads", 1)
    assert resolve_num(30, None, 0.25) == 8
    with pytest.raises(ValueError, match="exactly one"):
        resolve_num(30, 3, 0.1)


def test_block_target_on_a_half_dropped_model_takes_the_surviving_sublayer():
    model, _ = tiny_model("llama")
    apply_drop(model, attn=[1, 2])
    scores = compute_importance(model, [_windows()])
    assert scores.attn[1] is None and scores.block[1] is not None
    from lightning_drop.scoring.importance import ImportanceScores

    rigged = ImportanceScores("cosine", scores.attn, scores.mlp, block=[0.9, 0.0, 0.8, 0.7])
    assert select_modules(rigged, "block", 1) == ([], [1])  # only the MLP of block 1 is left to drop
    res = drop_by_importance(model, lambda: [_windows()], "block", 2)
    assert len(res.attn) >= 2 and dropped_layers(model) == (res.attn, res.mlp)


def test_requests_that_would_remove_everything_fail_before_scoring():
    from lightning_drop.scoring.selection import max_droppable

    assert max_droppable(4, "block") == 3
    assert max_droppable(4, "joint") == 7
    assert max_droppable(4, "attn") == 4  # an attention-free model still has its MLPs
    assert max_droppable(4, "attn", dropped_mlp=[0, 1, 2, 3]) == 3
    assert max_droppable(4, "block", keep=[0]) == 3
    assert max_droppable(4, "block", dropped_attn=[0], dropped_mlp=[0]) == 2
    model, _ = tiny_model("llama")

    def no_scoring():
        raise AssertionError("the calibration pass ran for a request that cannot succeed")

    for target, num in (("block", 4), ("joint", 8), ("attn", 5)):
        with pytest.raises(ValueError, match="without removing every sublayer"):
            drop_by_importance(model, no_scoring, target, num)
    assert dropped_layers(model) == ([], [])


def test_one_shot_and_iterative_give_valid_selections():
    ids = _windows(4, 24)
    m1, _ = tiny_model("qwen2", 6)
    m2, _ = tiny_model("qwen2", 6)
    one = drop_by_importance(m1, [ids], "joint", 4, schedule="one-shot")
    it = drop_by_importance(m2, [ids], "joint", 4, schedule="iterative", step=1)
    assert len(one.rounds) == 1 and len(it.rounds) == 4
    for res, m in ((one, m1), (it, m2)):
        assert len(res.attn) + len(res.mlp) == 4
        assert dropped_layers(m) == (res.attn, res.mlp)
    # the first iterative round sees the same model as the one-shot round
    assert it.rounds[0].attn == pytest.approx(one.rounds[0].attn)


def test_bad_inputs():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="no calibration data"):
        compute_importance(model, [])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_importance(model, [_windows()], metric="taylor")
    with pytest.raises(ValueError, match="unknown schedule"):
        drop_by_importance(model, [_windows()], "attn", 1, schedule="greedy")
    nan_model, _ = tiny_model("llama")
    with torch.no_grad():
        nan_model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        compute_importance(nan_model, [_windows()])


def _ddp_worker(rank, world, init_file, ids, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, _ = tiny_model("llama")
    shard = ids[rank::world]
    scores = compute_importance(model, [shard])
    torch.save(scores.to_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.xdist_group("processes")  # two processes: one such test at a time
def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    ids = _windows(4, 24)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), ids, str(tmp_path / "scores")), nprocs=2, join=True)
    r0, r1 = torch.load(f"{tmp_path}/scores.0"), torch.load(f"{tmp_path}/scores.1")
    model, _ = tiny_model("llama")
    single = compute_importance(model, [ids])
    for kind in ("attn", "mlp", "block"):
        assert r0[kind] == r1[kind]  # identical on every rank
        assert r0[kind] == pytest.approx(single.row(kind), abs=1e-6)


@pytest.mark.slow
def test_smollm2_attention_scores_lower_than_mlp(shared_dir):
    from lightning_drop.io.model_loading import load_model

    from lightning_drop.io.text_data import CalibrationConfig, calibration_windows

    model, tok = load_model("smollm2-135m")
    # The command's own calibration pipeline: no special tokens, documents joined with EOS, first N windows.
    cfg = CalibrationConfig(source=str(shared_dir / "data" / "c4_demo.jsonl"), num_samples=4, seq_len=256)
    windows = calibration_windows(tok, cfg, max_positions=model.config.max_position_embeddings)
    assert windows.shape == (4, 256) and (windows == tok.eos_token_id).any()
    s = compute_importance(model, [windows[:2], windows[2:]])
    assert statistics.mean(s.attn) < statistics.mean(s.mlp)
    assert all(math.isfinite(v) for v in s.attn + s.mlp + s.block)


def test_every_importance_figure_is_the_one_function(tmp_path, monkeypatch):
    """The drop job's figure, the study report's and ImportanceTracker's all go through
    `plots.importance_figure`, each under its own file name; dropped modules are outlined, gone ones blank."""
    from pathlib import Path

    from lightning_drop.measure import plots
    from lightning_drop.jobs.study import figures
    from lightning_drop.callbacks import ImportanceTracker
    from lightning_drop.scoring.importance import ImportanceScores

    drawn = []
    real = plots.importance_figure

    def spy(panels, **kw):
        drawn.append(([(p.rows, [list(r) for r in p.values], sorted(p.marked)) for p in panels], kw))
        return real(panels, **kw)

    monkeypatch.setattr(plots, "importance_figure", spy)
    s = ImportanceScores(metric="cosine", attn=[0.1, None, 0.3], mlp=[0.2, 0.5, 0.4], block=[1.0, 2.0, 3.0],
                         num_tokens=8)
    assert plots.plot_importance(s, tmp_path / "importance.png", drop_attn=[2], drop_mlp=[0]).stat().st_size > 3000
    rows, values, marked = drawn[-1][0][0]
    assert rows == ["attention", "MLP", "block"] and values[0] == [0.1, None, 0.3] and marked == [(0, 2), (1, 0)]
    out = figures.plot_importance_heatmap({"scores": {"a": s.to_dict(), "b": s.to_dict()}}, Path(tmp_path / "r.png"))
    assert out.name == "r.png" and out.stat().st_size > 3000 and len(drawn[-1][0]) == 2
    tracker = ImportanceTracker(log_color=False)
    tracker.history = [{"step": k, "event": "step", "attn": s.attn, "mlp": s.mlp, "block": s.block} for k in (0, 5)]
    tracker._heatmap(SimpleNamespace(loggers=[], global_step=5), tmp_path)
    assert (tmp_path / "importance_heatmap.png").stat().st_size > 3000
    panels, kw = drawn[-1]
    assert [p[0] for p in panels] == [["0", "5"]] * 3 and kw["log_color"] is False and kw["side_by_side"] is True
    assert len(drawn) == 3
