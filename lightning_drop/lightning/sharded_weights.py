"""The weights of a sharded model in and out of safetensors: each rank reads only its own shards at load; the
full weights leave one tensor, or one row slice of a large one, at a time (gathered to rank zero, LoRA merged)
for saving and measuring.

Used by `DropModule` through `lightning_drop.lightning.distributed`; nothing here needs Lightning.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.architectures import get_spec
from ..errors import UserError
from ..io.checkpoint_names import CheckpointNames
from ..io.safetensors_io import SLICE_BYTES, SafetensorsShards

_PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")


def find_decoder(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside `model` (itself, a peft wrapper, or a LightningModule holding it)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "model_type"):
            continue
        try:
            spec = get_spec(module)
            spec.get_layers(module)
        except (ValueError, AttributeError):
            continue
        return module
    raise UserError(f"{type(model).__name__} holds no model of a supported family: no decoder layers to shard")


# ------------------------------------------------------------------------------------------ loading
def empty_model(directory: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The causal LM of a checkpoint directory with its parameters on the meta device (no storage) and its
    non-persistent buffers (rotary tables) real: `materialize` reads the weights after sharding."""
    import transformers
    from accelerate import init_empty_weights

    from ..core.modeling_dropped import dropped_classes
    from ..scoring.checkpoint_meta import load_config

    config = load_config(directory)
    spec = get_spec(config)
    config_cls, model_cls = dropped_classes(spec)
    cls = model_cls if isinstance(config, config_cls) else getattr(transformers, spec.causal_lm_class)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.train()


def materialize(model: nn.Module, directory: str | os.PathLike, device: torch.device) -> None:
    """Allocate the meta parameters of `model` (sharded or not) on `device` and read them from the checkpoint's
    safetensors files, tensor by tensor; a sharded parameter reads only this rank's rows (FSDP2 shards dim 0
    into equal chunks), so no rank ever holds the whole model."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    weight_map = (json.loads(index.read_text())["weight_map"] if index.is_file()
                  else dict.fromkeys(_keys(directory / "model.safetensors"), "model.safetensors"))
    # the checkpoint's names are not always the model's: transformers renames and fuses some on load
    names = CheckpointNames(find_decoder(model), weight_map, [_stored_name(n) for n in model.state_dict()])
    real = {n: b for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, buffer in real.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        module.register_buffer(leaf, buffer.to(device), persistent=leaf not in module._non_persistent_buffers_set)
    done: set[int] = set()
    with ExitStack() as stack, torch.no_grad():
        files: dict[str, Any] = {}
        shards = stack.enter_context(SafetensorsShards(directory))
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in done or name in real:
                continue
            done.add(id(tensor))
            wanted = _stored_name(name)
            if wanted not in names and _LORA_RE.search(name):
                _init_adapter(name, tensor)  # a fresh adapter: not in the checkpoint
                continue
            if wanted not in names:
                raise UserError(f"{directory}: no tensor {wanted} in its safetensors files (config.json and weights "
                                "disagree)")
            stored = names.stored(wanted)
            if stored is None:  # converted on load (fused experts): the whole tensor, then this rank's rows
                rows: Any = names.read(shards, [wanted], "the model")[wanted]
            else:
                file = weight_map[stored]
                if file not in files:
                    files[file] = stack.enter_context(safe_open(str(directory / file), framework="pt"))
                rows = files[file].get_slice(stored)
            if isinstance(tensor, DTensor):
                local, start = _local_rows(tensor)
                if local.numel():
                    local.copy_(rows[start:start + local.shape[0]].to(local.dtype))
            else:
                tensor.copy_(rows[:].to(tensor.dtype))
    if isinstance(model, nn.Module) and hasattr(model, "tie_weights"):
        model.tie_weights()


def _stored_name(name: str) -> str:
    """The checkpoint's name of a parameter of the (possibly peft-wrapped) model."""
    name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


def _local_rows(tensor: Any) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor, index of its first row) of a parameter sharded along dim 0, or (it, 0)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor, 0
    mesh = tensor.device_mesh
    chunk = -(-tensor.shape[0] // mesh.size())
    return tensor.to_local(), min(tensor.shape[0], mesh.get_local_rank() * chunk)


def _init_adapter(name: str, tensor: Any) -> None:
    """LoRA's initialization of a new adapter (A: Kaiming-uniform, B: zeros), the same full tensor on every rank
    (a generator seeded by the name) of which each rank keeps its rows."""
    import zlib

    local, start = _local_rows(tensor)
    if ".lora_B." in name:
        local.zero_()
        return
    full = torch.empty(tensor.shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    if local.numel():
        local.copy_(full[start:start + local.shape[0]].to(local.dtype))


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# ---------------------------------------------------------------------------------------- gathering
def full_tensors(model: nn.Module, keep: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, full CPU tensor) for every parameter and persistent buffer of `model`, in state-dict order.

    Sharded parameters are gathered one at a time: a collective, so every rank must iterate to the end;
    only where `keep` is true is the tensor kept (None is yielded elsewhere).
    """
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, (tensor.detach().cpu() if keep else None)


def _merged_lora(tensors: dict[str, torch.Tensor], lora: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Plain transformers names and weights of one group of peft tensors, adapters folded in (W + s * B @ A)."""
    out, adapters = {}, {}
    for name, t in tensors.items():
        name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        m = _LORA_RE.search(name)
        if m:
            adapters.setdefault(name[:m.start()], {})[m.group(1)] = t
        else:
            out[name.replace(".base_layer.", ".")] = t
    for module, ab in adapters.items():
        assert lora is not None, f"LoRA tensors of {module} without a LoRA record"
        weight = out[f"{module}.weight"]
        delta = (ab["B"].float() @ ab["A"].float()) * (lora["alpha"] / lora["r"])
        out[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out


def row_slices(tensor: torch.Tensor, slice_bytes: int, keep: bool) -> Iterator[torch.Tensor]:
    """The rows of `tensor` (a parameter sharded along dim 0, or a plain tensor), in order, at most about
    `slice_bytes` at a time, as CPU tensors on the rank that keeps them (`keep`: global rank zero); the other
    ranks send their rows to it, point to point, and yield nothing. Every rank must exhaust it.

    Gathering a whole embedding (`full_tensor`) put it on every rank at once; this way the keeping rank
    holds one slice, and the others nothing beyond their shards.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rows = tensor.shape[0]
    step = max(1, slice_bytes // max(1, math.prod(tensor.shape[1:]) * tensor.element_size()))
    if not isinstance(tensor, DTensor):
        for start in range(0, rows if keep else 0, step):
            yield tensor.detach()[start:start + step].cpu()
        return
    group = tensor.device_mesh.get_group()
    me, world, keeper = dist.get_rank(group), dist.get_world_size(group), dist.get_group_rank(group, 0)
    if keep != (me == keeper):
        raise RuntimeError(f"rank {me} of the mesh {'keeps' if keep else 'does not keep'} the gathered rows, "
                           f"but global rank zero is rank {keeper} of it")
    local = tensor.to_local().detach()
    chunk = -(-rows // world)  # FSDP2's dim-0 shards: torch.chunk's sizes
    for rank in range(world):
        first, stop = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
        for start in range(first, stop, step):
            end = min(stop, start + step)
            if rank == me == keeper:
                yield local[start - first:end - first].cpu()
            elif rank == me:
                dist.send(local[start - first:end - first].contiguous(), group=group, group_dst=keeper)
            elif me == keeper:
                piece = torch.empty((end - start, *tensor.shape[1:]), dtype=local.dtype, device=local.device)
                dist.recv(piece, group=group, group_src=rank)
                yield piece.cpu()


def _sliced(name: str, tensor: torch.Tensor, slice_bytes: int | None) -> bool:
    """Whether `tensor` leaves the ranks in row slices: larger than a slice, no LoRA merge needs it whole, and
    plain or sharded in dim-0 rows over all processes (`row_slices`); a tensor also split for tensor parallelism,
    or sharded over a part of the processes only, is gathered whole (`full_tensor`)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        import torch.distributed as dist

        mesh = tensor.device_mesh
        if mesh.ndim != 1 or mesh.size() != dist.get_world_size():
            return False
    return (slice_bytes is not None and tensor.dim() >= 1 and tensor.numel() * tensor.element_size() > slice_bytes
            and not _LORA_RE.search(name) and ".base_layer." not in name)


def gather_to_directory(model: nn.Module, directory: str | os.PathLike | None, config: Any,
                        lora: dict[str, Any] | None, group_prefix: str,
                        slice_bytes: int | None = SLICE_BYTES) -> list[str]:
    """Write the full weights of a sharded `model` as a plain Hugging Face directory (rank zero's `directory`;
    None on the other ranks, which take part in the gathers only); returns the names written in row slices.

    One safetensors file per decoder layer (names starting `group_prefix.<i>.`) and per run of other tensors
    (final norm), LoRA merged; a tensor larger than `slice_bytes` (None: none), such as the embedding and the
    head, is gathered and written in row slices into a file of its own (`row_slices`). So rank zero holds at
    most one layer, or one slice of one tensor. `config` (the model's transformers config) is saved with it.
    """
    from torch.distributed.tensor import DTensor

    from ..io.safetensors_io import write_streamed

    keep = directory is not None
    layer_re = re.compile(rf"(?:^|\.){re.escape(group_prefix)}\.(\d+)\.")  # also under a peft prefix
    group: dict[str, torch.Tensor] = {}
    label: str | None = None
    weight_map: dict[str, str] = {}
    sliced: list[str] = []

    def file_name(what: str) -> str:
        return f"part-{len(set(weight_map.values())):05d}-{what}.safetensors"

    def flush() -> None:
        # a run of tensors of one layer (or of the embedding / head between layers) is complete: write it
        tensors = {k: v.contiguous() for k, v in _merged_lora(group, lora).items()}
        file = file_name(str(label))
        write_streamed(Path(directory) / file, {k: (v.dtype, v.shape) for k, v in tensors.items()},  # type: ignore[arg-type]
                       lambda k: [tensors[k]])
        weight_map.update({k: file for k in tensors})
        group.clear()

    if keep:
        Path(directory).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    for name, tensor in model.state_dict(keep_vars=True).items():
        if _sliced(name, tensor, slice_bytes):
            rows = row_slices(tensor, slice_bytes, keep)  # type: ignore[arg-type]
            if not keep:
                for _ in rows:
                    pass
                continue
            if group:
                flush()
            stored, file = _stored_name(name), file_name("sliced")
            write_streamed(Path(directory) / file, {stored: (tensor.dtype, tensor.shape)}, lambda _: rows)  # type: ignore[arg-type]
            weight_map[stored] = file
            sliced.append(stored)
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if not keep:
            continue
        m = layer_re.search(name)
        now = f"layer{int(m.group(1)):05d}" if m else "other"
        if now != label and group:
            flush()
        label = now
        group[name] = full.detach().cpu()
    if not keep:
        return []
    if group:
        flush()
    target = Path(directory)  # type: ignore[arg-type]
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = copy.deepcopy(config)
    config.architectures = [unsharded_class(find_decoder(model)).__name__]
    config.save_pretrained(target)
    return sliced


def unsharded_class(module: nn.Module) -> type:
    """The class `module` had before `fully_shard` (which swaps in a subclass named `FSDP<class>`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def load_gathered(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The plain model of a `gather_to_directory` output (rank zero), in eval mode."""
    from ..io.dropped_checkpoint import load_dropped

    return load_dropped(directory, dtype=dtype).eval()
