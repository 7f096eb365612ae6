"""`--metric loss` with `--stream`: every candidate's tail streamed in one sweep per round gives the in-memory
loss scores and drops (fp32, 1e-5), one-shot and iterative, with one layer in memory at a time."""

from __future__ import annotations

import json

import pytest
import torch

from test_streaming import _assert_close, _assert_same_checkpoint, _save, _windows
from lightning_drop.cli import main
from lightning_drop.core.architectures import get_spec
from lightning_drop.core.modeling_dropped import apply_drop
from lightning_drop.errors import UserError
from lightning_drop.io.dropped_checkpoint import load_dropped
from lightning_drop.scoring.importance import compute_importance
from lightning_drop.scoring.metrics import ImportanceMetric
from lightning_drop.scoring import streaming
from lightning_drop.scoring.loss_metric import loss_scores
from lightning_drop.scoring.streaming import check_streamable, stream_importance


def _padded() -> list[dict[str, torch.Tensor]]:
    ids = _windows(4)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding
    mask[3, -5:] = 0  # right padding
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


@pytest.mark.parametrize("family,drops,overrides", [
    ("llama", ((), ()), {}),
    ("llama", ((1,), (2,)), {}),  # candidates skip what is gone; a half-dropped block still is one
    ("llama", ((), ()), {"tie_word_embeddings": True}),  # the LM head is stored as the embedding
    ("gemma2", ((), ()), {}),  # sandwich norms, sliding windows, scaled embedding, final logit soft-capping
    ("gpt_neox", ((), ()), {}),  # the LM head is stored as `embed_out` (renamed on load)
    ("gpt2", ((), ()), {}),  # layers in `transformer.h`, learned positions
    ("deepseek_v3", ((), ()), {}),  # per-expert tensors fused on load
])
def test_streamed_loss_equals_in_memory(tmp_path, monkeypatch, family, drops, overrides):
    src = _save(tmp_path, family, **overrides)
    batches = _padded()
    model = load_dropped(src)
    apply_drop(model, attn=list(drops[0]), mlp=list(drops[1]))
    ref = compute_importance(model, batches, metric="loss")
    built, live = [], []
    real_meta = streaming.meta_model
    monkeypatch.setattr(streaming, "meta_model", lambda *a, **k: built.append(real_meta(*a, **k)) or built[-1])

    def on_layer(i, layer):  # the model holds weights in this one layer only
        layers = get_spec(built[0]).get_layers(built[0])
        live.append([j for j, lay in enumerate(layers) if any(p.device.type != "meta" for p in lay.parameters())])

    got = stream_importance(src, batches, metric="loss", drop_attn=drops[0], drop_mlp=drops[1], on_layer=on_layer)
    _assert_close(ref, got)
    assert got.extra["base_loss"] == pytest.approx(ref.extra["base_loss"], abs=1e-5)
    assert got.extra["dropped"] == ref.extra["dropped"]
    n = model.config.num_hidden_layers
    assert live == [[i] for i in range(n)] and got.extra["layer_loads"] == n
    # the same layer forwards and LM-head passes as in memory, one read of each layer
    for key in ("forward_passes", "head_passes", "candidates"):
        assert got.extra["cost"][key] == pytest.approx(ref.extra["cost"][key]), key
    hidden = sum(b["input_ids"].numel() for b in batches) * model.config.hidden_size * 4
    assert got.extra["cost"]["hidden_bytes"] == (1 + got.extra["cost"]["candidates"]) * hidden


def test_streamed_loss_scores_only_the_kinds_asked_for(tmp_path):
    src = _save(tmp_path, "llama")
    windows = _windows(4)
    only = stream_importance(src, windows, metric="loss", batch_size=2, kinds=("mlp",))
    full = compute_importance(load_dropped(src), [windows[:2], windows[2:]], metric="loss")
    assert only.mlp == pytest.approx(full.mlp, abs=1e-5) and all(v is None for v in only.attn + only.block)
    assert only.extra["cost"]["candidates"] == 4


def _reports(tmp_path, c4_path, capsys, *extra: str) -> tuple[dict, dict, str]:
    src = _save(tmp_path, "llama")
    common = ["drop", "--model", str(src), "--calibration", str(c4_path), "--num-samples", "4", "--seq-len", "32",
              "--batch-size", "2", "--metric", "loss", *extra]
    assert main([*common, "--output", str(tmp_path / "mem")]) == 0
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "str"), "--stream"]) == 0
    printed = capsys.readouterr().out
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    read = lambda d: json.loads((tmp_path / d / "importance.json").read_text())  # noqa: E731
    return read("mem"), read("str"), printed


@pytest.mark.parametrize("target,num", [("block", 1), ("joint", 3)])
def test_drop_stream_loss_one_shot_matches_in_memory(tmp_path, c4_path, capsys, target, num):
    mem, got, printed = _reports(tmp_path, c4_path, capsys, "--target", target, "--num", str(num))
    assert got.pop("streamed") is True
    for kind in ("attn", "mlp", "block"):
        assert mem.pop(kind) == pytest.approx(got.pop(kind), abs=1e-5)
    assert got["cost"].pop("layer_loads") == 4  # one sweep: each of the 4 layers read once
    assert mem["cost"].pop("seconds") > 0 and got["cost"].pop("seconds") > 0
    assert mem == got  # same drops, same forward-pass count
    assert "4 layer loads" in printed and "forward passes" in printed


def test_drop_stream_loss_iterative_matches_in_memory(tmp_path, c4_path, capsys):
    mem, got, printed = _reports(tmp_path, c4_path, capsys, "--target", "block", "--num", "2",
                                 "--schedule", "iterative")
    assert (got["drop_attn_list"], got["drop_mlp_list"]) == (mem["drop_attn_list"], mem["drop_mlp_list"])
    assert len(got["rounds"]) == len(mem["rounds"]) == 2
    for r_mem, r_got in zip(mem["rounds"], got["rounds"]):
        for kind in ("attn", "mlp", "block"):
            assert r_mem["scores"][kind] == pytest.approx(r_got["scores"][kind], abs=1e-5)
        assert r_got["scores"]["extra"]["layer_loads"] == 4
    assert got["cost"]["layer_loads"] == 8 and got["cost"]["forward_passes"] == mem["cost"]["forward_passes"]
    assert "8 layer loads" in printed


def test_other_model_metrics_and_spans_still_refuse_streaming():
    mine = ImportanceMetric("mine", model=lambda model, inputs, kinds: {})
    with pytest.raises(UserError, match="--metric mine needs the whole model for every candidate"):
        check_streamable(mine)
    check_streamable(ImportanceMetric("loss2", model=loss_scores))  # the loss under any name streams
    with pytest.raises(UserError, match="--span needs the whole model"):
        check_streamable(ImportanceMetric("loss2", model=loss_scores), span=2)
