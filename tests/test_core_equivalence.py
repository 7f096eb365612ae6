"""The dropped-model core over every family from one place: decoders and vision encoders alike.

Dropped = zeroed (the original model with the chosen sublayers' residual contributions set to zero),
physical removal, the run-time check that dropped sublayers never run, save/reload with the same outputs
(sublayer drops and block-only plain checkpoints); cached = uncached generation for the families that generate.
In a family whose layers hold one sublayer each (Nemotron-H) a drop index names its layer's one sublayer
(`layer_drops`).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from safetensors import safe_open

from lightning_drop import apply_drop, dropped_layers, get_spec, load_dropped, save_dropped
from lightning_drop.core.architectures import VISION_SPECS
from lightning_drop.errors import UserError
from lightning_drop.io.dropped_checkpoint import checkpoint_kind
from lightning_drop.io.family_inference import zeroed_outputs
from lightning_drop.io.tiny_models import TINY_FAMILIES, tiny_model
from lightning_drop.measure.sublayer_check import check_really_skipped, sublayer_call_counts

TEXT = list(TINY_FAMILIES)
VISION = [spec.family for spec in VISION_SPECS]
ALL = TEXT + VISION
SEQ = 24  # longer than the tiny sliding windows (8), so window handling is exercised
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def build(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """(tiny random-init model in eval mode, an input batch for it)."""
    if family in TINY_FAMILIES:
        model, _ = tiny_model(family)
        return model.eval(), torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    from lightning_drop.io.vision_loading import tiny_vision_model

    return tiny_vision_model(family), PIXELS


def output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(pixel_values=x) if x.dim() == 4 else model(x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def refuses_every_mixer(model, attn) -> bool:
    """A hybrid keeps at least one token mixer: dropping them all is refused, and nothing changes."""
    spec = get_spec(model)
    if not spec.mixers or len(attn) < len(spec.get_layers(model)):
        return False
    with pytest.raises(UserError, match="every token mixer"):
        apply_drop(model, attn=attn)
    assert dropped_layers(model) == ([], [])
    return True


# FlopCounterMode's module tracker fails inside the hub-kernel wrappers of Mamba/conv/DeltaNet mixers
# ("Expected gradient function to be set"); their drops are proven by the zeroed reference and generation.
NO_FLOP_COUNT = {"qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "jamba", "bamba", "lfm2", "granitemoehybrid",
                 "nemotron_h"}


def zeroed_sublayers(model, attn, mlp):
    """Reference: the ORIGINAL model with the outputs of `spec.attn_out` / `spec.mlp_out` (the sublayer's whole
    contribution: after LayerScale / post-norm) replaced by zeros."""
    return zeroed_outputs(model, get_spec(model), attn, mlp)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("attn,mlp", [([0, 2], [1]), ([1], [1, 3]), ([0, 1, 2, 3], [2])])
def test_forward_equals_zeroed_reference(family, attn, mlp, layer_drops):
    model, x = build(family)
    attn, mlp, gone = layer_drops(model, attn, mlp)
    if refuses_every_mixer(model, attn):
        return
    with zeroed_sublayers(model, attn, mlp):
        ref = output(model, x)
    assert not torch.allclose(ref, output(model, x))  # the reference really differs from the full model
    n_params = sum(p.numel() for p in model.parameters())
    apply_drop(model, attn=attn, mlp=mlp)
    torch.testing.assert_close(output(model, x), ref, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < n_params
    spec = get_spec(model)
    prefixes = spec.layer_prefixes(model)
    keys = list(model.state_dict())
    parallel = spec.inputs == "text" and spec.is_parallel(model.config)  # a shared norm stays while one sublayer does
    for indices, names in ((attn, spec.attn_modules(parallel=parallel)), (mlp, spec.mlp_modules())):
        for i in indices:
            for name in names:  # the sublayer, its norms and (DINO) its LayerScale are gone
                assert not any(k.startswith(prefixes[i] + name + ".") for k in keys), (i, name)
    assert dropped_layers(model) == gone
    assert model.config.drop_attn_list == sorted(attn) and model.config.drop_mlp_list == sorted(mlp)


@pytest.mark.parametrize("family", [f for f in ALL if f not in NO_FLOP_COUNT])
def test_dropped_sublayers_never_run(family):
    model, x = build(family)
    full = copy.deepcopy(model)
    apply_drop(model, attn=[0, 3], mlp=[1, 3])
    for r in check_really_skipped(model, x):
        for kind, dropped in (("attn", (0, 3)), ("mlp", (1, 3))):
            assert r[f"{kind}_calls"] > 0  # the slot is reached either way (a stand-in is called)
            if r["block"] in dropped:
                assert r[f"{kind}_flops"] == 0 and r[f"{kind}_compute_calls"] == 0, r
            else:
                assert r[f"{kind}_flops"] > 0 and r[f"{kind}_compute_calls"] > 0, r
    full_rows = check_really_skipped(full, x)  # the same slots of the full model do the work
    assert full_rows[0]["attn_flops"] > 0 and full_rows[1]["mlp_flops"] > 0


@pytest.mark.parametrize("family", ["llama", "gemma2", "vit", "swinv2"])
def test_really_skipped_catches_original_module_put_back(family):
    """The drop list still says attention 1 is gone but its original module is back in the slot:
    `dropped_layers` (which reads the modules) no longer sees the drop; the run-time check, which trusts the
    declared list and watches what runs, must. Then only the attention's norm put back: no FLOPs, one call."""
    full, x = build(family)
    spec = get_spec(full)
    model = apply_drop(copy.deepcopy(full), attn=[1], mlp=[2])
    check_really_skipped(model, x)
    setattr(spec.get_layers(model)[1], spec.attn, getattr(spec.get_layers(full)[1], spec.attn))
    assert dropped_layers(model)[0] == [] and model.config.drop_attn_list == [1]
    names = spec.block_names(model)
    with pytest.raises(RuntimeError, match=rf"block {names[1]}: dropped attn ran \([1-9]\d* FLOPs"):
        check_really_skipped(model, x)
    model = apply_drop(copy.deepcopy(full), attn=[2])
    norm = spec.attn_norms[0]
    setattr(spec.get_layers(model)[2], norm, getattr(spec.get_layers(full)[2], norm))
    rows = sublayer_call_counts(model, x)
    assert rows[2]["attn_flops"] == 0 and rows[2]["attn_compute_calls"] == 1
    with pytest.raises(RuntimeError, match=rf"block {names[2]}: dropped attn ran \(0 FLOPs, 1 calls"):
        check_really_skipped(model, x)


def _saved_keys(directory):
    keys = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


@pytest.mark.parametrize("family", ALL)
def test_sublayer_drop_roundtrips_through_save_and_reload(tmp_path, family, layer_drops):
    model, x = build(family)
    spec = get_spec(model)
    attn, mlp, dropped = layer_drops(model, [0, 2], [1])
    apply_drop(model, attn=attn, mlp=mlp)
    expected = output(model, x)
    out = save_dropped(model, tmp_path / "drop")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"dropped_{spec.model_types[0]}"
    assert config["drop_attn_list"] == attn and config["drop_mlp_list"] == mlp
    auto = getattr(transformers, spec.auto_class(type(model).__name__))
    assert config["auto_map"][auto.__name__] == f"modeling_dropped.{type(model).__name__}"
    for name in ("modeling_dropped.py", "architectures.py", "decoder_families.py", "vision_families.py"):
        assert (out / name).is_file(), name
    prefixes = spec.layer_prefixes(model)
    parallel = spec.inputs == "text" and spec.is_parallel(model.config)
    gone = [prefixes[i] + n + "." for i in attn for n in spec.attn_modules(parallel=parallel)]
    gone += [prefixes[i] + n + "." for i in mlp for n in spec.mlp_modules()]
    assert not any(k.startswith(g) for k in _saved_keys(out) for g in gone)
    for loaded in (auto.from_pretrained(out), load_dropped(out)):  # registered classes, no trust_remote_code
        assert type(loaded).__name__ == type(model).__name__
        torch.testing.assert_close(output(loaded.eval(), x), expected, atol=1e-5, rtol=1e-5)
        assert dropped_layers(loaded) == dropped


@pytest.mark.parametrize("family,blocks,plain", [
    # gemma2: sliding/full alternate; qwen2: sliding only up to max_window_layers. Types follow their layers.
    ("gemma2", [0, 3], True), ("qwen2", [0, 3], True), ("llama", [0, 3], True),
    ("vit", [1, 3], True), ("dinov2", [0], True), ("dinov3_vit", [2], True),
    ("swinv2", [1], True),    # stage 0 keeps block 0 (no shift): plain with depths [1, 2]
    ("swinv2", [2], False),   # stage 1 block 1 (shifted) would become block 0: dropped format
])
def test_block_only_drop_is_a_plain_checkpoint(tmp_path, family, blocks, plain):
    model, x = build(family)
    spec = get_spec(model)
    types_before = list(getattr(model.config, "layer_types", None) or [])  # not every family has per-layer types
    apply_drop(model, attn=blocks, mlp=blocks)
    assert checkpoint_kind(model) == "blocks"
    expected = output(model, x)
    out = save_dropped(model, tmp_path / "blocks")
    config = json.loads((out / "config.json").read_text())
    if plain:
        assert config["model_type"] == spec.model_types[0] and "auto_map" not in config
        assert not (out / "modeling_dropped.py").exists()
        assert config["lightning_drop"]["dropped_blocks"] == blocks
        assert spec.num_layers(config) == 4 - len(blocks)
        if family == "swinv2":
            assert config["depths"] == [1, 2] and config["lightning_drop"]["original_depths"] == [2, 2]
        if types_before:
            assert config["layer_types"] == [t for i, t in enumerate(types_before) if i not in blocks]
        cls = getattr(transformers, config["architectures"][0])  # a plain transformers class reads it
        loaded = cls.from_pretrained(out)
        assert type(loaded).__module__.startswith("transformers.models.")
    else:
        assert config["model_type"] == f"dropped_{family}"
        loaded = load_dropped(out)
    torch.testing.assert_close(output(loaded.eval(), x), expected, atol=1e-5, rtol=1e-5)


def _left_padded_batch(tok):
    texts = ["The quick brown fox jumps over the lazy dog again and again", "Hi there"]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def _greedy(model, batch, use_cache, n=12):
    return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                          pad_token_id=model.config.pad_token_id)


@pytest.mark.parametrize("family", TEXT)
@pytest.mark.parametrize("attn", [[0], [0, 1, 2], [0, 1, 2, 3]])
def test_cached_generation_equals_uncached_left_padded(family, attn, layer_drops):
    model, tok = tiny_model(family)
    attn, mlp, _ = layer_drops(model, attn, [3])
    if refuses_every_mixer(model, attn):
        return
    apply_drop(model, attn=attn, mlp=mlp)
    batch = _left_padded_batch(tok)
    assert (batch["attention_mask"] == 0).any()  # padding really present
    with torch.no_grad():
        cached = _greedy(model, batch, True)
        uncached = _greedy(model, batch, False)
    assert torch.equal(cached, uncached)


def test_a_dropped_first_attention_keeps_only_a_token_count():
    """Transformers reads a cache's length from layer 0: with layer 0's attention dropped that slot holds one
    boolean expanded to the tokens seen (no per-token storage), and reports them."""
    from lightning_drop.measure.memory import kv_cache_bytes_per_token

    model, _ = tiny_model("llama")  # 4 layers
    per_layer = kv_cache_bytes_per_token(model) / 4
    apply_drop(model, attn=[0, 1])
    assert kv_cache_bytes_per_token(model) == 2 * per_layer
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (2, 7)), past_key_values=cache, use_cache=True)
        model(input_ids=torch.randint(0, 100, (2, 1)), past_key_values=cache, use_cache=True)
    slot = cache.layers[0]
    assert cache.get_seq_length() == 8 and slot.keys.shape == (2, 1, 8, 1) and slot.keys.dtype == torch.bool
    assert slot.keys.untyped_storage().nbytes() == 1 and slot.values.untyped_storage().nbytes() == 1


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_generation_after_save_and_reload(tmp_path, family):
    """Left-padded batch, layer 0's attention dropped: the reloaded checkpoint generates what the in-memory model did."""
    from transformers import AutoModelForCausalLM

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
