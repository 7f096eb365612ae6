"""The dropped-model core: exact equivalence, physical removal, KV cache, generation, bad requests."""

from __future__ import annotations


import pytest
import torch

from lightning_drop import apply_drop, dropped_layers
from lightning_drop.io.tiny_models import TINY_FAMILIES, tiny_model

FAMILIES = list(TINY_FAMILIES)
SEQ = 24  # longer than the tiny sliding windows (8), so window handling is exercised


def _inputs(seed=0, batch=2, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


def _cache_bytes(cache):
    """Bytes of keys and values; the boolean token counter a dropped layer 0 keeps holds one byte in all."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                assert t.untyped_storage().nbytes() == 1
            elif isinstance(t, torch.Tensor):
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
    from lightning_drop.core.architectures import get_spec as gs

    with pytest.raises(ValueError, match="supported model types: .*llama"):
        gs("rwkv")  # a pure recurrent model: no family (gpt_bigcode, named here before, is one now)


def test_remote_code_family_drop_fails_before_touching_the_model():
    """Baichuan's classes exist only as remote code: dropping says so, and the model is left whole."""
    model, _ = tiny_model("llama")
    model.config.model_type = "baichuan"  # what a config loaded from Baichuan's remote code reports
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="does not ship it: a remote-code family"):
        apply_drop(model, attn=[1])
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert dropped_layers(model) == ([], [])


def test_output_attentions_under_sdpa_behaves_as_for_the_undropped_model():
    """sdpa returns no attention weights; a dropped model must do the same as its base, not crash."""
    base, _ = tiny_model("llama")
    dropped, _ = tiny_model("llama")
    apply_drop(dropped, attn=[0, 2])
    assert base.config._attn_implementation == "sdpa"
    got = [m(_inputs(), output_attentions=True).attentions for m in (base, dropped)]
    assert got[0] is None or all(a is None for a in got[0])
    assert got[1] is None or all(a is None for a in got[1])
