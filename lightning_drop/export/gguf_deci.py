"""Dropped Llama-family models as GGUF files for llama.cpp's `deci` architecture.

The `deci` architecture (llama.cpp `src/models/deci.cpp`, written for NVIDIA's Nemotron-NAS models) reads
per-layer arrays `deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length`:
0 heads = no attention in that layer (no tensors, no KV cache), n_ff 0 = no feed-forward. This writer
produces them with the `gguf` package's `GGUFWriter`, with the tokenizer (`tokenizer.ggml.*`) and the Q/K
row permutation for rope that llama.cpp's own converter (`conversion/deci.py`, `DeciModel`) applies.

Three limits of llama.cpp's deci graph (read in the llama-cpp-python 0.3.36 sources, confirmed by running it)
are worked around with exact zero "stubs", so outputs stay identical to the dropped model:
- the head size is derived from layer 0's head count, so a model whose layer-0 attention is dropped gets a
  one-head attention in layer 0 whose q/k/v/o weights are all zero (it adds exactly 0);
- a layer with n_ff == 0 skips its residual update entirely (`continue` before `inpL = cur`), which loses
  the attention output of a layer that keeps attention, and the last layer's row selection; such layers
  (MLP dropped but attention kept, or the last layer) get a 32-wide feed-forward of zeros instead.
  Whole dropped blocks elsewhere are written as true 0-head, 0-n_ff layers (no tensors at all).

`dtype`: f32, f16, bf16 (norms stay f32, as llama.cpp's converter does) or q8_0 (2-D weights whose rows
are multiples of 32; others fall back to f16).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.atomic_io import atomic_file
from ..io.output_targets import check_output
from ..errors import UserError, param
from .nemotron import model_and_tokenizer, block_plan, check_llama_family

DTYPES = ("f32", "f16", "bf16", "q8_0")
STUB_FFN = 32


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q/k reordered from HF's rotate-half layout to llama.cpp's interleaved rope pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer_name(tok: Any) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, from its pre-tokenizer structure."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export handles byte-level BPE tokenizers only, got a {model.get('type')} tokenizer")
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if not model.get("merges"):
        return "default"  # no merges: any split yields the same byte tokens
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"  # SmolLM / SmolLM2 (digits split one by one, then GPT-2 regex)
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    raise UserError(f"GGUF export: no llama.cpp pre-tokenizer known for {kinds}; use llama.cpp's converter")


def _add_tokenizer(writer: Any, tok: Any, vocab_size: int, pre: str | None = None) -> None:
    import gguf

    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)


def _encode(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for one tensor in the requested file dtype."""
    import gguf

    t = t.detach().float().contiguous()
    arr = t.numpy()
    if t.dim() <= 1 or dtype == "f32":
        return arr.astype(np.float32), None
    if dtype == "f16":
        return arr.astype(np.float16), None
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "q8_0":
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def deci_layer_plan(model: nn.Module) -> list[dict]:
    """Per layer: {"n_head", "n_head_kv", "n_ff", "attn": real|stub|none, "ffn": real|stub|none}."""
    config = model.config
    n = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    attn, mlp = block_plan(model, "GGUF (deci)")
    plan = []
    for i in range(n):
        a = "none" if i in attn else "real"
        if a == "none" and i == 0:
            a = "stub"
        f = "none" if i in mlp else "real"
        if f == "none" and (a != "none" or i == n - 1):
            f = "stub"
        plan.append({
            "attn": a, "ffn": f,
            "n_head": {"real": heads, "stub": 1, "none": 0}[a],
            "n_head_kv": {"real": kv, "stub": 1, "none": 0}[a],
            "n_ff": {"real": config.intermediate_size, "stub": STUB_FFN, "none": 0}[f],
        })
    return plan


def export_gguf(src: Any, out_file: str | os.PathLike, dtype: str = "f16", tokenizer: Any = None,
                tokenizer_pre: str | None = None, overwrite: bool = False) -> Path:
    """Write a (dropped) Llama-family model as a llama.cpp `deci` GGUF file, atomically.

    An existing `out_file` is replaced only with `overwrite`.

    `tokenizer_pre` overrides the detected llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`), e.g.
    "smollm" for a SmolLM2 tokenizer whose digit-splitting step was lost in a conversion.
    """
    import gguf

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    check_output(out_file, kind="file", overwrite=overwrite,
                 sources=[src] if isinstance(src, (str, os.PathLike)) else [])
    model, tok = model_and_tokenizer(src, tokenizer)
    if tok is None:
        raise UserError(f"GGUF export needs the model's tokenizer: pass {param('tokenizer', '...', 'REF')}")
    config = model.config
    check_llama_family(config, "GGUF (deci)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF (deci) export: attention/MLP biases are not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF (deci) export: llama.cpp's deci uses SiLU, model has '{config.hidden_act}'")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"GGUF (deci) export: rope type '{rope_type}' is not supported (only default rope)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    plan = deci_layer_plan(model)
    n, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    out_file = Path(out_file)
    with atomic_file(out_file) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "dropped-model")).name or "dropped-model")
        writer.add_block_count(n)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length([p["n_ff"] for p in plan])
        writer.add_head_count([p["n_head"] for p in plan])
        writer.add_head_count_kv([p["n_head_kv"] for p in plan])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float(theta))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(ftype)
        _add_tokenizer(writer, tok, config.vocab_size, tokenizer_pre)

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, n)
        for key, value in _tensors(model, plan, head_dim):
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"GGUF (deci) export: no GGUF name for tensor '{key}'")
            arr, raw = _encode(value, dtype)
            writer.add_tensor(name, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_file


def _tensors(model: nn.Module, plan: list[dict], head_dim: int):
    """(HF name, tensor) in file order: real weights (q/k permuted) plus the zero stubs of `plan`."""
    config = model.config
    hidden = config.hidden_size
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        yield key, state[key]
    if not tied:
        yield "lm_head.weight", state["lm_head.weight"]
    for i, p in enumerate(plan):
        pre = f"model.layers.{i}."
        if p["attn"] == "real":
            yield pre + "input_layernorm.weight", state[pre + "input_layernorm.weight"]
            yield pre + "self_attn.q_proj.weight", _permute(state[pre + "self_attn.q_proj.weight"], p["n_head"])
            yield pre + "self_attn.k_proj.weight", _permute(state[pre + "self_attn.k_proj.weight"], p["n_head_kv"])
            yield pre + "self_attn.v_proj.weight", state[pre + "self_attn.v_proj.weight"]
            yield pre + "self_attn.o_proj.weight", state[pre + "self_attn.o_proj.weight"]
        elif p["attn"] == "stub":
            yield pre + "input_layernorm.weight", torch.ones(hidden)
            for proj in ("q_proj", "k_proj", "v_proj"):
                yield pre + f"self_attn.{proj}.weight", torch.zeros(head_dim, hidden)
            yield pre + "self_attn.o_proj.weight", torch.zeros(hidden, head_dim)
        if p["ffn"] == "real":
            for name in ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                yield pre + name + ".weight", state[pre + name + ".weight"]
        elif p["ffn"] == "stub":
            yield pre + "post_attention_layernorm.weight", torch.ones(hidden)
            yield pre + "mlp.gate_proj.weight", torch.zeros(STUB_FFN, hidden)
            yield pre + "mlp.up_proj.weight", torch.zeros(STUB_FFN, hidden)
            yield pre + "mlp.down_proj.weight", torch.zeros(hidden, STUB_FFN)
