"""`lightning-drop families`: every causal-LM model type of the installed transformers and what this tool does
with it, generated from the code: the ArchSpecs, the export engines' own check, and the layout read from each
type's tiny model (`io/tiny_configs`), so the table never drifts from what the package can do.
"""

from __future__ import annotations

import json
from typing import Any, Literal

TableFormat = Literal["markdown", "text", "json"]

# module names of a layer's children, read as the layout they reveal (the name is the evidence, not the family)
_MIXERS = {"self_attn": "attention", "attn": "attention", "attention": "attention", "self_attention": "attention",
           "linear_attn": "linear attention", "mamba": "mamba", "conv": "conv", "mixer": "one mixer per layer"}
_OTHER_MIXERS = ("linear_attn", "mamba", "conv")
_MLPS = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe", "intermediate")


def _layer_list(model: Any, num_layers: int | None) -> tuple[str, Any] | None:
    """The first ModuleList of `num_layers` modules outside vision/audio towers: the decoder layers."""
    from torch import nn

    for name, module in model.named_modules():
        if any(t in name for t in ("vision", "image", "audio")):
            continue
        if isinstance(module, nn.ModuleList) and len(module) and (num_layers is None or len(module) == num_layers):
            return name, module
    return None


def _mixer_kind(module: Any) -> str:
    """A mixer's kind, read from its class name (Gated DeltaNet and Mamba hide under `self_attn`/`mixer` too)."""
    name = type(module).__name__.lower()
    for word, kind in (("mamba", "mamba"), ("delta", "linear attention"), ("linear", "linear attention"),
                       ("conv", "conv"), ("attention", "attention"), ("attn", "attention"), ("mlp", "mlp"),
                       ("moe", "moe")):  # "attention" before "moe": Qwen2MoeAttention is attention
        if word in name:
            return kind
    return "attention"


def layout(model: Any, encoder_decoder: bool = False) -> str:
    """The layout of a model's layers as its module names show it: where the layers are, the mixer module
    names and their kinds (the config's `layer_types`-style list, else the mixer classes' names), the MLP's
    name (MoE when its module holds experts), and whether one norm feeds both sublayers (parallel residual)."""
    config = model.config
    if encoder_decoder or getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    text = getattr(config, "text_config", None) or config
    num = next((getattr(text, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                if isinstance(getattr(text, k, None), int)), None)
    found = _layer_list(model, num)
    if found is None:
        return "no layer list"
    path, layers = found
    children: dict[str, Any] = {}
    kinds: set[str] = set()
    for layer in layers:
        for name, child in layer.named_children():
            children.setdefault(name, child)
            if name in _MIXERS:  # a module named for its kind says it; otherwise its class does
                kinds.add({"linear_attn": "linear attention", "mamba": "mamba", "conv": "conv"}.get(name)
                          or _mixer_kind(child))
    declared = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None)
    if isinstance(declared, list) and declared and all(isinstance(k, str) for k in declared):
        kinds = {k.replace("_", " ") for k in declared}  # the config's own per-layer kinds, where it states them
    mixers = sorted({n for n in children if n in _MIXERS})
    mlp = next((n for n in _MLPS if n in children), None)
    norms = [n for n in children if "norm" in n or n.startswith("ln")]
    if not mixers:
        return f"{path}: no mixer module ({', '.join(children)})"
    parts = [f"{path}[i]: " + "/".join(mixers) + f" ({' + '.join(sorted(kinds))})"]
    # hybrid: a mixer other than softmax attention beside another kind (sliding + full attention is not)
    other = {k for k in kinds if "attention" not in k or "linear" in k} | {n for n in mixers if n in _OTHER_MIXERS}
    if other and (len(kinds) > 1 or len(mixers) > 1):
        parts.append("hybrid")
    if mlp:
        # any layer's: MoE families often keep their first layers dense
        moe = any("expert" in n for layer in layers if hasattr(layer, mlp)
                  for n, _ in getattr(layer, mlp).named_modules())
        parts.append(f"{mlp} (MoE)" if moe else mlp)
    parallel = getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False)
    if mlp and len(norms) == 1 or parallel:
        parts.append("parallel residual")
    if "intermediate" in children:
        parts.append("encoder layer")
    return ", ".join(parts)


# Types with Llama's module names that failed the family matrix (tests/test_family_matrix.py), and how
NOT_PROVEN = {
    "minimax": "Llama-like names, but dropped != zeroed (2e-5 apart: its lightning attention layers)",
    "emu3": "its causal LM's config is another model type (emu3_text_model) than the checkpoint's",
    "diffllama": "Llama-like names, but its attention depends on the layer's index, so a block drop cannot "
                 "renumber the layers",
    "moshi": "Llama-like names, but cached != uncached greedy generation after a drop",
}


def _row(model_type: str) -> dict[str, Any]:
    import torch

    from ..core.architectures import get_spec, supported_model_types
    from ..export.nemotron import SUPPORTED_FAMILIES
    from ..io.tiny_configs import REFUSED, causal_lm_class, shrunk_config

    if model_type in supported_model_types("text"):
        # the export writers' own list (`check_llama_family`); every family's dropped checkpoint loads in transformers
        engines = ["transformers"] + (["Nemotron-NAS", "GGUF"] if model_type in SUPPORTED_FAMILIES else [])
        spec = get_spec(model_type)
        mixers = "".join(f" or `{name}` ({kind})" for name, kind in spec.mixers.items())
        sublayers = f"attn `{spec.attn}`{mixers}, mlp `{spec.mlp}`"
        if spec.layer_roles:  # Nemotron-H: one sublayer per layer, of the kind the layer's type names
            sublayers = f"one per layer: `{spec.attn}` ({'/'.join(dict.fromkeys(spec.layer_roles.values()))})"
        if isinstance(spec.parallel, bool):
            parallel = ", parallel residual" if spec.parallel else ""
        else:
            parallel = ", parallel residual if " + " or ".join(f"`{k}`" for k in spec.parallel)
        if spec.residual_norms:  # how importance reads a post-norm layer, whose norms stay with a dropped sublayer
            parallel += (", post-norm: attn scored on (X, " + spec.residual_norms[0] + "(X + attn)), mlp on (h, "
                         + spec.residual_norms[-1] + "(h + mlp)); a dropped block keeps its norms")
        return dict(model_type=model_type, status="supported", sublayers=sublayers, engines=engines,
                    layout=f"{spec.layers}[i]{parallel}"
                    + (f", hybrid ({'/'.join((spec.attn, *spec.mixers))})" if spec.mixers else "")
                    + (f", hybrid (kind by the layer's `{spec.role_attr}`)" if spec.layer_roles else ""))
    if model_type in NOT_PROVEN:
        return dict(model_type=model_type, status="not yet", sublayers="", engines=[], layout=NOT_PROVEN[model_type])
    if model_type in REFUSED:
        return dict(model_type=model_type, status="refused", sublayers="", engines=[], layout=REFUSED[model_type])
    # the model type's own class (a family's `tiny-<family>` name may denote another type: gemma3 -> gemma3_text)
    config = shrunk_config(model_type, {"eos_token_id": 0, "pad_token_id": 1, "bos_token_id": 2})
    encoder_decoder = getattr(config, "is_encoder_decoder", False)  # before the decoder-only class unsets it
    with torch.device("meta"):  # module names only: no weights are made
        model = causal_lm_class(model_type)(config)
    found = layout(model, encoder_decoder)
    status = "refused" if found in ("encoder-decoder", "no layer list") or "encoder layer" in found else "not yet"
    return dict(model_type=model_type, status=status, sublayers="", engines=[], layout=found)


def family_rows() -> list[dict[str, Any]]:
    """One row per causal-LM model type of the installed transformers."""
    from ..io.tiny_configs import causal_lm_types

    return [_row(t) for t in causal_lm_types()]


def render(rows: list[dict[str, Any]], format: TableFormat) -> str:
    if format == "json":
        return json.dumps(rows, indent=1) + "\n"
    cells = [[r["model_type"], r["status"], r["sublayers"], ", ".join(r["engines"]), r["layout"]] for r in rows]
    head = ["model type", "status", "sublayers", "exported for", "layout / reason"]
    if format == "text":
        widths = [max(len(c[i]) for c in cells + [head]) for i in range(4)]
        return "".join("  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] + "\n" for c in [head] + cells)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = ["# Model families", "",
             "Generated by `lightning-drop families --format markdown` from the installed transformers; "
             "`tests/test_families.py` checks that this page is current.", "",
             "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def families_main(format: TableFormat = "text") -> str:
    """Every causal-LM model type of the installed transformers with its status here.

    Args:
        format: markdown (the table of docs/families.md), text or json

    Returns the printed table.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # building ~200 configs would warn about each one's quirks
    try:
        text = render(family_rows(), format)
    finally:
        transformers.logging.set_verbosity(verbosity)
    print(text, end="")
    return text
