"""Dropped checkpoints load three ways; LLM-Drop configs load; writes are atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_drop import apply_drop, dropped_layers, load_dropped, save_dropped
from lightning_drop.io.model_loading import load_model
from lightning_drop.io.tiny_models import tiny_model

X = torch.arange(40).reshape(2, 20) % 250


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def test_deepseek_block_drop_keeps_the_dropped_format_when_layers_would_not_rebuild(tmp_path):
    """DeepSeek-V3's first layers are dense by index: renumbering would turn a MoE layer dense, so no plain shape."""
    model, tok = tiny_model("deepseek_v3")
    apply_drop(model, attn=[0], mlp=[0])
    expected = _logits(model)
    out = save_dropped(model, tmp_path / "ds", tok)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dropped_deepseek_v3" and config["drop_attn_list"] == [0]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)


CLEAN_ENV_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    assert "lightning_drop" not in sys.modules
    try:
        import lightning_drop  # noqa: F401
        raise SystemExit("lightning_drop must not be importable here")
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    x = torch.arange(40).reshape(2, 20) % 250
    with torch.no_grad():
        torch.save(m(x).logits, sys.argv[2])
    """
)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "olmo2"])
def test_trust_remote_code_load_without_the_package(tmp_path, family):
    model, tok = tiny_model(family)
    apply_drop(model, attn=[1, 3], mlp=[0])
    expected = _logits(model)
    out = save_dropped(model, tmp_path / "ckpt", tok)
    script = tmp_path / "clean.py"
    script.write_text(CLEAN_ENV_SCRIPT)
    # The package is hidden from the child: a meta-path finder refuses it, as in an env without it.
    hide = ("import sys\n"
            "class _Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'lightning_drop':\n"
            "            raise ImportError('hidden')\n"
            "sys.meta_path.insert(0, _Hide())\n")
    script.write_text(hide + CLEAN_ENV_SCRIPT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "logits.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


def test_llm_drop_reference_configs_load(tmp_path):
    """LLM-Drop writes the base model_type, all weights, and index lists or per-layer booleans."""
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "ref")  # the reference keeps dropped weights on disk
    tok.save_pretrained(tmp_path / "ref")
    cfg_path = tmp_path / "ref" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["drop_attn_list"] = [False, True, False, True]
    config["drop_mlp_list"] = [2]
    config["auto_map"] = {"AutoConfig": "configuration_dropped_llama.LlamaConfig",
                          "AutoModelForCausalLM": "modeling_dropped_llama.LlamaForCausalLM"}
    cfg_path.write_text(json.dumps(config))
    loaded, _ = load_model(str(tmp_path / "ref"))
    assert dropped_layers(loaded) == ([1, 3], [2])
    expected, _ = tiny_model("llama")
    apply_drop(expected, attn=[1, 3], mlp=[2])
    torch.testing.assert_close(_logits(loaded), _logits(expected), atol=1e-5, rtol=1e-5)


def test_failed_write_leaves_destination_untouched(tmp_path, monkeypatch):
    model, tok = tiny_model("llama")
    dest = save_dropped(model, tmp_path / "ckpt", tok)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    apply_drop(model, attn=[1])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_dropped(model, dest, tok, overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_failed_final_rename_restores_the_previous_checkpoint(tmp_path, monkeypatch):
    from lightning_drop.io import atomic_io

    model, tok = tiny_model("llama")
    dest = save_dropped(model, tmp_path / "ckpt", tok)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == dest and ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_dropped(model, dest, tok, overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_checkpoint_files_get_ordinary_permissions(tmp_path):
    """Temporary directories are private (0700); the renamed checkpoint must be readable like a plain save."""
    umask = os.umask(0o022)
    try:
        model, tok = tiny_model("llama")
        apply_drop(model, attn=[1])
        dest = save_dropped(model, tmp_path / "ckpt", tok)
    finally:
        os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in dest.iterdir()} == {0o644}


def test_missing_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dropped(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope" / "model"))


@pytest.mark.slow
def test_smollm2_answers_and_dropped_roundtrip(tmp_path):
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    apply_drop(model, attn=[0, 5, 20, 25], mlp=[28])
    ids = tok("Paris is the capital of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    dest = save_dropped(model, tmp_path / "smol", tok)
    reloaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_remote_code_family_needs_its_local_code(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "baichuan", "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}}))
    with pytest.raises(FileNotFoundError, match="modeling_baichuan.py"):
        load_model(str(tmp_path))
    (tmp_path / "modeling_baichuan.py").write_text("# the model's own code would be here\n")
    monkeypatch.delenv("LIGHTNING_DROP_TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(ValueError, match="LIGHTNING_DROP_TRUST_REMOTE_CODE=1"):
        load_model(str(tmp_path))


def test_unsupported_architecture_is_refused(tmp_path):
    """No family and no Llama-like layout to infer one from: refused with what did not match (no weights read)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported architecture 'bert': cannot infer a family for 'bert': no layer "
                                         "list at model.layers"):
        load_model(str(tmp_path))
