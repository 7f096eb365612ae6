"""The stand-ins of dropped sublayers: parameter-free modules that contribute nothing to the residual stream
(or pass the residual through where a family's module adds it itself), so a family's own layer code runs
unchanged around them and the dropped weights are physically gone.

Like `modeling_dropped.py`, which uses them, this file depends only on torch and transformers: it is copied into
every dropped checkpoint for `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn


class DroppedAttention(nn.Module):
    """Stands in for a removed token mixer (attention, or a hybrid's linear-attention, Mamba or convolution
    mixer): adds nothing (a broadcast zero), caches nothing. It returns what the family's attention does
    (`returns`, `ArchSpec.attn_returns`: (states, weights) by default); the other mixers return the states alone
    (`returns="states"`).

    Transformers reads a cache's sequence length from its first layer, and sizes attention masks from its first
    attention layer, so those keep a cache slot even when their mixer is dropped (`kv_sharing_modes`; every
    other dropped layer's slot is a storage-free `DummyLayer`). For attention the stand-in keeps there a boolean of shape
    (batch, 1, tokens, 1) that is one element expanded (stride 0): the slot reports the tokens seen and holds
    no per-token storage (a slot with no elements would report length 0). A recurrent slot (linear attention,
    Mamba, convolution) only has its token count advanced; its state is never allocated.
    """

    def __init__(self, layer_idx: int | None = None, returns: str = "pair") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.returns = returns

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        i = self.layer_idx
        if i is not None and hidden_states.dim() == 3:
            cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, transformers.Cache)), None)
            layers = getattr(cache, "layers", None)
            kind = type(layers[i]).__name__ if layers and i < len(layers) else None
            batch, tokens = hidden_states.shape[:2]
            if kind in _LENGTH_ONLY_LAYERS:
                mark = hidden_states.new_zeros((), dtype=torch.bool)
                cache.update(mark.expand(batch, 1, tokens, 1), mark.expand(batch, 1, tokens, 1), i)
                slot = layers[i]
                slot.keys = slot.values = mark.expand(*slot.keys.shape)  # the update concatenated: drop that storage
            elif kind in _RECURRENT_LAYERS:
                slot = layers[i]
                slot.cumulative_length_linear = slot.cumulative_length_linear.to(hidden_states.device) + tokens
        if self.returns == "residual":  # Bloom's attention adds the residual (its second argument) itself
            return (args[0] if args else kwargs["residual"]), None
        return _RETURNS[self.returns](hidden_states.new_zeros(()))


_RECURRENT_LAYERS = ("LinearAttentionLayer",)
# What a token mixer returns, built around its (zero) states: `ArchSpec.attn_returns`, or "states" for the
# hybrids' other mixers.
_RETURNS = {"states": lambda z: z, "pair": lambda z: (z, None), "triple": lambda z: (z, None, None),
            "list": lambda z: [z]}
# Cache layers that grow with what is appended (a static layer preallocates full-width storage instead).
_LENGTH_ONLY_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


class DroppedWindowAttention(nn.Module):
    """For layers that reshape the attention output (SwinV2 windows): zeros of the input's shape."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """Stands in for (one part of) a removed MLP (or MoE) sublayer: adds nothing. `full_shape`: zeros of the
    input's shape, for layers that add into the MLP output in place (Falcon's parallel layer) or reshape it
    (Llama 4). `pair`: returns (zeros, None) where the layer unpacks a MoE block's (output, router scores)."""

    def __init__(self, full_shape: bool = False, pair: bool = False) -> None:
        super().__init__()
        self.full_shape = full_shape
        self.pair = pair

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        zero = torch.zeros_like(hidden_states) if self.full_shape else hidden_states.new_zeros(())
        return (zero, None) if self.pair else zero


class DroppedResidualOutput(nn.Module):
    """For MLP output modules that add the residual themselves (`ViTOutput(hidden, input_tensor)` in
    transformers 4.x): returns the residual unchanged. Selected by naming the part in `RESIDUAL_OUTPUTS`."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return input_tensor


# Class names of MLP parts whose forward is (hidden_states, input_tensor) -> hidden + input_tensor (Bloom's and
# MPT's MLP(hidden, residual) too).
RESIDUAL_OUTPUTS = ("ViTOutput", "Dinov2Output", "BloomMLP", "MptMLP")
STANDINS = (DroppedAttention, DroppedWindowAttention, DroppedMLP, DroppedResidualOutput)


def is_standin(module: nn.Module | None) -> bool:
    """Whether `module` is one of the stand-ins of a dropped sublayer."""
    return isinstance(module, STANDINS)


class DroppedIdentity(nn.Identity):
    """A removed sublayer's norm or LayerScale: passes its input through, keeping the weight's dtype as a 0-d
    unsaved buffer for layers that cast to `norm.weight.dtype` first (Nemotron-H)."""

    def __init__(self, old: nn.Module | None = None) -> None:
        super().__init__()
        weight = getattr(old, "weight", None)
        if isinstance(weight, torch.Tensor):
            self.register_buffer("weight", weight.new_zeros(()), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> "DroppedIdentity":
        # On a model built on the meta device (streamed or sharded loading) the marker has no data, and no
        # checkpoint holds it: it is a zero, so it is made real before a move, which would refuse to copy it.
        weight = self._buffers.get("weight")
        if weight is not None and weight.is_meta:
            self._buffers["weight"] = torch.zeros((), dtype=weight.dtype)
        return super()._apply(fn, recurse)
