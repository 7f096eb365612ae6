"""The dropped checkpoint of a model larger than memory, written shard by shard from the source's files.

`write_dropped_streaming` makes the choices `dropped_checkpoint.save_dropped` makes for the in-memory model
(drop lists, compacted blocks, remote code) on a meta-device copy (`checkpoint_meta.meta_model`), then copies
every kept tensor from the source shards into new ones, one slice of one tensor at a time; each shard is
byte for byte what `safetensors` writes, and the checkpoint appears atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.architectures import get_spec
from ..io.dropped_checkpoint import add_remote_code, compact_blocks, atomic_dir, checkpoint_kind
from ..errors import UserError
from ..core.modeling_dropped import apply_drop, dropped_classes, dropped_layers
from ..io.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    SLICE_BYTES,
    ReusedBuffer,
    SafetensorsShards,
    is_float_dtype,
    write_safetensors,
)
from ..io.checkpoint_names import CheckpointNames
from .checkpoint_meta import load_config, load_generation_config, meta_model


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read shard size '{size}' (e.g. 2GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * factor)


def _target_model(model_dir: Path, config: Any, dtype: torch.dtype, attn: Sequence[int],
                  mlp: Sequence[int]) -> tuple[nn.Module, nn.Module, str, dict[int, int]]:
    """(dropped meta model, model to save, kind, layer renumbering) — the choices `save_dropped` makes."""
    model = meta_model(config, dtype)
    model.generation_config = load_generation_config(model_dir, config)
    old_attn, old_mlp = dropped_layers(model) if isinstance(config, dropped_classes(get_spec(config))[0]) else ([], [])
    new_attn = sorted(set(attn) - set(old_attn))
    new_mlp = sorted(set(mlp) - set(old_mlp))
    if new_attn or new_mlp:
        apply_drop(model, attn=new_attn, mlp=new_mlp)
    spec = get_spec(model)
    kind = checkpoint_kind(model)
    target, remap = model, {}
    if kind == "blocks":
        gone_attn, gone_mlp = dropped_layers(model)
        blocks = sorted(set(gone_attn) & set(gone_mlp))  # a hybrid's lists also name the layers it lacks
        target = compact_blocks(model, spec, blocks) or model
        if target is model:
            kind = "dropped"
        else:
            keep = [i for i in range(config.num_hidden_layers) if i not in set(blocks)]
            remap = {old: new for new, old in enumerate(keep)}
    return model, target, kind, remap


def write_dropped_streaming(model_dir: str | os.PathLike, out_dir: str | os.PathLike, attn: Sequence[int] = (),
                            mlp: Sequence[int] = (), tokenizer: Any = None, dtype: torch.dtype | str | None = None,
                            max_shard_size: int | str = "2GB",
                            extra: Callable[[Path], None] | None = None,
                            slice_bytes: int | None = SLICE_BYTES) -> Path:
    """Write what `save_dropped(load_model(model_dir) with attn/mlp dropped)` writes, one shard at a time.

    `attn`/`mlp` are the drop lists (original layer indices; the checkpoint's own drops are kept either way).
    Tensors are cast to `dtype` (default: the checkpoint's own `dtype`), as the in-memory path saves the
    model in the dtype it was loaded with. Memory: one slice of one tensor (`slice_bytes`; None: the largest
    tensor), whatever `max_shard_size` is.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    if dtype is None:
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, target, kind, remap = _target_model(model_dir, config, dtype, attn, mlp)
    spec = get_spec(model)
    expected = list(remove_tied_weights_from_state_dict(target.state_dict(), target))
    layer_re = re.compile(rf"^{re.escape(spec.layer_prefix)}\.(\d+)\.")
    old_index = {new: old for old, new in remap.items()}

    def renumbered(key: str, to_source: bool) -> tuple[str, int, int]:
        """(`key` with its layer index mapped to the source's (or back), old index, new index)."""
        m = layer_re.match(key)
        if not m or not remap:
            return key, -1, -1
        i = int(m.group(1))
        j = old_index[i] if to_source else remap[i]
        return f"{spec.layer_prefix}.{j}." + key[m.end():], i, j

    limit = _parse_size(max_shard_size)
    with SafetensorsShards(model_dir) as tensors:
        # the target's tensors under the checkpoint's own names, as `save_pretrained` writes them back
        names = CheckpointNames(model, tensors.keys())
        source: dict[str, str] = {}
        missing = []
        for key in expected:
            src_key, new, old = renumbered(key, to_source=True)
            if src_key not in names:
                missing.append(key)
            for stored in names.sources([src_key]):
                out = stored if new == old else re.sub(rf"(^|\.){old}\.", rf"\g<1>{new}.", stored, count=1)
                source.setdefault(out, stored)
        if missing:
            raise UserError(f"{model_dir} lacks tensors the dropped model needs: {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
        expected = list(source)
        shards: list[list[str]] = [[]]
        size = 0
        sizes = {k: tensors.nbytes(source[k], dtype if is_float_dtype(tensors.dtype_of(source[k])) else None)
                 for k in expected}
        for key in expected:
            if shards[-1] and size + sizes[key] > limit:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += sizes[key]
        names = ([SINGLE_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        with atomic_dir(out_dir) as tmp:
            weight_map = {}
            buffer = ReusedBuffer()  # one allocation for every slice, for the reason given there
            for name, keys in zip(names, shards):
                write_safetensors(tmp / name, tensors, {k: source[k] for k in keys}, dtype, buffer,
                                  slice_bytes=slice_bytes)
                weight_map.update({k: name for k in keys})
            if len(shards) > 1:
                index = {"metadata": {"total_parameters": target.num_parameters(), "total_size": sum(sizes.values())},
                         "weight_map": dict(sorted(weight_map.items()))}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            # config.json / generation_config.json exactly as `save_pretrained` writes them
            target.config.dtype = str(dtype).split(".")[1]
            target.config.architectures = [type(target).__name__]
            target.config.save_pretrained(tmp)
            if target.can_generate():
                target.generation_config.save_pretrained(tmp)
            if kind == "dropped":
                add_remote_code(tmp, model)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if extra is not None:
                extra(tmp)
    return out_dir
