"""Nemotron-H: every layer is ONE sublayer (`x + mixer(norm(x))`), a Mamba-2, attention, MLP or MoE block as the
layer's type says. A token-mixer layer is an attention-target module of its kind, an MLP/MoE layer an MLP-target
module; the sublayer a layer lacks counts as gone, so dropping its one sublayer drops the layer. The family
matrix (tests/test_family_matrix.py) proves it like every family; here what is particular to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_drop import apply_drop, dropped_layers, get_spec, load_dropped, save_dropped
from lightning_drop.cli import main
from lightning_drop.core.modeling_dropped import drop_lists
from lightning_drop.errors import UserError
from lightning_drop.io.dropped_checkpoint import checkpoint_kind
from lightning_drop.io.model_loading import tiny_model
from lightning_drop.measure.memory import cache_bytes_by_kind
from lightning_drop.scoring.importance import compute_importance

X = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
KINDS = ["mamba", "mlp", "mlp", "mlp", "full_attention", "mamba"]  # the tiny model: M E - - * M
MIXERS, MLPS = [0, 4, 5], [1, 2, 3]


@pytest.fixture
def model():
    return tiny_model("nemotron_h")[0]


def _logits(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X, use_cache=False).logits


def test_each_layer_is_one_sublayer_of_its_kind(model):
    spec = get_spec(model)
    assert model.config.layers_block_type == ["linear_attention", "moe", "mlp", "mlp", "full_attention",
                                              "linear_attention"]
    assert spec.mixer_kinds(model) == KINDS
    # the sublayer a layer never had is gone; nothing is dropped yet
    assert dropped_layers(model) == (MLPS, MIXERS) and drop_lists(model) == ([], [])
    assert checkpoint_kind(model) == "plain"
    layers = spec.get_layers(model)
    assert spec.attn_modules(layers[1]) == () and spec.mlp_modules(layers[0]) == ()
    assert spec.attn_modules(layers[0]) == ("mixer", "norm") == spec.mlp_modules(layers[1])


def test_scores_are_the_layer_score_of_its_one_sublayer(model):
    """attn (mixers) and MLP (MLP/MoE layers) are each 1 - cos(X, Y) of their layer, recomputed from hooks."""
    layers = get_spec(model).get_layers(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda m, a, k, o, i=i: seen.__setitem__(
        i, ((a or (k["hidden_states"],))[0].double(), (o[0] if isinstance(o, tuple) else o).double())),
        with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(X, use_cache=False)
    for h in hooks:
        h.remove()
    scores = compute_importance(model, [X])
    assert scores.extra["mixer_kinds"] == KINDS
    for i, (x, y) in seen.items():
        expected = float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).mean())
        assert scores.block[i] == pytest.approx(expected, abs=1e-6)
        assert (scores.attn if i in MIXERS else scores.mlp)[i] == pytest.approx(expected, abs=1e-6)
        assert (scores.mlp if i in MIXERS else scores.attn)[i] is None
    assert all(v > 0 for v in scores.block)


@pytest.mark.parametrize("layer", [0, 4])
def test_a_cut_the_cache_could_not_follow_keeps_the_dropped_format(model, tmp_path, layer):
    """Transformers reads a cache's length from layer 0 and sizes masks from an attention slot: a plain model
    starting with an MLP layer (layer 0 cut: the MoE layer comes first) or without attention (layer 4 cut) has
    no such slot, so these cuts keep the layer numbering, the stand-in keeping the slot, and generate."""
    apply_drop(model, attn=[layer])
    out = save_dropped(model, tmp_path / "d")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dropped_nemotron_h" and config["drop_attn_list"] == [layer]
    loaded = load_dropped(out)
    prompt = X[:1, :10]
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=4, do_sample=False),
                       model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))


def test_dropping_the_one_sublayer_drops_the_layer(model, tmp_path):
    full = _logits(model)
    apply_drop(model, attn=[5], mlp=[3, 5])  # layer 5 as a block (its Mamba mixer), layer 3's MLP
    assert drop_lists(model) == ([5], [3]) and model.config.drop_attn_list == [5]
    assert model.config.drop_mlp_list == [3]
    assert set(dropped_layers(model)[0]) & set(dropped_layers(model)[1]) == {3, 5}  # both are dropped blocks
    assert checkpoint_kind(model) == "blocks" and not torch.allclose(_logits(model), full)
    out = save_dropped(model, tmp_path / "blocks")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["lightning_drop"]["dropped_blocks"] == [3, 5]
    assert config["layers_block_type"] == ["linear_attention", "moe", "mlp", "full_attention"]


@pytest.mark.parametrize("attn,mlp,message", [([1], [], "layer 1 of this nemotron_h model has no token mixer"),
                                              ([], [0], "layer 0 of this nemotron_h model has no MLP"),
                                              ([0, 4, 5], [], "every token mixer")])
def test_a_sublayer_the_layer_lacks_is_refused_and_nothing_changes(model, attn, mlp, message):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=message):
        apply_drop(model, attn=attn, mlp=mlp)
    assert drop_lists(model) == ([], []) and model.state_dict().keys() == before.keys()


def test_a_dropped_mixer_caches_nothing(model):
    before = cache_bytes_by_kind(model, prompt_len=12)
    assert set(before["kv_bytes_per_token"]) == {"mamba", "full_attention"}  # MLP layers cache nothing
    assert before["state_bytes_per_sequence"]["mamba"] > 0 and before["kv_bytes_per_token"]["full_attention"] > 0
    apply_drop(model, attn=[4, 5])  # the only attention layer too: masks are still sized (from its kept slot)
    after = cache_bytes_by_kind(model, prompt_len=12)
    assert after["kv_bytes_per_token"]["full_attention"] == 0
    assert after["state_bytes_per_sequence"]["mamba"] == pytest.approx(before["state_bytes_per_sequence"]["mamba"] / 2)
    prompt = X[:1, :10]
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), ids)


DROP = ["drop", "--model", "tiny-nemotron_h", "--calibration", "c4-sample", "--num-samples", "4", "--seq-len", "32"]


def test_drop_by_mixer_kind_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*DROP, "--target", "attn", "--num", "1", "--mixers", "mamba", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "importance.json").read_text())
    assert report["mixer_kinds"] == KINDS and report["drop_mlp_list"] == []
    assert len(report["drop_attn_list"]) == 1 and KINDS[report["drop_attn_list"][0]] == "mamba"
    by_kind = report["importance_by_kind"]
    assert set(by_kind) == {"mamba", "full_attention"} and by_kind["mamba"]["dropped"] == report["drop_attn_list"]
    assert by_kind["mamba"]["min"] == min(report["attn"][i] for i in (0, 5))
    assert "  mamba: layers [0, 5]" in printed and "  full_attention: layers [4]" in printed
    _written_as_layers(out, report["drop_attn_list"], [])


def _written_as_layers(out: Path, attn: list[int], mlp: list[int]) -> None:
    """A drop of layers' one sublayers is a plain checkpoint of fewer layers, unless its first kept layer would
    mix no tokens or no attention layer would be left (no cache slot to read from): then the dropped format."""
    config = json.loads((out / "config.json").read_text())
    first = min(set(range(6)) - set(attn + mlp))
    if KINDS[first] == "mlp" or 4 in attn:
        assert config["model_type"] == "dropped_nemotron_h"
        assert (config["drop_attn_list"], config["drop_mlp_list"]) == (attn, mlp)
    else:
        assert config["model_type"] == "nemotron_h" and config["lightning_drop"]["dropped_blocks"] == sorted(attn + mlp)
    assert drop_lists(load_dropped(out)) == ((attn, mlp) if config["model_type"].startswith("dropped_") else ([], []))


def test_block_drop_through_the_command_line(tmp_path):
    out = tmp_path / "out"
    assert main([*DROP, "--target", "block", "--num", "2", "--output", str(out)]) == 0
    report = json.loads((out / "importance.json").read_text())
    attn, mlp = report["drop_attn_list"], report["drop_mlp_list"]
    assert len(attn) + len(mlp) == 2 and set(attn) <= set(MIXERS) and set(mlp) <= set(MLPS)
    _written_as_layers(out, attn, mlp)
