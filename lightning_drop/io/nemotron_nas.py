"""The Nemotron-NAS (`DeciLMForCausalLM`) checkpoint format, read back as this package's dropped Llama model.

`config.json["block_configs"][i]` marks attention / MLP of block i as `no_op`; the rest are Llama modules with
Llama tensor names. Engines derive each MLP's width from `ffn_mult` (`ffn_mult_to_intermediate_size`), so the
writer (`lightning_drop.export.nemotron`) and this reader share that formula. Loading lives here, below the
exporters, because `lightning_drop.io.model_loading.load_model` opens such directories like any other checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

FFN_MULTIPLE = 256


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width engines derive from `ffn_mult` (same formula as vLLM and llama.cpp)."""
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), FFN_MULTIPLE)


def load_nemotron_nas(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a Nemotron-NAS directory, as this package's dropped Llama model.

    Reads exports of `export_nemotron_nas` and other Nemotron-NAS checkpoints whose blocks are each either
    a no-op or the same Llama attention/MLP (one `n_heads_in_group`, one `ffn_mult`, no `replace_with_linear`);
    heterogeneous widths, as in NVIDIA's 49B/51B models, raise ValueError.
    """
    import transformers
    from safetensors.torch import load_file

    from .dropped_checkpoint import read_config, require_weights
    from ..core.modeling_dropped import apply_drop

    directory = Path(directory)
    cfg = read_config(directory)
    if cfg.get("model_type") not in ("nemotron-nas", "deci") or "block_configs" not in cfg:
        raise UserError(f"{directory} is not a Nemotron-NAS checkpoint (model_type 'nemotron-nas' with block_configs)")
    blocks = cfg["block_configs"]
    n, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    if len(blocks) != n:
        raise UserError(f"{directory}: {len(blocks)} block_configs for {n} layers")
    attn = [i for i, b in enumerate(blocks) if b["attention"].get("no_op")]
    mlp = [i for i, b in enumerate(blocks) if b["ffn"].get("no_op")]
    if any(b["attention"].get("replace_with_linear") or b["ffn"].get("replace_with_linear") for b in blocks):
        raise UserError(f"{directory}: 'replace_with_linear' blocks have no Llama equivalent; cannot load")
    groups = {b["attention"]["n_heads_in_group"] for i, b in enumerate(blocks) if i not in attn}
    mults = {b["ffn"]["ffn_mult"] for i, b in enumerate(blocks) if i not in mlp}
    if len(groups) > 1 or len(mults) > 1:
        raise UserError(
            f"{directory}: blocks differ in n_heads_in_group {sorted(groups)} or ffn_mult {sorted(mults)}; "
            f"only uniform Llama blocks (with no-ops) can be loaded"
        )
    kv_heads = heads // groups.pop() if groups else cfg.get("num_key_value_heads", heads)
    width = ffn_mult_to_intermediate_size(mults.pop(), hidden) if mults else cfg.get("intermediate_size")
    meta = cfg.get("lightning_drop") or {}

    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    inter = meta.get("intermediate_size", width)
    if inter != width and all(_zero_tail(state, k, inter) for k in state if ".mlp." in k):
        for k in list(state):
            if k.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
                state[k] = state[k][:inter]
            elif k.endswith("down_proj.weight"):
                state[k] = state[k][:, :inter]
    else:
        inter = width

    llama_cfg = {k: v for k, v in cfg.items() if k not in (
        "block_configs", "auto_map", "architectures", "model_type", "lightning_drop", "transformers_version")}
    llama_cfg.update(intermediate_size=inter, num_key_value_heads=kv_heads)
    config = transformers.LlamaConfig(**llama_cfg)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    apply_drop(model, attn=attn, mlp=mlp)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = set(expected) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    mismatched = [(k, tuple(v.shape), expected[k]) for k, v in state.items()
                  if k in expected and tuple(v.shape) != expected[k]]
    require_weights(directory, missing, set(state) - set(expected), mismatched)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype).eval()
    # Buffers (rotary inv_freq) were created on meta: rebuild them on CPU.
    _rebuild_rotary(model)
    return model, load_nemotron_tokenizer(directory, config)


def load_nemotron_tokenizer(directory: str | os.PathLike, config: Any = None) -> Any:
    """The tokenizer of a Nemotron-NAS directory (None when it has none), without running its code.

    `config=` (a Llama config) keeps AutoTokenizer from opening config.json itself, where the remote-code
    `auto_map` would make it ask on stdin whether to run `configuration_decilm.py` (which only engines
    need); `trust_remote_code=False` keeps any other remote-code reference from asking.
    """
    import transformers

    config = config or transformers.LlamaConfig()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), config=config, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def _zero_tail(state: dict, key: str, inter: int) -> bool:
    t = state[key]
    if key.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
        return bool((t[inter:] == 0).all())
    if key.endswith("down_proj.weight"):
        return bool((t[:, inter:] == 0).all())
    return True


def _rebuild_rotary(model: nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=model.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf)
