"""GPT-2-style, parallel-residual and hybrid families: the spec fields they need, each checked on a tiny model.

The generic proofs (dropped == zeroed, sublayers never run, save/reload, cached == uncached generation) run for
every family in tests/test_core_equivalence.py; here: what is particular to these layouts. Parallel layers
score each sublayer on (X, X + its output) and keep a shared norm while one sublayer uses it; hybrids drop
token mixers of any kind, read each layer's kind, allocate no state for a dropped mixer, and `--mixers`
restricts a drop to kinds.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_drop import apply_drop, dropped_layers, get_spec, load_dropped, save_dropped
from lightning_drop.cli import main
from lightning_drop.io.model_loading import tiny_model
from lightning_drop.measure.plots import MIXER_LABELS, score_panel
from lightning_drop.measure.memory import cache_bytes_by_kind
from test_bad_inputs import _fingerprint
from lightning_drop.scoring.importance import compute_importance

X = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
GPT2_STYLE = ["gpt2", "gpt-sw3", "gpt_bigcode", "gpt_neo", "biogpt"]
PARALLEL = ["gptj", "codegen", "phi", "cohere", "cohere2", "falcon", "gpt_neox"]
HYBRID = ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "jamba", "bamba", "lfm2", "granitemoehybrid"]
RECURRENT = {"linear_attention", "mamba", "conv"}


def _logits(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", GPT2_STYLE + PARALLEL)
def test_family_is_supported_and_drops_exactly(family):
    model, _ = tiny_model(family)
    spec = get_spec(model)
    assert family in spec.model_types
    full = _logits(model)
    apply_drop(model, attn=[1, 2], mlp=[2])
    assert dropped_layers(model) == ([1, 2], [2])
    assert not torch.allclose(_logits(model), full)


@pytest.mark.parametrize("family", PARALLEL)
def test_parallel_scores_each_sublayer_on_the_input_both_read(family):
    """attn: 1 - cos(X, X + attn(norm X)), MLP likewise, block 1 - cos(X, Y): recomputed from hooks here."""
    model, _ = tiny_model(family)
    spec = get_spec(model)
    assert spec.is_parallel(model.config)
    layers = spec.get_layers(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [layers[1].register_forward_pre_hook(lambda m, a, k: seen.update(x=(a or (k["hidden_states"],))[0]),
                                                 with_kwargs=True),
             layers[1].register_forward_hook(lambda m, a, o: seen.update(y=o[0] if isinstance(o, tuple) else o)),
             getattr(layers[1], spec.attn).register_forward_hook(lambda m, a, o: seen.update(a=o[0].clone())),
             getattr(layers[1], spec.mlp).register_forward_hook(lambda m, a, o: seen.update(m=o.clone()))]
    with torch.no_grad():
        model(X, use_cache=False)
    for h in hooks:
        h.remove()
    x = seen["x"].double()

    def score(y: torch.Tensor) -> float:
        return float((1 - torch.nn.functional.cosine_similarity(x, y.double(), dim=-1)).mean())

    scores = compute_importance(model, [X])
    assert scores.attn[1] == pytest.approx(score(x + seen["a"]), abs=1e-6)
    assert scores.mlp[1] == pytest.approx(score(x + seen["m"]), abs=1e-6)
    assert scores.block[1] == pytest.approx(score(seen["y"]), abs=1e-6)
    assert scores.attn[1] > 0 and scores.mlp[1] > 0


@pytest.mark.parametrize("family,norm", [("gptj", "ln_1"), ("phi", "input_layernorm"), ("falcon", "input_layernorm")])
def test_shared_norm_goes_only_with_the_whole_block(tmp_path, family, norm):
    model, _ = tiny_model(family)
    spec = get_spec(model)
    layers = spec.get_layers(model)
    apply_drop(model, attn=[1], mlp=[2])
    assert isinstance(getattr(layers[1], norm), nn.LayerNorm | type(getattr(layers[0], norm)))
    assert not isinstance(getattr(layers[1], norm), nn.Identity)  # the MLP of layer 1 still reads it
    apply_drop(model, mlp=[1])
    assert isinstance(getattr(layers[1], norm), nn.Identity)  # both sublayers gone: the norm with them
    expected = _logits(model)
    out = save_dropped(model, tmp_path / "d")
    loaded = load_dropped(out)
    assert isinstance(getattr(spec.get_layers(loaded)[1], norm), nn.Identity)
    assert not isinstance(getattr(spec.get_layers(loaded)[2], norm), nn.Identity)
    torch.testing.assert_close(_logits(loaded.eval()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,parallel", [("stablelm", True), ("gpt_neox", False), ("falcon", False)])
def test_a_family_with_both_layouts_follows_its_config(family, parallel):
    """StableLM, GPT-NeoX and Falcon are parallel or sequential by a config flag: drops match zeroed outputs."""
    key = {"stablelm": "use_parallel_residual", "gpt_neox": "use_parallel_residual", "falcon": "parallel_attn"}[family]
    model, _ = tiny_model(family, **{key: parallel})
    spec = get_spec(model)
    assert spec.is_parallel(model.config) is parallel
    layers = spec.get_layers(model)

    def zero(m, a, o):
        return (torch.zeros_like(o[0]), *o[1:]) if isinstance(o, tuple) else torch.zeros_like(o)

    hooks = [getattr(layers[1], spec.attn).register_forward_hook(zero),
             getattr(layers[2], spec.mlp).register_forward_hook(zero)]
    ref = _logits(model)
    for h in hooks:
        h.remove()
    apply_drop(model, attn=[1], mlp=[2])
    torch.testing.assert_close(_logits(model), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,targets", [("gpt2", {"c_attn", "c_proj", "c_fc"}), ("falcon", {"query_key_value"}),
                                            ("llama", {"q_proj", "down_proj"})])
def test_lora_finds_the_family_linear_layers(family, targets):
    from lightning_drop.lightning.module import DropModule

    module = DropModule(model=f"tiny-{family}")
    module.apply_drop(attn=[1])
    module.add_lora(r=2)  # the default targets: the family's own names (Conv1D for GPT-2)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in module.model.named_modules() if hasattr(m, "lora_A")}
    assert targets <= wrapped
    module.merge_lora()
    assert dropped_layers(module.hf_model) == ([1], [])


@pytest.mark.parametrize("family", HYBRID)
def test_hybrid_mixer_kinds_scores_and_state(family):
    model, _ = tiny_model(family)
    spec = get_spec(model)
    kinds = spec.mixer_kinds(model)
    assert RECURRENT & set(kinds) and "full_attention" in kinds
    scores = compute_importance(model, [X])
    assert scores.extra["mixer_kinds"] == kinds and all(v is not None for v in scores.attn)
    assert score_panel(scores, "t").columns == [f"{i}\n{MIXER_LABELS[k]}" for i, k in enumerate(kinds)]
    recurrent = [i for i, k in enumerate(kinds) if k in RECURRENT]
    before = cache_bytes_by_kind(model, prompt_len=12)
    kind = kinds[recurrent[0]]
    assert before["state_bytes_per_sequence"][kind] > 0
    prompt = X[:1, :10]
    full_gen = model.generate(prompt, max_new_tokens=6, do_sample=False)
    apply_drop(model, attn=recurrent, mlp=[recurrent[-1]])
    assert dropped_layers(model)[0] == recurrent
    after = cache_bytes_by_kind(model, prompt_len=12)
    assert after["state_bytes_per_sequence"][kind] == 0  # no recurrent or conv state for a dropped mixer
    assert after["kv_bytes_per_token"]["full_attention"] == before["kv_bytes_per_token"]["full_attention"] > 0
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, ids)
    assert cached.shape == full_gen.shape
    assert compute_importance(model, [X]).attn[recurrent[0]] is None



DROP = ["drop", "--calibration", "c4-sample", "--num-samples", "4", "--seq-len", "32", "--target", "attn"]


@pytest.mark.parametrize("extra,expect", [
    (["--model", "tiny-qwen3_next", "--num", "1", "--mixers", "linear_attention,attention"], "not a token-mixer kind"),
    (["--model", "tiny-qwen3_next", "--num", "1", "--mixers", "mamba"], "no such token mixer"),
    (["--model", "tiny-jamba", "--num", "4"], "would have none"),
    (["--model", "tiny-jamba", "--num", "1", "--mixers", "mamba", "--target", "mlp"], "restricts --target attn"),
    (["--model", "tiny-lfm2", "--num", "3", "--mixers", "conv"], "cannot drop 3 attn"),
    (["--model", "tiny-nemotron_h", "--num", "3"], "would have none"),  # one sublayer per layer: 3 mixers
    (["--model", "tiny-nemotron_h", "--num", "1", "--mixers", "conv"], "no such token mixer"),
])
def test_bad_mixer_requests_are_one_line_and_write_nothing(tmp_path, capsys, extra, expect):
    (tmp_path / "mine.txt").write_text("keep me")
    before = _fingerprint(tmp_path)
    assert main([*DROP, *extra, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-drop drop: error: ") and expect in err and "\n" not in err, err
    assert _fingerprint(tmp_path) == before


def test_drop_restricted_to_mixer_kinds_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*DROP, "--model", "tiny-qwen3_next", "--num", "2", "--mixers", "linear_attention",
                 "--output", str(out)]) == 0
    report = json.loads((out / "importance.json").read_text())
    kinds = report["mixer_kinds"]
    assert kinds == ["linear_attention"] * 3 + ["full_attention"] and report["mixers"] == ["linear_attention"]
    assert len(report["drop_attn_list"]) == 2 and all(kinds[i] == "linear_attention" for i in report["drop_attn_list"])
    assert report["drop_mlp_list"] == []
    loaded = load_dropped(out)
    assert dropped_layers(loaded) == (report["drop_attn_list"], [])
