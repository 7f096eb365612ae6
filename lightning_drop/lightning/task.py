"""What a `DropModule` trains: the model it builds, the loss, and what validation and test report.

A language model and an image classifier differ only here: the data a batch holds, the loss and the metrics.
Drops, importance, checkpoints, optimizers and every callback treat both alike, so there is one module and
one set of callbacks, and the task follows the model: `CausalLM` for a decoder, `ImageClassification` for a
vision family. A task is an `nn.Module` so a head or a metric it adds is trained, saved and moved with the
module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def lm_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask, labels) of a batch: a tensor of ids or a dict; labels default to the ids
    with padding (mask 0) set to -100, so padding never counts in the loss."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def build_model(model: str | None, init_config: dict[str, Any] | None, dtype: str = "float32",
                tokenizer: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a reference (`lightning_drop.io.model_loading.load_model`) or a random-init config.

    `model="tiny-<family>"` with `init_config` overrides the tiny config (e.g. more layers); `model=None`
    with `init_config={"model_type": "llama", ...}` builds that family at random init with the byte-level
    tokenizer's special ids and the tiny defaults for anything not given.
    """
    from ..io.model_loading import TINY_PREFIX, load_model, load_tokenizer, tiny_family
    from ..io.tiny_models import tiny_config

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise UserError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    if model is None and not init_config:
        raise UserError("DropModule needs `model` (catalogue name, path or hub id) or `init_config` (random init)")
    random_init = model is None or tiny_family(model) is not None
    if not random_init:
        if init_config:
            raise UserError(f"init_config is only for random init (model=None or 'tiny-<family>'), not {model!r}")
        return load_model(model, dtype=torch_dtype, tokenizer=tokenizer)
    import transformers

    from ..core.architectures import get_spec

    overrides = dict(init_config or {})
    if model is not None:
        family = tiny_family(model)
        if "model_type" in overrides:
            raise UserError(f"init_config.model_type conflicts with model={model!r}: give one of them")
    else:
        if "model_type" not in overrides:
            raise UserError("init_config needs 'model_type' (e.g. llama) when `model` is not given")
        family = get_spec(str(overrides.pop("model_type"))).family
    from huggingface_hub import errors as hub_errors

    try:  # transformers checks the sizes (heads that divide hidden_size, ...)
        config = tiny_config(family, int(overrides.pop("num_hidden_layers", 4)), **overrides)
    except (ValueError, getattr(hub_errors, "StrictDataclassError", ValueError)) as err:
        while err.__cause__ is not None:
            err = err.__cause__
        raise UserError(f"init_config {init_config}: {' '.join(str(err).split())}") from None
    spec = get_spec(config)
    hf = getattr(transformers, spec.causal_lm_class)(config).to(torch_dtype)
    tok = load_tokenizer(tokenizer or f"{TINY_PREFIX}{family}")
    if len(tok) > config.vocab_size:
        raise UserError(f"tokenizer has {len(tok)} tokens but init_config.vocab_size is {config.vocab_size}")
    return hf, tok


class Task(nn.Module):
    """How a `DropModule` runs its model on a batch: `forward`, `loss`, `batch_size`, `evaluate`."""

    def forward(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, module: Any, batch: Any, stage: str) -> None:
        """Log `<stage>/loss` (and the task's metrics) for a validation or test batch."""
        loss = self.loss(module.model, batch)
        module.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=self.batch_size(batch))

    def on_validation_epoch_end(self, module: Any) -> None:
        """Metrics derived from the epoch's logged values; nothing by default."""


class CausalLM(Task):
    """Next-token prediction on token windows (a tensor of ids or a dict with `input_ids`)."""

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def batch_size(self, batch: Any) -> int:
        return int(lm_batch(batch)[0].shape[0])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        ids, mask, labels = lm_batch(batch)
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    def on_validation_epoch_end(self, module: Any) -> None:
        loss = module.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            module.log("val/ppl", math.exp(min(float(loss), 50.0)), sync_dist=False)


class ImageClassification(Task):
    """Cross-entropy on (images, labels) batches; validation and test also log top-1 accuracy (`<stage>/acc`).

    Families without a classification class in transformers (DINOv3 ViT) get a linear head on the pooled
    output (`head`); the others use their own classifier.
    """

    def __init__(self, model: nn.Module, num_labels: int) -> None:
        from torchmetrics.classification import MulticlassAccuracy

        from ..core.architectures import vision_spec
        from ..io.vision_loading import hidden_size

        super().__init__()
        self.head: nn.Module | None = None
        if vision_spec(model).classification_class is None:
            self.head = nn.Linear(hidden_size(model.config), num_labels)
        self.acc = nn.ModuleDict({stage: MulticlassAccuracy(num_labels, average="micro") for stage in ("val", "test")})

    def forward(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixel_values)
        return self.head(out.pooler_output) if self.head is not None else out.logits

    def classifier(self, model: nn.Module) -> nn.Module:
        """The classification head (what a head-only fine-tune after a drop trains)."""
        return self.head if self.head is not None else model.classifier

    def batch_size(self, batch: Any) -> int:
        return len(batch[1])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(model, x), y)

    def evaluate(self, module: Any, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(module.model, x)
        self.acc[stage].update(logits, y)
        module.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val", sync_dist=True,
                   batch_size=len(y))  # every rank evaluates: the mean of all
        module.log(f"{stage}/acc", self.acc[stage], prog_bar=stage == "val")


def build_task(model: str | None, init_config: dict[str, Any] | None, family: str | None, num_labels: int | None,
               dtype: str, tokenizer: str | None, seed: int | None = None) -> tuple[nn.Module, Any, Task]:
    """(transformers model, tokenizer or None, task) for `DropModule`'s arguments; the family decides the task."""
    from ..io.vision_loading import VISION_FAMILIES, build_vision_model, is_vision_checkpoint

    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2):
        raise UserError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if family is not None and model is not None:
        raise UserError(f"give `model` or `family`, not both (model={model!r}, family={family!r})")
    vision = family in VISION_FAMILIES or (model is not None and family is None and is_vision_checkpoint(model))
    if not vision:
        if num_labels is not None:
            raise UserError("num_labels is for image classification (a vision family or checkpoint)")
        if family is not None:
            from ..io.model_loading import TINY_PREFIX
            from ..io.tiny_models import TINY_FAMILIES

            if family not in TINY_FAMILIES:
                raise UserError(f"unknown family '{family}'; choose from {', '.join(VISION_FAMILIES)} or a "
                                f"decoder family of `{TINY_PREFIX}<family>`")
            model = TINY_PREFIX + family
        hf, tok = build_model(model, init_config, dtype, tokenizer)
        return hf, tok, CausalLM()
    if tokenizer is not None:
        raise UserError("tokenizer_name is for language models: an image model takes no tokenizer")
    if model is not None and init_config:
        raise UserError(f"init_config is only for random init (family=...), not for the checkpoint {model!r}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise UserError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    labels = 10 if num_labels is None else num_labels
    hf = build_vision_model(family or "vit", init_config, model, labels, seed).to(torch_dtype)
    return hf, None, ImageClassification(hf, labels)
