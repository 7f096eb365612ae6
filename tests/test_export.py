"""Exports to inference-engine formats: Nemotron-NAS (DeciLM) layout and llama.cpp `deci` GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

gguf = pytest.importorskip("gguf")

from lightning_drop.io.dropped_checkpoint import save_dropped  # noqa: E402
from lightning_drop.export import export_gguf, export_nemotron_nas, load_nemotron_nas  # noqa: E402
from lightning_drop.export.nemotron import choose_ffn_mult  # noqa: E402
from lightning_drop.io.nemotron_nas import ffn_mult_to_intermediate_size  # noqa: E402
from lightning_drop.core.modeling_dropped import apply_drop, dropped_layers  # noqa: E402
from lightning_drop.io.tiny_models import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE_PY = ROOT / ".venv-engines" / "bin" / "python"
ENGINE_SCRIPT = ROOT / "benchmarks" / "llamacpp_engine.py"

# GGUF: attention 0 dropped, MLP 1 dropped, block 2 dropped, layer 3 intact
ATTN, MLP = [0, 2], [1, 2]
# Nemotron-NAS: MLP 0 dropped, attention 1 dropped, block 2 dropped, layer 3 intact (vLLM cannot run a
# model whose first sublayer is an MLP, so attention 0 stays)
NAS_ATTN, NAS_MLP = [1, 2], [0, 2]


def _saved(tmp_path, attn, mlp):
    model, tok = tiny_model("llama")
    apply_drop(model, attn=attn, mlp=mlp)
    src = tmp_path / "src"
    save_dropped(model, src, tokenizer=tok)
    return model, tok, src


@pytest.fixture
def dropped_llama(tmp_path):
    return _saved(tmp_path, ATTN, MLP)


@pytest.fixture
def nas_llama(tmp_path):
    return _saved(tmp_path, NAS_ATTN, NAS_MLP)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_ffn_mult_round_trips_to_stored_width():
    for inter, hidden in [(1536, 576), (128, 64), (14336, 4096), (8192, 2048), (300, 64)]:
        mult, width = choose_ffn_mult(inter, hidden)
        assert width % 256 == 0 and width >= inter and width - inter < 256
        assert ffn_mult_to_intermediate_size(mult, hidden) == width
    assert choose_ffn_mult(1536, 576) == (4.0, 1536)  # SmolLM2-135M: no padding needed


def test_nemotron_round_trip_logits(nas_llama, tmp_path):
    model, _, src = nas_llama
    out = export_nemotron_nas(src, tmp_path / "nas", dtype="f32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    blocks = cfg["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, True, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [True, False, True, False]
    assert blocks[0]["attention"]["n_heads_in_group"] == 2 and blocks[1]["attention"]["n_heads_in_group"] is None
    assert ffn_mult_to_intermediate_size(blocks[1]["ffn"]["ffn_mult"], cfg["hidden_size"]) == cfg["intermediate_size"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate_proj.weight").shape[0] == cfg["intermediate_size"]
    assert not any(k.startswith(("model.layers.1.self_attn", "model.layers.2.", "model.layers.0.mlp")) for k in keys)
    assert "model.layers.1.input_layernorm.weight" not in keys
    assert "model.layers.0.post_attention_layernorm.weight" not in keys

    loaded, tok = load_nemotron_nas(out)
    assert tok is not None
    assert dropped_layers(loaded) == (NAS_ATTN, NAS_MLP)
    ids = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)
    assert loaded.config.intermediate_size == model.config.intermediate_size  # zero padding stripped again


def test_nemotron_config_loads_with_remote_code_class(nas_llama, tmp_path):
    from transformers import AutoConfig

    _, _, src = nas_llama
    out = export_nemotron_nas(src, tmp_path / "nas", dtype="bf16")
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    # vLLM's DeciLMForCausalLM reads these as attributes
    assert cfg.block_configs[1].attention.no_op is True
    assert cfg.block_configs[0].attention.n_heads_in_group == 2
    assert cfg.block_configs[3].ffn.ffn_mult == pytest.approx(6.0)


def test_load_model_reads_nemotron_layout(nas_llama, tmp_path):
    from lightning_drop.io.model_loading import load_model

    model, _, src = nas_llama
    out = export_nemotron_nas(src, tmp_path / "nas", dtype="f32")
    loaded, _ = load_model(str(out))
    ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_gguf_layout(dropped_llama, tmp_path):
    _, _, src = dropped_llama
    path = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    assert not list(tmp_path.glob(".m.gguf*"))  # no temporary left behind
    reader = gguf.GGUFReader(path)
    f = reader.fields
    assert f["general.architecture"].contents() == "deci"
    # layer 0: attention dropped -> zero one-head stub (llama.cpp takes the head size from layer 0)
    # layer 1: MLP dropped but attention kept -> zero 32-wide FFN stub (deci's n_ff == 0 skips the residual)
    # layer 2: whole block dropped -> 0 heads, n_ff 0, no tensors
    assert f["deci.attention.head_count"].contents() == [1, 4, 0, 4]
    assert f["deci.attention.head_count_kv"].contents() == [1, 2, 0, 2]
    assert f["deci.feed_forward_length"].contents() == [128, 32, 0, 128]
    assert f["deci.attention.key_length"].contents() == 16
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(f["tokenizer.ggml.tokens"].contents()) == 320
    names = {t.name: t for t in reader.tensors}
    assert not any(n.startswith("blk.2.") for n in names)
    assert "blk.1.attn_q.weight" in names and "blk.3.ffn_down.weight" in names
    stub = names["blk.1.ffn_gate.weight"].data
    assert stub.shape == (32, 64) and not stub.any()
    assert not names["blk.0.attn_output.weight"].data.any()


def test_gguf_permutes_q_and_k_like_llama_cpp(tmp_path):
    model, tok = tiny_model("llama")
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tok)
    names = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    n_head = model.config.num_attention_heads
    expected = q.reshape(n_head, 2, q.shape[0] // n_head // 2, q.shape[1]).swapaxes(1, 2).reshape(q.shape)
    assert torch.equal(torch.from_numpy(names["blk.0.attn_q.weight"].copy()), expected)
    v = model.model.layers[0].self_attn.v_proj.weight.detach()
    assert torch.equal(torch.from_numpy(names["blk.0.attn_v.weight"].copy()), v)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_dtypes(dtype, tmp_path):
    model, tok = tiny_model("llama")
    path = export_gguf(model, tmp_path / f"m-{dtype}.gguf", dtype=dtype, tokenizer=tok)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == dtype.upper()


def test_unsupported_family_and_patterns(tmp_path):
    model, tok = tiny_model("qwen3")
    with pytest.raises(ValueError, match="Llama-family"):
        export_nemotron_nas(model, tmp_path / "a", tokenizer=tok)
    with pytest.raises(ValueError, match="Llama-family"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=tok)
    mistral, tok = tiny_model("mistral")  # tiny mistral has an 8-token sliding window
    with pytest.raises(ValueError, match="sliding window"):
        export_nemotron_nas(mistral, tmp_path / "b", tokenizer=tok)
    llama, tok = tiny_model("llama")
    apply_drop(llama, attn=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="every attention layer"):
        export_nemotron_nas(llama, tmp_path / "c", tokenizer=tok)
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(llama, tmp_path / "d.gguf", dtype="q4_k", tokenizer=tok)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    with pytest.raises(FileNotFoundError):
        export_nemotron_nas(tmp_path / "missing", tmp_path / "e")


def test_nemotron_refuses_a_model_that_starts_with_an_mlp(tmp_path):
    """vLLM's DeciLM layer starts the residual stream in attention: a first sublayer that is an MLP fails there
    on every request, so the export refuses it before writing; GGUF (its own stubs) still takes it."""
    model, tok = tiny_model("llama")
    apply_drop(model, attn=[0])
    with pytest.raises(ValueError, match="layer 0's attention is dropped but its MLP is kept.*--keep 0"):
        export_nemotron_nas(model, tmp_path / "a", tokenizer=tok)
    export_gguf(model, tmp_path / "a.gguf", dtype="f32", tokenizer=tok)
    empty_first, _ = tiny_model("llama")
    apply_drop(empty_first, attn=[0, 1], mlp=[0])  # block 0 empty: layer 1's MLP would come first
    with pytest.raises(ValueError, match="layer 1's attention"):
        export_nemotron_nas(empty_first, tmp_path / "b", tokenizer=tok)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    fine, _ = tiny_model("llama")
    apply_drop(fine, attn=[0, 2], mlp=[0, 1])  # block 0 empty, then attention 1 starts the stream
    loaded, _ = load_nemotron_nas(export_nemotron_nas(fine, tmp_path / "c", dtype="f32", tokenizer=tok))
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(_logits(loaded, ids), _logits(fine, ids), atol=1e-5, rtol=0)


def test_export_refuses_non_silu_mlp(tmp_path):
    model, tok = tiny_model("llama", hidden_act="gelu")
    for export, out in ((export_nemotron_nas, tmp_path / "a"), (export_gguf, tmp_path / "a.gguf")):
        with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
            export(model, out, tokenizer=tok)
        assert not out.exists()


def test_mistral_without_window_exports_like_llama(tmp_path):
    model, tok = tiny_model("mistral", sliding_window=None)
    apply_drop(model, attn=[1], mlp=[2])
    out = export_nemotron_nas(model, tmp_path / "nas", dtype="f32", tokenizer=tok)
    loaded, _ = load_nemotron_nas(out)
    ids = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_llama_cpp_matches_dropped_smollm2(tmp_path):
    """The exported GGUF run by llama.cpp (llama-cpp-python, separate venv) agrees with our model."""
    if not ENGINE_PY.is_file():
        pytest.skip(f"{ENGINE_PY} absent: build it with `python3 -m venv .venv-engines && "
                    f".venv-engines/bin/pip install numpy llama-cpp-python`")
    probe = subprocess.run([str(ENGINE_PY), "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"llama_cpp does not import in .venv-engines: {probe.stderr.strip().splitlines()[-1:]}")
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(ENGINE_SCRIPT), "--check-only", "--dtype", "f32",
                          "--eval-docs", "2", "--calib-docs", "8", "--work-dir", str(tmp_path), "--json", str(report)],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    for name in ("base", "dropped"):
        r = result[name]
        assert r["kv_cache_type"] == "f32"  # an f32 check with llama.cpp's default f16 KV cache proves less
        print(name, "max |logprob diff| of the next target token", r["max_target_logprob_diff"],
              "over the full vocabulary", r["max_logprob_diff"])
        # measured with f32 weights but llama.cpp's default f16 KV cache (2x256 positions): next target token
        # 6.9e-3 base / 1.05e-2 dropped; full vocabulary 2.6e-2 / 4.3e-2 (the far tail, log-probs near -30,
        # carries the largest differences). Not yet re-measured with the f32 cache (should only shrink).
        assert r["max_target_logprob_diff"] < 3e-2
        assert r["max_logprob_diff"] < 0.1
        assert r["greedy_agree"] and r["tokenizer_agree"]
    # the export adds no error beyond the engine's own: dropped within 3x of the undropped model's
    assert result["dropped"]["max_logprob_diff"] < 3 * result["base"]["max_logprob_diff"] + 1e-3


def test_nemotron_writes_rope_theta_at_top_level(tmp_path):
    """transformers 5 keeps theta inside `rope_parameters`; engines read top-level `rope_theta` (NVIDIA's
    layout). A non-default theta must reach config.json and survive the round trip."""
    model, tok = tiny_model("llama", rope_theta=1234.5)
    assert model.config.rope_parameters["rope_theta"] == 1234.5
    apply_drop(model, attn=[1])
    out = export_nemotron_nas(model, tmp_path / "nas", dtype="f32", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 1234.5
    assert "rope_parameters" not in cfg and "rope_scaling" not in cfg  # plain rope: no scaling block
    from transformers import AutoConfig

    remote = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert remote.rope_parameters["rope_theta"] == 1234.5
    loaded, _ = load_nemotron_nas(out)
    assert loaded.config.rope_parameters["rope_theta"] == 1234.5
    ids = torch.randint(0, 256, (1, 48))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)
    # the theta matters for these logits: the default one gives different ones
    default, _ = tiny_model("llama")
    apply_drop(default, attn=[1])
    assert not torch.allclose(_logits(default, ids), _logits(model, ids), atol=1e-3)


def test_nemotron_writes_llama3_rope_scaling_at_top_level(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model, tok = tiny_model("llama", rope_theta=500000.0, rope_scaling=dict(scaling),
                            max_position_embeddings=512)  # (transformers writes theta into the dict it gets)
    out = export_nemotron_nas(model, tmp_path / "nas", dtype="f32", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] == scaling and "rope_parameters" not in cfg
    loaded, _ = load_nemotron_nas(out)
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(0, 256, (1, 100))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_nemotron_keeps_smollm2_rope_theta(tmp_path):
    from lightning_drop.io.model_loading import load_model

    model, tok = load_model("smollm2-135m")
    theta = model.config.rope_parameters["rope_theta"]
    assert theta == 100000.0  # SmolLM2-135M's, not the 10000 an engine would assume without the key
    apply_drop(model, attn=[3, 7])
    out = export_nemotron_nas(model, tmp_path / "nas", dtype="bf16", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == theta and "rope_scaling" not in cfg and "rope_parameters" not in cfg
