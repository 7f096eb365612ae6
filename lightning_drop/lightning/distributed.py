"""Distributed training of DropModule: FSDP wrapping per decoder layer, and what sharding rules out.

The decoder layer class is read from the model through its ArchSpec (`spec.get_layers(model)`), so every
supported family (and its dropped variant, whose layers keep the family's class) gets the right policy
without naming transformers classes in a config. With LightningCLI:

    lightning-drop fit --config configs/drop_and_recover.yaml \\
        --trainer.accelerator gpu --trainer.devices 8 \\
        --trainer.strategy fsdp_decoder_layers      # or lightning_drop.lightning.distributed.DecoderLayerFSDPStrategy

What works under a parameter-sharding strategy (FSDP, ModelParallel, DeepSpeed ZeRO-3), and what is refused
with a `MisconfigurationException` at setup (the callbacks and DropModule call `refuse_if_sharded`):
- works: a fit-start `LayerDrop` (one-shot, or iterative with `every_n_steps: 0`), done in `Callback.setup`
  before sharding and scored on `trainer.strategy.root_device`, so the score sync is a GPU collective;
  `LoRARecovery(merge=False)` attached at setup; resuming (`DropModule.configure_model` rebuilds the saved drop
  plan and LoRA from `trainer.ckpt_path` before sharding, because these strategies restore after setup).
- refused (they need the full parameters after sharding): drops during or at the end of training,
  `ImportanceTracker`, LoRA merging, the fit-end measurement callbacks and `DropModule(save_dir=...)`;
  `Distillation` too (its teacher would be a whole unsharded model on every rank). Use DDP for those, or checkpoint (`FSDPStrategy(state_dict_type="full")` writes one file) and convert
  with `DropModule.load_from_checkpoint(path).save_pretrained(dir)`, then measure the saved model with
  `lightning-drop eval|perplexity|speed|quantize`.
Lightning's FSDP strategy needs CUDA (`accelerator="cpu"` is refused), so none of this has been run here:
the refusals and the resume logic are tested on CPU with constructed strategy objects; the sharded
training itself is untested without a GPU. On CPU use `--trainer.strategy ddp` (gloo).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from ..core.architectures import get_spec
from ..errors import UserError
# Lightning checkpoints are read by their own module; these names stay importable from here
from ..io.training_checkpoint import CKPT_KEY, checkpoint_meta, load_plain_checkpoint, resume_path, verify_checkpoint

STRATEGY_NAME = "fsdp_decoder_layers"


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
    raise UserError(f"{type(model).__name__} holds no model of a supported family: no decoder layers to wrap")


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

    Writable in YAML as `trainer.strategy: lightning_drop.lightning.distributed.DecoderLayerFSDPStrategy` with any
    `FSDPStrategy` init arg (sharding_strategy, mixed_precision, cpu_offload, state_dict_type, ...).
    An explicit `auto_wrap_policy` wins. Layers are wrapped after `Callback.setup`, so drops applied at
    setup/fit start (LayerDrop `when: fit_start`) are already in place when the model is sharded.
    """

    strategy_name = STRATEGY_NAME

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
        return super()._setup_model(model)


def fsdp_strategy(model: nn.Module | None = None, **kwargs: Any) -> FSDPStrategy:
    """A `DecoderLayerFSDPStrategy` (policy fixed now when `model` is given); kwargs go to `FSDPStrategy`."""
    if model is not None:
        kwargs.setdefault("auto_wrap_policy", decoder_layer_classes(model))
    return DecoderLayerFSDPStrategy(**kwargs)


if torch.distributed.is_available() and STRATEGY_NAME not in StrategyRegistry:
    # `--trainer.strategy fsdp_decoder_layers` (the registry resolves strategy names at Trainer init)
    StrategyRegistry.register(STRATEGY_NAME, DecoderLayerFSDPStrategy,
                              description="FSDP with one unit per decoder layer of the model (lightning_drop)")


# ---------------------------------------------------------------------------------- sharding refusals
def sharded_strategy(strategy: Any) -> str | None:
    """The class name of `strategy` when it shards parameters across processes (FSDP, ModelParallel,
    DeepSpeed ZeRO-3), else None."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False):
        return f"{type(strategy).__name__} (ZeRO stage 3)"
    return None


def refuse_if_sharded(trainer: Any, what: str, instead: str) -> None:
    """Raise if the trainer shards parameters: `what` (needs the full model after sharding) cannot run."""
    name = sharded_strategy(getattr(trainer, "strategy", None))
    if name is not None:
        raise MisconfigurationException(f"{what} needs the full parameters after {name} has sharded them: {instead}")
