"""A model type no family describes: its spec inferred from module names, proven on the model before use.

New transformers releases add decoders with Llama's layout under their own class names. Such a model has its
layers in `model.layers`, an attention sublayer and an MLP (or mixture-of-experts) sublayer in each, and norms
whose names match one of the known norm layouts (`NORM_LAYOUTS`). The names are only a guess at what the
layer's forward does, so the guess is tested on the user's own model: logits with some sublayers replaced by
the drop stand-ins must equal the original model's logits with the same sublayers' outputs set to zero
(`prove_spec`, a few tokens: seconds). Only a proven spec is registered (`register_family`).

A family that does not name its LoRA targets gets them from the model the same way: the linear layers of its
live sublayers (`lora_targets`).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..core.architectures import ArchSpec, decoder_spec, get_spec, register_family
from ..core.decoder_families import NORM_LAYOUTS
from ..core.modeling_dropped import replace_sublayers
from ..core.standins import is_standin
from ..errors import UserError
from .tiny_configs import causal_lm_class

LAYERS = "model.layers"
ATTN_NAMES = ("self_attn", "self_attention")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
PROOF_TOKENS = 8


def _base_name(cls: type) -> str:
    name = cls.__name__
    return name[len("Dropped"):] if name.startswith("Dropped") else name


def infer_spec(model: nn.Module) -> ArchSpec:
    """The Llama-like spec `model`'s module names describe; UserError naming what did not match.

    Works on a model built on the meta device too (names only): callers refuse before loading weights.
    """
    config = model.config
    model_type = str(getattr(config, "model_type", "") or "")
    where = f"cannot infer a family for '{model_type}'"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"{where}: no layer list at {LAYERS}")
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise UserError(f"{where}: its config has no num_hidden_layers")
    names = [dict(layer.named_children()) for layer in layers]
    attn = next((n for n in ATTN_NAMES if all(n in c for c in names)), None)
    mlp = next((n for n in MLP_NAMES if all(n in c for c in names)), None)
    if attn is None or mlp is None:
        missing = "an attention sublayer (" + "/".join(ATTN_NAMES) + ")" if attn is None else \
            "an MLP sublayer (" + "/".join(MLP_NAMES) + ")"
        raise UserError(f"{where}: not every layer of {LAYERS} has {missing}; they hold {', '.join(names[0])}")
    children = {n: m for c in names for n, m in c.items()}
    norms = {n for n in children if "norm" in n}
    # parameter-free helpers (dropout) change nothing at inference; any other module is outside the layout
    others = sorted(n for n, m in children.items() if n not in (attn, mlp, *norms)
                    and (any(True for _ in m.parameters()) or "gate" in n or "scale" in n))
    if others:
        raise UserError(f"{where}: its layers hold modules outside the Llama-like layout: {', '.join(others)}")
    layout = next((k for k, v in NORM_LAYOUTS.items() if set(v["attn_norms"]) | set(v["mlp_norms"]) == norms), None)
    if layout is None:
        raise UserError(f"{where}: its norms ({', '.join(sorted(norms)) or 'none'}) match no known norm layout "
                        f"({', '.join(NORM_LAYOUTS)}); one norm for both sublayers is a parallel residual")
    return ArchSpec(family=model_type, model_types=(model_type,), causal_lm_class=_base_name(type(model)),
                    config_class=_base_name(type(config)), attn=attn, mlp=mlp, **NORM_LAYOUTS[layout])


def linear_targets(model: nn.Module) -> list[str]:
    """The names of the linear layers (`nn.Linear`, GPT-2's `Conv1D`) in the live token mixers (attention,
    linear attention, Mamba, convolution) and MLP sublayers of `model`, any family. Exact types only: a router
    that subclasses `nn.Linear` returns routing weights, not features, and stays as it is; mixture-of-experts
    blocks whose experts are one fused tensor contribute their shared experts only."""
    from transformers.pytorch_utils import Conv1D

    spec = get_spec(model)
    names: dict[str, None] = {}
    for layer in spec.get_layers(model):
        for name in (*spec.attn_modules(layer, parallel=True), *spec.mlp_modules(layer)):
            names.update((n.rsplit(".", 1)[-1], None) for n, m in getattr(layer, name).named_modules(prefix=name)
                         if type(m) in (nn.Linear, Conv1D))
    return list(names)


def lora_targets(model: nn.Module) -> list[str]:
    """LoRA's default targets for `model`: its family's `lora_targets` where the family names them, else the
    linear layers found in the model (`linear_targets`)."""
    return list(get_spec(model).lora_targets) or linear_targets(model)


def lora_excluded(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the dropped sublayers' stand-ins that the target names would match (BioGPT's MLP is its
    `fc1` itself): they have nothing to adapt, and peft refuses modules that are not layers it knows."""
    return [n for n, m in model.named_modules() if is_standin(m) and n.rsplit(".", 1)[-1] in targets]


def proof_drops(num_layers: int) -> tuple[list[int], list[int]]:
    """(attention, MLP) indices of a proof: the first layer's attention (it holds the cache's length), a whole
    middle block and the last layer's MLP, so both sublayer kinds and a block are covered."""
    if num_layers < 2:
        return [0], []
    middle = num_layers // 2
    return sorted({0, middle}), sorted({middle, num_layers - 1})


@contextmanager
def zeroed_outputs(model: nn.Module, spec: ArchSpec, attn: list[int], mlp: list[int]) -> Iterator[nn.Module]:
    """The original `model` with the outputs of the chosen sublayers (`attn_out` / `mlp_out`: their whole
    contribution to the residual stream) replaced by zeros: what a drop must compute."""
    layers = spec.get_layers(model)

    def zero(module: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, list):  # GPT-1's attention returns a list, which its layer extends
            return [torch.zeros_like(out[0]), *out[1:]]
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    # a hybrid layer's token mixer may be of another kind than attention, under its own name
    handles = [layers[i].get_submodule(spec.mixer_ends(layers[i])[1]).register_forward_hook(zero) for i in attn]
    # a decoder MLP of several parts (Granite-4's shared MLP + routed experts) contributes their sum
    parts = spec.mlp_parts if spec.inputs == "text" else ()
    handles += [layers[i].get_submodule(name).register_forward_hook(zero) for i in mlp  # a path: Bloom's `mlp.dense_4h_to_h`
                for name in (spec.mlp_out, *(p for p in parts if getattr(layers[i], p, None) is not None))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trial_drop(model: nn.Module, spec: ArchSpec, attn: list[int], mlp: list[int]) -> Iterator[nn.Module]:
    """`model` with the stand-ins of a drop in place, its own modules put back on exit (class and config untouched)."""
    layers = spec.get_layers(model)
    saved = [(layers[i], name, getattr(layers[i], name)) for i in sorted(set(attn) | set(mlp))
             for name in (*(spec.attn_modules() if i in attn else ()), *(spec.mlp_modules() if i in mlp else ()))]
    try:
        for i in sorted(set(attn) | set(mlp)):
            replace_sublayers(layers[i], spec, i in attn, i in mlp, i)
        yield model
    finally:
        for layer, name, module in saved:
            setattr(layer, name, module)


def prove_spec(model: nn.Module, spec: ArchSpec, atol: float | None = None) -> str | None:
    """None when dropping by `spec` computes what zeroing the same sublayers computes on `model` (a few tokens),
    else what differed. The tolerance follows the model's dtype (1e-5 in float32)."""
    param = next(model.parameters())
    n = len(spec.get_layers(model))
    attn, mlp = proof_drops(n)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, min(vocab, 1000), (1, PROOF_TOKENS), generator=torch.Generator().manual_seed(0))
    ids = ids.to(param.device)
    tol = atol if atol is not None else (1e-5 if param.dtype == torch.float32 else 2e-2)

    def logits() -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits.float()

    try:
        with torch.no_grad():
            full = logits()
            with zeroed_outputs(model, spec, attn, mlp):
                zeroed = logits()
            with trial_drop(model, spec, attn, mlp):
                dropped = logits()
    except Exception as err:  # noqa: BLE001  (the layer's own code refused the stand-ins: that is the finding)
        return f"the layer's forward fails with a dropped sublayer ({type(err).__name__}: {str(err).splitlines()[0]})"
    if torch.equal(full, zeroed):
        return "zeroing attention and MLP outputs does not change the logits (the sublayers are not found)"
    diff = (dropped - zeroed).abs().max().item()
    scale = max(1.0, zeroed.abs().max().item())
    if not diff <= tol * scale:  # also catches NaN
        return (f"dropped != zeroed (max |difference| {diff:.2g}) for attention {attn}, MLP {mlp}: the layer is not "
                "x + attn(norm(x)), h + mlp(norm(h))")
    return None


def spec_or_inferred(model: nn.Module, prove: bool = True) -> ArchSpec:
    """`get_spec(model)` for a known family; else the spec inferred from the module names, proven on `model`
    (skipped with `prove=False`, for a meta-device model) and, once proven, registered: UserError when either fails."""
    try:
        return get_spec(model)
    except UserError as known_err:
        try:
            spec = infer_spec(model)
        except UserError as err:
            raise UserError(f"{known_err.args[0].split(';')[0]}: {err.args[0]}") from None
    if not prove:
        return spec
    problem = prove_spec(model, spec)
    if problem is not None:
        raise UserError(f"cannot infer a family for '{spec.model_types[0]}': {problem}")
    print(f"family inferred: '{spec.model_types[0]}' has Llama's layout ({spec.attn}, {spec.mlp}); dropped == "
          "zeroed proven on this model", file=sys.stderr)
    return register_family(spec)


def with_family(model: nn.Module) -> nn.Module:
    """`model`, once its family is known or inferred and proven on it (`spec_or_inferred`)."""
    spec_or_inferred(model)
    return model


def check_family(path: str | os.PathLike, model_type: str) -> None:
    """Before loading weights: a known family passes; a type transformers builds is inferred from its module names
    on the meta device (proven later, on the loaded model, by `spec_or_inferred`); else a one-line UserError."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        get_spec(model_type)
    except UserError as err:
        if model_type not in CONFIG_MAPPING:
            raise
        known_err = err
    else:
        decoder_spec(model_type)  # a vision family gets its pointer to the vision tools
        return
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        try:
            model = causal_lm_class(model_type)(config)
        except UserError:
            raise known_err from None
    spec_or_inferred(model, prove=False)
