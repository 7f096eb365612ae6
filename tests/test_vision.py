"""Vision dropping: zeroed-sublayer equivalence per family, physical removal, hook counts, scores,
checkpoints in three shapes, bad requests."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_drop import apply_drop, dropped_layers, save_dropped
from lightning_drop.core.architectures import vision_spec
from lightning_drop.scoring.importance import compute_importance
from lightning_drop.scoring.schedule import drop_by_importance
from lightning_drop.measure.sublayer_check import check_really_skipped, sublayer_call_counts
from lightning_drop.io.vision_loading import tiny_vision_model
from lightning_drop.vision.speed import compare_image_throughput

FAMILIES = ["vit", "dinov2", "dinov2_with_registers", "dinov3_vit", "swinv2"]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _out(model, x=X):
    with torch.no_grad():
        o = model(pixel_values=x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def test_really_skipped_catches_a_standin_that_runs_the_original(monkeypatch):
    """A stand-in patched to run the original attention (held outside the module tree, so no hook sits on
    it): only the FLOPs counted inside the slot can see it."""
    from lightning_drop.core.standins import DroppedAttention

    full = tiny_vision_model("vit")
    original = vision_spec(full).get_layers(full)[1].attention
    model = apply_drop(copy.deepcopy(full), attn=[1])
    monkeypatch.setattr(DroppedAttention, "forward", lambda self, hidden_states, *a, **k: original(hidden_states))
    rows = sublayer_call_counts(model, X)
    assert rows[1]["attn_compute_calls"] == 0 and rows[1]["attn_flops"] == rows[0]["attn_flops"] > 0
    with pytest.raises(RuntimeError, match="block 1: dropped attn ran"):
        check_really_skipped(model, X)


def test_really_skipped_catches_an_undeclared_standin():
    model = apply_drop(tiny_vision_model("dinov2"), attn=[2])
    model.config.drop_attn_list = []  # the checkpoint would claim attention 2 is still there
    with pytest.raises(RuntimeError, match="block 2: kept attn did no FLOPs"):
        check_really_skipped(model, X)


def test_dinov2_layerscale_is_inside_y():
    """With LayerScale ~0 the attention/MLP contributions vanish: scores must be ~0 (hooks after LayerScale)."""
    model = tiny_vision_model("dinov2", layerscale_value=1e-7)
    s = compute_importance(model, [X])
    assert max(s.attn) < 1e-6 and max(s.mlp) < 1e-6
    big = compute_importance(tiny_vision_model("dinov2", layerscale_value=1.0), [X])
    assert min(big.mlp) > 1e-4


def test_vit_block_scores_match_hidden_states():
    model = tiny_vision_model("vit")
    s = compute_importance(model, [X])
    with torch.no_grad():
        hs = model(pixel_values=X, output_hidden_states=True).hidden_states
    for i in range(4):
        expected = (1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean().item()
        assert s.block[i] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert s.num_tokens == 2 * (16 + 1)  # all patch tokens + CLS


@pytest.mark.parametrize("family", ["vit", "swinv2"])
def test_scores_skip_dropped_and_drop_by_importance(family):
    model = tiny_vision_model(family)
    result = drop_by_importance(model, [X], target="attn", num=2, schedule="iterative")
    assert len(result.rounds) == 2 and len(result.attn) == 2
    assert result.rounds[1].attn[result.round_drops[0]["drop_attn"][0]] is None
    s = compute_importance(model, [X], metric="cosine_no_residual")
    assert [v is None for v in s.attn] == [i in result.attn for i in range(4)]


def test_swinv2_two_level_names():
    model = tiny_vision_model("swinv2")
    spec = vision_spec(model)
    assert spec.block_names(model) == ["0.0", "0.1", "1.0", "1.1"]
    assert spec.flat_index(model, "1.0") == 2
    apply_drop(model, attn=["1.0"], mlp=[0])
    assert dropped_layers(model) == ([2], [0])
    with pytest.raises(ValueError, match="no block '3.0'"):
        spec.flat_index(model, "3.0")


@pytest.mark.parametrize(
    "attn,mlp,message",
    [([4], [], "out of range"), ([-1], [], "out of range"), ([1, 1], [], "listed twice"),
     ([0, 1, 2, 3], [0, 1, 2, 3], "every block"), (["a"], [], "not an integer")],
)
def test_bad_requests(attn, mlp, message):
    model = tiny_vision_model("vit")
    with pytest.raises(ValueError, match=message):
        apply_drop(model, attn=attn, mlp=mlp)
    assert dropped_layers(model) == ([], [])


def test_bad_inputs_and_unsupported():
    model = tiny_vision_model("vit")
    apply_drop(model, attn=[1])
    with pytest.raises(ValueError, match="already dropped"):
        apply_drop(model, attn=[1])
    with pytest.raises(ValueError, match="unsupported vision architecture 'llama'"):
        vision_spec("llama")
    with pytest.raises(ValueError, match="unknown metric"):
        compute_importance(model, [X], metric="nope")
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        compute_importance(model, [torch.randn(3, 32, 32)])
    with pytest.raises(ValueError, match="no calibration data"):
        compute_importance(model, [])


CLEAN_ENV_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] == 'lightning_drop':
                raise ImportError('hidden')
    sys.meta_path.insert(0, _Hide())
    from transformers import AutoModelForImageClassification
    m = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(m(pixel_values=x).logits, sys.argv[3])
    """
)


def test_trust_remote_code_load_without_the_package(tmp_path):
    model = tiny_vision_model("dinov2")
    apply_drop(model, attn=[1, 3], mlp=[0])
    expected = _out(model)
    out = save_dropped(model, tmp_path / "ckpt")
    (tmp_path / "clean.py").write_text(CLEAN_ENV_SCRIPT)
    torch.save(X, tmp_path / "x.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(tmp_path / "clean.py"), str(out), str(tmp_path / "x.pt"),
                             str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


def test_compare_image_throughput_reports_flops_ratio():
    base, dropped = tiny_vision_model("vit"), tiny_vision_model("vit")
    apply_drop(dropped, attn=[0, 1], mlp=[0, 1])
    r = compare_image_throughput(base, dropped, batch_size=4, iters=1, rounds=1)
    assert 0.3 < r["flops_ratio"] < 0.7 and r["dropped_params"] < r["base_params"]
    assert r["base_images_per_s"] > 0 and r["dropped"] == {"attn": [0, 1], "mlp": [0, 1]}
