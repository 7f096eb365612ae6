"""The tensors of a checkpoint under the model's names, translated the way transformers translates them.

transformers 5 renames and converts weights between a checkpoint's files and the model: Nemotron-H's
`backbone.` prefix becomes `model.`, GPT-NeoX's `embed_out` is its `lm_head`, and the per-expert tensors of
most MoE families are stacked into fused `experts.gate_up_proj` / `down_proj` parameters. Readers that ask
the files for tensors by the model's names (the streamed scorer, the streamed writer, sharded loading)
translate through `CheckpointNames`, which applies transformers' own conversion mapping
(`get_model_conversion_mapping`): its renamings to every name, and its converters to the tensors of the
names asked for only, so that reading one layer still costs one layer of memory.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Iterable

import torch
from torch import nn

from .safetensors_io import ReusedBuffer, SafetensorsShards


class _Group:
    """The stored tensors behind one converter's output (e.g. every expert's gate and up projections),
    or the single stored tensor behind a renamed (or unchanged) name."""

    def __init__(self, first: str, converter: Any | None) -> None:
        self.first, self.converter = first, converter
        self.sources: list[tuple[str, str]] = []  # (source pattern, stored name), in transformers' order
        self.targets: list[str] = [first]


class CheckpointNames:
    """Model name <-> stored tensor(s) of one checkpoint for one (meta) model.

    `stored(name)` is the one stored tensor a model tensor is read from unchanged (None for a converted
    one); `read(...)` returns model tensors, converting where the mapping says so. `model_names`: the
    model's tensor names where they are not its state dict's (a LoRA-wrapped model's base names).
    """

    def __init__(self, model: nn.Module, stored_keys: Iterable[str], model_names: Iterable[str] | None = None) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                     rename_source_key)

        self.model = model
        mapping = get_model_conversion_mapping(model) if hasattr(model, "base_model_prefix") else []
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta: dict[str, Any] = model.state_dict() if model_names is None else dict.fromkeys(model_names, True)
        prefix = getattr(model, "base_model_prefix", None)
        self.groups: dict[str, _Group] = {}
        self.unexpected: list[str] = []
        for key in sorted(stored_keys, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if name not in meta and key in meta:  # as transformers: a key the mapping should have left alone
                name, pattern = rename_source_key(key, [], [], prefix, meta)
            if name not in meta:
                self.unexpected.append(key)
                continue
            group = self.groups.get(name)
            if group is None:
                group = self.groups[name] = _Group(name, deepcopy(by_pattern[pattern]) if pattern else None)
                if group.converter is not None:
                    first = group.converter.target_patterns[0]
                    group.targets = [name.replace(first, t) for t in group.converter.target_patterns]
            group.sources.append((pattern or key, key))
        self.owner = {t: g for g in self.groups.values() for t in g.targets}

    def __contains__(self, name: str) -> bool:
        return name in self.owner

    def stored(self, name: str) -> str | None:
        """The stored name of model tensor `name` if it is read unchanged (renamed at most), else None."""
        group = self.owner.get(name)
        return group.sources[0][1] if group is not None and group.converter is None else None

    def sources(self, names: Iterable[str]) -> list[str]:
        """Every stored tensor that model tensors `names` are made from (a missing name is skipped)."""
        groups = dict.fromkeys(self.owner[n] for n in names if n in self.owner)
        return [key for g in groups for _, key in g.sources]

    def shapes(self, shards: SafetensorsShards) -> dict[str, tuple[int, ...]]:
        """Model name -> shape of every tensor the checkpoint provides; converted shapes come from running
        the converter on meta tensors (no data)."""
        out: dict[str, tuple[int, ...]] = {}
        for group in self.groups.values():
            if group.converter is None:
                out[group.first] = tuple(shards.meta(group.sources[0][1]).shape)
            else:
                metas = {key: shards.meta(key) for _, key in group.sources}
                out.update({k: tuple(v.shape) for k, v in self._convert(group, metas).items()})
        return out

    def read(self, shards: SafetensorsShards, names: Iterable[str], what: str = "",
             dtype: torch.dtype | None = None, into: ReusedBuffer | None = None) -> dict[str, torch.Tensor]:
        """Model tensors `names` from the checkpoint: stored ones read (into `into`'s views if given),
        converted ones built from their group's stored tensors (fresh tensors, one group at a time)."""
        names = list(names)
        plain = {n: self.stored(n) or n for n in names if n not in self.owner or self.owner[n].converter is None}
        out = {n: t for n, t in zip(plain, shards.get_many(plain.values(), what, dtype, into).values())}
        for group in dict.fromkeys(self.owner[n] for n in names if n not in plain):
            stored = shards.get_many([key for _, key in group.sources], what, dtype)
            out.update(self._convert(group, stored))
        return {n: out[n] for n in names}

    def _convert(self, group: _Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        converter = deepcopy(group.converter)
        for pattern, key in group.sources:
            converter.add_tensor(group.first, key, pattern, lambda t=tensors[key]: t)
        converted = converter.convert(group.first, model=self.model, config=getattr(self.model, "config", None))
        return {k: (v[0] if isinstance(v, list) else v) for k, v in converted.items()}
