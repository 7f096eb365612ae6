"""One forward pass of any family over a calibration batch, without its task head.

Text batches (ids, or dicts with `input_ids` and `attention_mask`) and image batches (pixel tensors,
(images, labels), dicts with `pixel_values`) become the keyword arguments of one forward pass; the pass runs
the model's body only, since importance scores read hidden states, not logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.architectures import ArchSpec, get_spec
from ..errors import UserError


def hidden_of(value: Any) -> torch.Tensor:
    """The hidden states of a module's output (layers return a tuple in some families, a tensor in others)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def as_batch(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Text batches: a tensor of ids, or a dict with `input_ids` (and optionally `attention_mask`)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if "input_ids" not in batch:
        raise UserError("calibration batches need 'input_ids'")
    out = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"].to(device)
    return out


def _as_pixels(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Image batches: an image tensor, (images, labels) as image datamodules yield, or a dict with
    `pixel_values`."""
    if isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, dict):
        if "pixel_values" not in batch:
            raise UserError("calibration batches need 'pixel_values'")
        x = batch["pixel_values"]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        x = batch[0]
    else:
        raise UserError(f"calibration batches must be image tensors, (images, labels) or dicts, got {type(batch).__name__}")
    if x.dim() != 4:
        raise UserError(f"images must be (batch, channels, height, width), got shape {tuple(x.shape)}")
    return {"pixel_values": x.to(device)}


def model_inputs(spec: ArchSpec, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Keyword arguments of one forward pass of a `spec` model over `batch`, on `device`."""
    return as_batch(batch, device) if spec.inputs == "text" else _as_pixels(batch, device)


def run_forward(spec: ArchSpec, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """One forward pass of the model without its task head (scores need hidden states, not logits)."""
    if spec.inputs == "text":
        return decoder_body(model)(**inputs, use_cache=False)
    return spec.base_model(model)(**inputs)


def decoder_body(model: nn.Module) -> nn.Module:
    """The model without its LM head (the module holding the spec's layer list: `model`, GPT-2's
    `transformer`, ...): scores need hidden states, not logits over the vocabulary."""
    *path, layers = get_spec(model).layers.split(".")
    inner: object = model
    for part in path:
        inner = getattr(inner, part, None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, layers) else model

