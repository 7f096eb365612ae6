"""What a family's decoder passes to each of its layers, found by running its own forward with stand-ins.

The streamed paths (`streaming.LayerStream`) run one decoder layer at a time and never the whole decoder, yet
each layer must get exactly the arguments the full model would give it (causal / sliding-window masks for
`config.layer_types[i]`, rotary position embeddings, position ids, ALiBi biases). Rather than re-implement
those per family, a probe stands in for every layer and the family's decoder `forward` is run until it calls
layer i; `Replay` stands in for every layer when only the final norm and LM head are to run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def layers_replaced(decoder: nn.Module, attr: str, stand_ins: nn.ModuleList) -> Iterator[None]:
    """Inside: the decoder's layer list `attr` (`layers`, GPT-2's `h`, ...) is `stand_ins`."""
    real = getattr(decoder, attr)
    setattr(decoder, attr, stand_ins)
    try:
        yield
    finally:
        setattr(decoder, attr, real)


class _Reached(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("probe reached")
        self.args, self.kwargs = args, kwargs


class _Probe(nn.Module):
    """Stands in for decoder layer `index`: passes the hidden states on (as the layer's output would come:
    `style[0]` says whether the decoder unpacks a (hidden, weights) pair), or stops the forward at the target.
    Attributes the decoder reads from its layers (Nemotron-H's `block_type`) are the real layer's."""

    def __init__(self, index: int, target: list[int], real: nn.Module, style: list[bool]) -> None:
        super().__init__()
        self.index, self.target, self.style = index, target, style
        self.__dict__["_real"] = real  # not a submodule: the probe holds no weights

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.index == self.target[0]:
            raise _Reached(args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, None) if self.style[0] else hidden


class LayerArgs:
    """The exact (args, kwargs) the family's decoder forward passes to layer i, for one batch.

    The decoder runs with probes in place of its layers (the list named `attr`); masks, rotary embeddings
    and position ids are built by the family's own code from the batch's shape and attention mask.
    """

    def __init__(self, decoder: nn.Module, attr: str, layers: nn.ModuleList) -> None:
        self.decoder, self.attr = decoder, attr
        self.target = [0]
        # most decoders take a layer's output as the hidden states (or index it); Bamba unpacks a pair
        self.style = [False]
        self.probes = nn.ModuleList([_Probe(j, self.target, layer, self.style) for j, layer in enumerate(layers)])

    def __call__(self, i: int, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None) -> tuple[tuple, dict]:
        self.target[0] = i
        with layers_replaced(self.decoder, self.attr, self.probes):
            for retry in (True, False):
                try:
                    self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 use_cache=False)
                except _Reached as reached:
                    return reached.args, reached.kwargs
                except (ValueError, TypeError):
                    if not retry or i == 0:
                        raise
                    self.style[0] = not self.style[0]  # the decoder took the other output form
        raise RuntimeError(f"{type(self.decoder).__name__}.forward never called layer {i}")


class Replay(nn.Module):
    """Stands in for every decoder layer when only the final norm and LM head are to run: the output is
    the given last hidden states, whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value
