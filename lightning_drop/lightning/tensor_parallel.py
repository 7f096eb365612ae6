"""Tensor parallelism under FSDP2: the user's plan (`DropModule(tp_plan=...)`) applied over the mesh's
`tensor_parallel` dimension before `fully_shard` shards along `data_parallel` (the usual 2-D order).

A plan maps module-name globs, relative to the transformers base model (`model.model` of a causal LM; `*`
stands for one name part, a layer index), to a style: `colwise` (`ColwiseParallel`: the output features are
split, as for q/k/v and the MLP's gate/up projections) or `rowwise` (`RowwiseParallel`: the input features
are split, and the output summed across the tensor-parallel processes, as for o_proj and down_proj).
`tp_plan: auto` takes the plan transformers ships with the model's config (`config.base_model_tp_plan`).

Drops replace whole sublayers: a dropped sublayer's stand-in has no weights, so a glob matches nothing there;
a layer rebuilt by a drop during training gets the plan again before it is sharded again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import UserError

#: the plan styles this project applies (transformers' names), and the torch style each one is
STYLES = ("colwise", "rowwise")
#: config fields whose sizes a tensor-parallel split must divide (the heads: attention reshapes per head)
DIVIDED = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
HOW = ("set model.init_args.tp_plan: auto (the plan transformers ships with the model) or a mapping of module "
       "globs to colwise|rowwise, e.g. {layers.*.self_attn.q_proj: colwise, layers.*.self_attn.o_proj: rowwise}")


def base_model(hf_model: nn.Module) -> nn.Module:
    """The module a plan's names are relative to: transformers' base model (the causal LM's `model`)."""
    inner = getattr(hf_model, "base_model", None)
    return inner if isinstance(inner, nn.Module) else hf_model


def resolve_plan(hf_model: nn.Module, tp_plan: str | Mapping[str, str] | None) -> dict[str, str]:
    """The plan as {glob: style}: `auto` is the model config's `base_model_tp_plan`. Raises UserError (one line)
    for a missing plan, a model without one under `auto`, or a style this project does not apply."""
    if tp_plan is None:
        raise UserError(f"tensor parallelism needs a plan: {HOW}")
    if isinstance(tp_plan, str):
        if tp_plan != "auto":
            raise UserError(f"tp_plan {tp_plan!r}: give `auto` or a mapping of module globs to colwise|rowwise")
        config = getattr(hf_model, "config", None)
        shipped = getattr(config, "base_model_tp_plan", None)
        if not shipped:
            raise UserError(f"tp_plan: auto, but transformers ships no tensor-parallel plan for "
                            f"{getattr(config, 'model_type', type(hf_model).__name__)}: give tp_plan as a mapping of "
                            "module globs to colwise|rowwise, or use tensor_parallel_size: 1")
        plan, source = dict(shipped), f"the {config.model_type} plan transformers ships"
    else:
        plan, source = dict(tp_plan), "tp_plan"
    other = sorted({str(s) for s in plan.values()} - set(STYLES))
    if other:
        raise UserError(f"{source} uses the style(s) {', '.join(other)}; only {' and '.join(STYLES)} are applied "
                        "here: give tp_plan as a mapping with those, or use tensor_parallel_size: 1")
    return plan


def check_plan(hf_model: nn.Module, tp_plan: str | Mapping[str, str] | None, tp: int) -> dict[str, str]:
    """Refuse (UserError, one line) what cannot split over `tp` tensor-parallel processes: no plan, an unusable
    plan, a glob that matches no module or one that is not a linear layer, heads or MLP features that `tp` does
    not divide. No collective: every rank runs it on the same model and gets the same answer."""
    plan = resolve_plan(hf_model, tp_plan)
    config = getattr(hf_model, "config", None)
    for field in DIVIDED:
        size = getattr(config, field, None)
        if isinstance(size, int) and size % tp:
            raise UserError(f"tensor_parallel_size={tp} does not divide the model's {field}={size}: choose a "
                            "tensor_parallel_size that divides it (or 1)")
    names = dict(base_model(hf_model).named_modules())
    for glob in plan:
        hits = [n for n in names if _glob_re(glob).fullmatch(n)]
        if not hits:
            raise UserError(f"tp_plan: {glob!r} matches no module of the model (names are relative to its base "
                            f"model, e.g. {_example(names)})")
        wrong = next((n for n in hits if not isinstance(names[n], nn.Linear)), None)
        if wrong is not None:
            raise UserError(f"tp_plan: {glob!r} matches {wrong}, a {type(names[wrong]).__name__}: colwise and rowwise "
                            "split linear layers only")
    return plan


def parallelize(module: nn.Module, mesh: Any, plan: Mapping[str, str], prefix: str = "") -> list[str]:
    """Apply `plan` over the 1-D tensor-parallel `mesh` to `module`, whose names are `prefix` + its own names
    relative to the base model (a whole base model: ""; one decoder layer: "layers.3."). Dropped sublayers are
    stand-ins without linear layers, so nothing there matches. Returns the names parallelized."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    patterns = [(_glob_re(glob), style) for glob, style in plan.items()]
    chosen: dict[str, Any] = {}
    for name, sub in module.named_modules():
        style = next((s for pattern, s in patterns if pattern.fullmatch(prefix + name)), None)
        if style is not None and isinstance(sub, nn.Linear):
            chosen[name] = styles[style]()
    if chosen:
        parallelize_module(module, mesh, chosen)
    return sorted(chosen)


def layer_prefix(hf_model: nn.Module, layer: nn.Module) -> str:
    """The name prefix of `layer` relative to the base model (`layers.3.`), what `parallelize` matches against."""
    for name, sub in base_model(hf_model).named_modules():
        if sub is layer:
            return f"{name}."
    raise ValueError(f"{type(layer).__name__} is not a module of the model")


def _glob_re(glob: str) -> re.Pattern[str]:
    """transformers' plan globs: `*` is one dotted name part (a layer index), the rest literal."""
    return re.compile(r"[^.]+".join(re.escape(part) for part in glob.split("*")))


def _example(names: Mapping[str, nn.Module]) -> str:
    linear = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    return linear[0] if linear else "layers.0.self_attn.q_proj"


def clip_grad_norm(parameters: list[Any], max_norm: float) -> Any:
    """Clip the gradients of `parameters` to a total norm of `max_norm`, as `torch.nn.utils.clip_grad_norm_`, where
    they lie on several meshes: split layers on the 2-D mesh, the others on its data-parallel part, which torch's
    own clipping cannot stack. One norm per mesh (a collective), then the total; returns it."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    by_mesh: dict[Any, list[Any]] = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = [torch.nn.utils.get_total_norm(group) for group in by_mesh.values()]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for group in by_mesh.values():
            torch._foreach_mul_(group, coef)
    return total
