"""What a model and its generation hold in memory: parameters, weight bytes, the KV cache per token and per
token-mixer kind (full/sliding attention, linear attention, Mamba, conv; measured from a real cache after a
prompt, never from the config), and this process's resident memory.

`speed` reports these beside its timings; the study reads them without timing anything.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from torch import nn

from ..errors import UserError


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    persistent = [buf for mod in model.modules() for name, buf in mod.named_buffers(recurse=False)
                  if name not in mod._non_persistent_buffers_set]  # what a checkpoint holds, no rotary tables
    for t in list(model.parameters()) + persistent:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device



def cache_kw(model: nn.Module) -> str:
    """Name of the forward argument that takes a KV cache: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers cache (shared tensors counted once). A boolean
    slot is the token counter a dropped first attention keeps (`standins.DroppedAttention`): one
    element expanded, no keys or values, so not counted."""
    seen: set[int] = set()
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__} (expected a transformers Cache with .layers)")
    return sum(_tensor_bytes((getattr(layer, "keys", None), getattr(layer, "values", None)), seen) for layer in layers)


def _tensor_bytes(tensors: Any, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.dtype != torch.bool and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def cache_bytes_by_kind(model: nn.Module, prompt_len: int = 32, batch_size: int = 1) -> dict[str, dict[str, float]]:
    """Per token-mixer kind (full/sliding attention, linear attention, Mamba, conv): KV-cache bytes per token
    and recurrent/conv-state bytes per sequence, measured from a real cache after a prompt. A dropped mixer
    holds neither, so its kind counts only its kept layers. Empty for a model of no known family."""
    from ..core.architectures import MIXER_KINDS, get_spec

    try:
        kinds = get_spec(model).mixer_kinds(model)
    except (UserError, AttributeError):
        return {}
    ids = random_prompt(model, batch_size, prompt_len)
    cache = new_cache(model)
    model(input_ids=ids, **{cache_kw(model): cache}, use_cache=True, logits_to_keep=1)
    mixers = [k for k in kinds if k in MIXER_KINDS]  # a layer that mixes no tokens (Nemotron-H's MLP) caches nothing
    per_token: dict[str, float] = dict.fromkeys(mixers, 0.0)
    per_sequence: dict[str, float] = dict.fromkeys(mixers, 0.0)
    seen: set[int] = set()
    for kind, layer in zip(kinds, cache.layers):
        if kind not in per_token:
            continue
        per_token[kind] += _tensor_bytes((getattr(layer, "keys", None), getattr(layer, "values", None)), seen) / (
            batch_size * prompt_len)
        states = [*(getattr(layer, "conv_states", None) or {}).values(),
                  *(getattr(layer, "recurrent_states", None) or {}).values()]
        per_sequence[kind] += _tensor_bytes(states, seen) / batch_size
    return {"kv_bytes_per_token": per_token, "state_bytes_per_sequence": per_sequence}


def random_prompt(model: nn.Module, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    vocab = int(model.config.vocab_size if hasattr(model.config, "vocab_size") else model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed)
    # Avoid the very top of the vocabulary, where special tokens usually live.
    high = max(2, min(vocab, vocab - 512) if vocab > 1024 else vocab)
    return torch.randint(0, high, (batch_size, prompt_len), generator=g).to(model_device(model))


@torch.inference_mode()
def kv_cache_bytes_per_token(model: nn.Module, prompt_len: int = 32, batch_size: int = 1) -> float:
    """KV-cache bytes per token, measured: run a prompt, sum the cache's key/value bytes, divide by tokens.

    Keep `prompt_len` below any sliding window, or windowed layers are undercounted.
    """
    if prompt_len < 1 or batch_size < 1:
        raise UserError(f"prompt_len and batch_size must be >= 1, got {prompt_len}, {batch_size}")
    ids = random_prompt(model, batch_size, prompt_len)
    cache = new_cache(model)
    model(input_ids=ids, **{cache_kw(model): cache}, use_cache=True, logits_to_keep=1)
    return cache_bytes(cache) / (batch_size * prompt_len)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (bytes; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    """Current resident memory of this process (bytes)."""
    import psutil

    return int(psutil.Process().memory_info().rss)
