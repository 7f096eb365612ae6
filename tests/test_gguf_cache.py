"""GGUF files are converted once into the cache, keyed by their content, not their name."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

gguf = pytest.importorskip("gguf")

import lightning_drop.io.gguf_loading as gguf_loading  # noqa: E402
from lightning_drop.export.gguf_deci import _add_tokenizer, _permute  # noqa: E402
from lightning_drop.io.model_loading import load_model  # noqa: E402
from lightning_drop.io.tiny_models import tiny_model  # noqa: E402


def write_llama_gguf(model, tok, path) -> None:
    """A tiny `llama` GGUF (f32) that transformers' GGUF loader reads back to the same logits."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, tok, c.vocab_size)
    w.add_token_scores([0.0] * c.vocab_size)  # transformers derives BPE merges from scores when a file has none
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key.endswith("q_proj.weight"):
            value = _permute(value, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            value = _permute(value, c.num_key_value_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), value.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DROP_CACHE", str(tmp_path / "cache"))
    calls = []
    convert = gguf_loading._clean_from_gguf
    monkeypatch.setattr(gguf_loading, "_clean_from_gguf", lambda *a, **k: calls.append(a[0]) or convert(*a, **k))
    return calls


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_same_name_in_two_directories_gives_two_models(tmp_path, cache):
    ids = torch.randint(0, 256, (1, 9))
    sources = {}
    for name, seed in (("a", 0), ("b", 1)):
        model, tok = tiny_model("llama", seed=seed)
        (tmp_path / name).mkdir()
        write_llama_gguf(model, tok, tmp_path / name / "model.gguf")
        sources[name] = model
    for name, model in sources.items():
        loaded, tok = load_model(str(tmp_path / name / "model.gguf"))
        torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)
        assert tok("hello").input_ids == [71, 68, 75, 75, 78]
    assert len(cache) == 2
    assert len(list((tmp_path / "cache" / "models").glob("gguf-model-*/config.json"))) == 2


def test_edited_file_is_converted_again_and_unchanged_file_is_not(tmp_path, cache):
    ids = torch.randint(0, 256, (1, 9))
    first, tok = tiny_model("llama", seed=0)
    second, _ = tiny_model("llama", seed=1)
    path = tmp_path / "model.gguf"
    write_llama_gguf(first, tok, path)
    torch.testing.assert_close(_logits(load_model(str(path))[0], ids), _logits(first, ids), atol=1e-5, rtol=0)
    load_model(str(path))
    assert len(cache) == 1  # unchanged: the conversion is reused
    # rewrite in place with other weights, same size, mtime restored (as cp -p / touch -r leave it)
    st = path.stat()
    write_llama_gguf(second, tok, tmp_path / "other.gguf")
    assert (tmp_path / "other.gguf").stat().st_size == st.st_size
    with open(path, "r+b") as f:
        f.write((tmp_path / "other.gguf").read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    torch.testing.assert_close(_logits(load_model(str(path))[0], ids), _logits(second, ids), atol=1e-5, rtol=0)
    assert len(cache) == 2
    # a copy elsewhere with the same bytes shares the conversion
    (tmp_path / "copy").mkdir()
    shutil.copy(path, tmp_path / "copy" / "model.gguf")
    load_model(str(tmp_path / "copy" / "model.gguf"))
    assert len(cache) == 2
