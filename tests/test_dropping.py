"""The dropped-model core: exact equivalence, physical removal, KV cache, generation, bad requests."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from lightning_drop import apply_drop, dropped_layers, get_spec
from lightning_drop.models import TINY_FAMILIES, tiny_model

FAMILIES = list(TINY_FAMILIES)
SEQ = 24  # longer than the tiny sliding windows (8), so window handling is exercised


@contextmanager
def zeroed_sublayers(model, attn, mlp):
    """Reference: the original model with chosen sublayer outputs replaced by zeros (hooks, removed after)."""
    spec = get_spec(model)
    layers = spec.get_layers(model)
    handles = []
    for i in attn:
        handles.append(getattr(layers[i], spec.attn).register_forward_hook(
            lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:])))
    for i in mlp:
        handles.append(getattr(layers[i], spec.mlp).register_forward_hook(
            lambda mod, args, out: torch.zeros_like(out)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _inputs(seed=0, batch=2, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn,mlp", [([0, 2], [1]), ([1], [1, 3]), ([0, 1, 2, 3], [2])])
def test_forward_equals_zeroed_reference(family, attn, mlp):
    model, _ = tiny_model(family)
    x = _inputs()
    with torch.no_grad(), zeroed_sublayers(model, attn, mlp):
        ref = model(x).logits
    n_params = sum(p.numel() for p in model.parameters())
    apply_drop(model, attn=attn, mlp=mlp)
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < n_params
    spec = get_spec(model)
    keys = list(model.state_dict())
    for i in attn:
        assert not any(k.startswith(f"{spec.layer_prefix}.{i}.{spec.attn}.") for k in keys)
        for norm in spec.attn_norms:
            assert not any(k.startswith(f"{spec.layer_prefix}.{i}.{norm}.") for k in keys)
    for i in mlp:
        assert not any(k.startswith(f"{spec.layer_prefix}.{i}.{spec.mlp}.") for k in keys)
    assert dropped_layers(model) == (sorted(attn), sorted(mlp))
    assert model.config.drop_attn_list == sorted(attn) and model.config.drop_mlp_list == sorted(mlp)


def _cache_bytes(cache):
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("family", ["llama", "qwen3", "deepseek_v3"])
def test_half_attention_dropped_halves_kv_cache(family):
    model, _ = tiny_model(family)
    x = _inputs(batch=1, seq=16)
    with torch.no_grad():
        base = _cache_bytes(model(x, use_cache=True).past_key_values)
        apply_drop(model, attn=[0, 2])
        dropped = _cache_bytes(model(x, use_cache=True).past_key_values)
    assert base > 0 and dropped * 2 == base


def _left_padded_batch(tok):
    texts = ["The quick brown fox jumps over the lazy dog again and again", "Hi there"]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def _greedy(model, batch, use_cache, n=12):
    return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                          pad_token_id=model.config.pad_token_id)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", [[0], [0, 1, 2], [0, 1, 2, 3]])
def test_cached_generation_equals_uncached_left_padded(family, attn):
    model, tok = tiny_model(family)
    apply_drop(model, attn=attn, mlp=[3])
    batch = _left_padded_batch(tok)
    assert (batch["attention_mask"] == 0).any()  # padding really present
    with torch.no_grad():
        cached = _greedy(model, batch, True)
        uncached = _greedy(model, batch, False)
    assert torch.equal(cached, uncached)


def test_output_attentions_with_dropped_attention_does_not_crash():
    model, _ = tiny_model("llama")
    model.config._attn_implementation = "eager"
    apply_drop(model, attn=[1, 2])
    out = model(_inputs(), output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 2


def test_drops_accumulate_and_block_is_both():
    model, _ = tiny_model("llama")
    apply_drop(model, attn=[1])
    apply_drop(model, attn=[2], mlp=[1])
    assert dropped_layers(model) == ([1, 2], [1])


@pytest.mark.parametrize(
    "attn,mlp,message",
    [
        ([4], [], "out of range"),
        ([-1], [], "out of range"),
        ([1, 1], [], "listed twice"),
        ([0, 1, 2, 3], [0, 1, 2, 3], "every block"),
        (["a"], [], "not an integer"),
    ],
)
def test_bad_requests(attn, mlp, message):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        apply_drop(model, attn=attn, mlp=mlp)
    assert dropped_layers(model) == ([], [])  # nothing half-applied


def test_already_dropped_is_refused():
    model, _ = tiny_model("llama")
    apply_drop(model, attn=[0, 1, 2, 3], mlp=[0, 1, 2])
    with pytest.raises(ValueError, match="every block"):
        apply_drop(model, mlp=[3])
    with pytest.raises(ValueError, match="already dropped"):
        apply_drop(model, attn=[1])


def test_unknown_architecture_names_supported():
    from lightning_drop.architectures import get_spec as gs

    with pytest.raises(ValueError, match="supported model types: .*llama"):
        gs("gpt_bigcode")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_generation_after_save_and_reload(tmp_path, family):
    """Left-padded batch, layer 0's attention dropped: the reloaded checkpoint generates what the in-memory model did."""
    from transformers import AutoModelForCausalLM

    from lightning_drop import save_dropped

    model, tok = tiny_model(family)
    apply_drop(model, attn=[0, 2], mlp=[3])
    batch = _left_padded_batch(tok)
    with torch.no_grad():
        before = _greedy(model, batch, True)
    save_dropped(model, tmp_path / "ckpt", tok)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert dropped_layers(loaded) == ([0, 2], [3])
    with torch.no_grad():
        cached, uncached = _greedy(loaded, batch, True), _greedy(loaded, batch, False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, before)


@pytest.mark.parametrize("field,value,message", [
    ("drop_attn_list", [-1], "out of range"),
    ("drop_attn_list", [4], "out of range"),
    ("drop_mlp_list", [True, False], "needs 4 entries"),
    ("drop_mlp_list", [1, True], "not a mix"),
])
def test_bad_drop_lists_in_a_config_are_refused(tmp_path, field, value, message):
    """A config naming layer -1 must not silently drop the last layer (Python indexing) or crash later."""
    import json

    from lightning_drop import save_dropped
    from lightning_drop.checkpoint import load_dropped

    model, tok = tiny_model("llama")
    apply_drop(model, attn=[1])
    save_dropped(model, tmp_path / "ckpt", tok)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_dropped(tmp_path / "ckpt")


def test_numpy_and_torch_integer_indices_are_accepted():
    np = pytest.importorskip("numpy")
    model, _ = tiny_model("llama")
    apply_drop(model, attn=[np.int64(1), torch.tensor(2)], mlp=[np.int32(3)])
    assert dropped_layers(model) == ([1, 2], [3])


def test_remote_code_family_drop_fails_before_touching_the_model():
    """Baichuan's classes exist only as remote code: dropping says so, and the model is left whole."""
    model, _ = tiny_model("llama")
    model.config.model_type = "baichuan"  # what a config loaded from Baichuan's remote code reports
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="does not ship it: a remote-code family"):
        apply_drop(model, attn=[1])
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert dropped_layers(model) == ([], [])


def test_vision_model_type_points_to_the_vision_package():
    with pytest.raises(ValueError, match="'vit' is a vision transformer: use lightning_drop.vision"):
        get_spec("vit")


def test_output_attentions_under_sdpa_behaves_as_for_the_undropped_model():
    """sdpa returns no attention weights; a dropped model must do the same as its base, not crash."""
    base, _ = tiny_model("llama")
    dropped, _ = tiny_model("llama")
    apply_drop(dropped, attn=[0, 2])
    assert base.config._attn_implementation == "sdpa"
    got = [m(_inputs(), output_attentions=True).attentions for m in (base, dropped)]
    assert got[0] is None or all(a is None for a in got[0])
    assert got[1] is None or all(a is None for a in got[1])
