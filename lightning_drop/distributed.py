"""Sharded training (FSDP) of DropModule: wrap each decoder layer as one FSDP unit.

The decoder layer class is read from the model through its ArchSpec (`spec.get_layers(model)`), so every
supported family (and its dropped variant, whose layers keep the family's class) gets the right policy
without naming transformers classes in a config. With LightningCLI:

    lightning-drop fit --config configs/drop_and_recover.yaml \\
        --trainer.accelerator gpu --trainer.devices 8 \\
        --trainer.strategy lightning_drop.distributed.DecoderLayerFSDPStrategy

Lightning's FSDP strategy needs CUDA (`accelerator="cpu"` is refused by the accelerator connector for the
plain strategy); on CPU use `--trainer.strategy ddp` (gloo).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from .architectures import get_spec


def _find_decoder(model: nn.Module) -> nn.Module:
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
    raise ValueError(f"{type(model).__name__} holds no model of a supported family: no decoder layers to wrap")


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The decoder layer class(es) of the (wrapped) model: the units FSDP should shard."""
    hf = _find_decoder(model)
    return {type(layer) for layer in get_spec(hf).get_layers(hf)}


def fsdp_auto_wrap_policy(model: nn.Module) -> Any:
    """`ModuleWrapPolicy` over the decoder layer class(es) of `model` (pass as FSDP's `auto_wrap_policy`)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(decoder_layer_classes(model))


class DecoderLayerFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` whose auto-wrap policy is the model's decoder layers, found at setup.

    Writable in YAML as `trainer.strategy: lightning_drop.distributed.DecoderLayerFSDPStrategy` with any
    `FSDPStrategy` init arg (sharding_strategy, mixed_precision, cpu_offload, state_dict_type, ...).
    An explicit `auto_wrap_policy` wins. Layers are wrapped after `Callback.setup`, so drops applied at
    setup/fit start (LayerDrop `when: fit_start`) are already in place when the model is sharded.
    """

    strategy_name = "fsdp_decoder_layers"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
        return super()._setup_model(model)


def fsdp_strategy(model: nn.Module | None = None, **kwargs: Any) -> FSDPStrategy:
    """A `DecoderLayerFSDPStrategy` (policy fixed now when `model` is given); kwargs go to `FSDPStrategy`."""
    if model is not None:
        kwargs.setdefault("auto_wrap_policy", decoder_layer_classes(model))
    return DecoderLayerFSDPStrategy(**kwargs)
