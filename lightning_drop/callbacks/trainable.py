"""What a recovery trains: LoRA adapters, all weights, a chosen set of decoder layers, or the output head with
the last remaining layers.

`LoRARecovery` and `Distillation` share this one description, so "what trains" is configured, checked and
applied the same way whatever the loss. LoRA adapters are attached through `DropModule.add_lora` (the
module records them in every checkpoint, so a resume rebuilds them before the weights load) and merged by
`DropModule.merge_lora`. The other kinds only set `requires_grad`: all parameters, or those of the chosen
layers with everything else frozen. Layers are chosen as explicit indices, `near_drops` (every layer with a
dropped sublayer that still has weights, and the nearest such layer before and after it: the ones that
absorb the drop) or `last:K` (the last K layers). A fully dropped block has no weights, so it never counts.
`last_layers` is the recipe of "Reassessing Layer Pruning": the output head (`lm_head`; with tied embeddings
that is the input embedding matrix too) and the last `last_k` layers that still have weights, counted after
the drops. LoRA may keep its frozen base in a lower precision (`base_dtype`, QLoRA's idea): the adapters stay
float32 and the merge rounds into the base's dtype, after which the model goes back to the dtype it had.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from ..core.architectures import LLAMA_LORA_TARGETS
from ._common import hf_of

#: LoRA's default target names (Llama's); as the default they mean the family's own linear layers
DEFAULT_TARGETS = LLAMA_LORA_TARGETS
KINDS = ("lora", "all", "layers", "last_layers")
Kind = Literal["lora", "all", "layers", "last_layers"]
#: low-precision bases for LoRA: torch dtypes any backend has; `nf4` (4-bit, QLoRA) needs bitsandbytes on CUDA
BASE_DTYPES = ("bfloat16", "float16", "nf4")
NEAR_DROPS = "near_drops"
LAST = "last:"


@dataclass(frozen=True)
class LoRASettings:
    """peft LoRA settings: rank, scaling numerator (`lora_alpha`), dropout, module names to adapt."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    base_dtype: str | None = None  # None: the base stays in its dtype

    @classmethod
    def checked(cls, owner: str, r: Any, alpha: Any, dropout: Any, target_modules: Any,
                names: tuple[str, str, str] = ("r", "alpha", "dropout"), base_dtype: Any = None) -> LoRASettings:
        """The settings, or a one-line `MisconfigurationException` naming `owner`'s argument (`names`)."""
        r_name, alpha_name, dropout_name = names
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise MisconfigurationException(f"{owner}: {r_name} must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise MisconfigurationException(f"{owner}: {alpha_name} must be > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise MisconfigurationException(f"{owner}: {dropout_name} must be in [0, 1), got {dropout!r}")
        if isinstance(target_modules, str):
            target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise MisconfigurationException(
                f"{owner}: target_modules must be a non-empty list of module names, got {target_modules!r}")
        check_base_dtype(owner, base_dtype)
        return cls(r, alpha, dropout, tuple(target_modules), base_dtype)


def check_base_dtype(owner: str, base_dtype: Any) -> None:
    """A low-precision LoRA base this machine can run, or one line naming what is missing (never plain LoRA
    in its place: a recipe that says 4-bit must be 4-bit or not run)."""
    if base_dtype is None:
        return
    if base_dtype not in BASE_DTYPES:
        raise MisconfigurationException(f"{owner}: unknown base_dtype {base_dtype!r}; choose from "
                                        f"{', '.join(BASE_DTYPES)} or null")
    if base_dtype == "nf4":
        import importlib.util

        import torch

        missing = [what for what, ok in (("bitsandbytes (not installed)", importlib.util.find_spec("bitsandbytes")),
                                         ("a CUDA device (none visible)", torch.cuda.is_available())) if not ok]
        raise MisconfigurationException(
            f"{owner}: base_dtype='nf4' (a 4-bit QLoRA base) needs "
            + (" and ".join(missing) if missing else "a 4-bit LoRA path this version does not have")
            + "; use base_dtype bfloat16 or float16 for a low-precision base on this machine")


class TrainableSet:
    """One recovery's choice of what trains (see the module docstring), checked when it is made.

    Args:
        owner: the callback's name, for error messages.
        kind: `lora`, `all` or `layers`.
        layers: with `layers`: indices, `near_drops` or `last:K`.
        lora: with `lora`: the adapter settings.
    """

    def __init__(self, owner: str, kind: str = "lora", layers: Sequence[int] | str | None = None,
                 lora: LoRASettings | None = None, last_k: int | None = None) -> None:
        if kind not in KINDS:
            raise MisconfigurationException(f"{owner}: unknown trainable {kind!r}; choose from {', '.join(KINDS)}")
        if kind == "last_layers":
            if not isinstance(last_k, int) or isinstance(last_k, bool) or last_k < 0:
                raise MisconfigurationException(f"{owner}: trainable='last_layers' needs last_k, an integer >= 0 "
                                                f"(0: the output head alone), got {last_k!r}")
        elif last_k is not None:
            raise MisconfigurationException(f"{owner}: last_k is only used with trainable='last_layers' "
                                            f"(trainable={kind!r})")
        if kind != "lora" and lora is not None and lora.base_dtype is not None:
            raise MisconfigurationException(f"{owner}: base_dtype is the frozen base of LoRA adapters and applies "
                                            f"only with trainable='lora' (trainable={kind!r})")
        if kind == "layers":
            layers = _checked_layers(owner, layers)
        elif layers is not None:
            raise MisconfigurationException(f"{owner}: layers is only used with trainable='layers' "
                                            f"(trainable={kind!r})")
        if kind == "lora" and lora is None:
            lora = LoRASettings()
        self.owner, self.kind, self.layers, self.lora = owner, kind, layers, lora if kind == "lora" else None
        self.last_k = last_k
        self._dtype_before: Any = None  # the model's dtype before a low-precision LoRA base

    def __repr__(self) -> str:
        what = {"lora": f"LoRA {self.lora}", "all": "all weights", "layers": f"layers {self.layers}",
                "last_layers": f"lm_head + last {self.last_k} layers"}[self.kind]
        return f"TrainableSet({what})"

    # ------------------------------------------------------------------------------------------ layers
    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Explicit layer indices, `last:K` and `last_k` must fit the model (checked in setup, before any
        training); `last_layers` needs an output head."""
        if self.kind == "last_layers":
            model = hf_of(pl_module)
            if model.get_output_embeddings() is None:
                raise MisconfigurationException(f"{self.owner}: trainable='last_layers' trains the output head, and "
                                                f"{type(model).__name__} has none")
            if self.last_k > _num_layers(model):
                raise MisconfigurationException(f"{self.owner}: last_k={self.last_k} asks for more than the model's "
                                                f"{_num_layers(model)} layers")
        if self.kind != "layers":
            return
        n = _num_layers(hf_of(pl_module))
        if isinstance(self.layers, list):
            bad = [i for i in self.layers if i >= n]
            if bad:
                raise MisconfigurationException(f"{self.owner}: layers {bad} out of range: the model has {n} layers "
                                                f"(0..{n - 1})")
        elif self.layers.startswith(LAST) and int(self.layers[len(LAST):]) > n:
            raise MisconfigurationException(f"{self.owner}: layers={self.layers!r} asks for more than the model's "
                                            f"{n} layers")

    def layer_indices(self, model: nn.Module) -> list[int]:
        """The chosen layers of `model` that have weights (resolved against its current drops)."""
        from lightning_drop.core.modeling_dropped import dropped_layers

        n = _num_layers(model)
        attn, mlp = dropped_layers(model)
        gone = set(attn) & set(mlp)  # fully dropped blocks: nothing left to train
        live = [i for i in range(n) if i not in gone]
        if self.kind == "last_layers":
            return live[len(live) - self.last_k:] if self.last_k else []
        if isinstance(self.layers, list):
            chosen = set(self.layers)
        elif self.layers == NEAR_DROPS:
            chosen = set()
            for i in set(attn) | set(mlp):
                chosen.add(i)
                before, after = [j for j in live if j < i], [j for j in live if j > i]
                chosen.update(before[-1:] + after[:1])
        else:
            chosen = set(range(n - int(self.layers[len(LAST):]), n))
        return sorted(chosen & set(live))

    # ---------------------------------------------------------------------------------------- applying
    def attached(self, pl_module: pl.LightningModule) -> bool:
        """LoRA adapters are on the module (restored from a checkpoint or attached before)."""
        return getattr(pl_module, "lora_config", None) is not None

    def apply(self, pl_module: pl.LightningModule) -> str:
        """Make exactly this set trainable; returns a one-line description. Rebuild optimizers after it mid-fit."""
        if self.kind == "lora":
            if not hasattr(pl_module, "add_lora"):
                raise MisconfigurationException(f"{self.owner} needs a module with `add_lora` "
                                                f"(lightning_drop.DropModule), got {type(pl_module).__name__}")
            if not self.attached(pl_module):
                assert self.lora is not None
                # the default names stand for the family's own targets: add_lora resolves them
                pl_module.add_lora(r=self.lora.r, alpha=self.lora.alpha, dropout=self.lora.dropout,
                                   target_modules=list(self.lora.target_modules))
            assert self.lora is not None
            if self.lora.base_dtype is not None:
                # also when the adapters came back from a checkpoint (resume): its weights load into this dtype
                import torch

                dtype = getattr(torch, self.lora.base_dtype)
                for name, p in hf_of(pl_module).named_parameters():
                    if "lora_" not in name and p.dtype != dtype:
                        self._dtype_before = self._dtype_before or p.dtype
                        p.data = p.data.to(dtype)
            what = f"LoRA r={pl_module.lora_config['r']} on {pl_module.lora_config['target_modules']}"
        elif self.kind == "all":
            for p in hf_of(pl_module).parameters():
                p.requires_grad_(True)
            what = "all weights"
        else:
            model = hf_of(pl_module)
            chosen = self.layer_indices(model)
            if not chosen and self.kind == "layers":
                raise MisconfigurationException(f"{self.owner}: layers={self.layers!r} leaves nothing to train on "
                                                "this model (every chosen layer is a fully dropped block)")
            for p in pl_module.parameters():
                p.requires_grad_(False)
            layers = _layers(model)
            for i in chosen:
                for p in layers[i].parameters():
                    p.requires_grad_(True)
            what = f"layers {chosen}"
            if self.kind == "last_layers":
                for p in model.get_output_embeddings().parameters():
                    p.requires_grad_(True)
                what = f"lm_head + {what}"
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        return f"{what}: {trainable:,} trainable of {total:,} parameters"

    def merge(self, pl_module: pl.LightningModule) -> bool:
        """Fold LoRA adapters into the weights (idempotent); whether a merge happened. A sharded model keeps
        them: what needs the merged model at fit end gathers it, and the gathered weights are merged."""
        from lightning_drop.lightning.distributed import is_sharded

        if self.kind == "lora" and self.attached(pl_module) and not is_sharded(pl_module):
            pl_module.merge_lora()
            if self._dtype_before is not None:  # the merged weights keep the low-precision base's rounding
                hf_of(pl_module).to(self._dtype_before)
                self._dtype_before = None
            return True
        return False


def _checked_layers(owner: str, layers: Any) -> list[int] | str:
    if isinstance(layers, str):
        if layers == NEAR_DROPS:
            return layers
        if layers.startswith(LAST):
            k = layers[len(LAST):]
            if not k.isdigit() or int(k) < 1:
                raise MisconfigurationException(f"{owner}: layers={layers!r}: the empty trainable set; "
                                                "last:K needs K >= 1")
            return layers
        raise MisconfigurationException(f"{owner}: unknown layers {layers!r}; give indices, {NEAR_DROPS!r} or "
                                        f"'{LAST}K'")
    if layers is None or not isinstance(layers, Sequence) or not len(layers):
        raise MisconfigurationException(f"{owner}: trainable='layers' needs layers (indices, {NEAR_DROPS!r} or "
                                        f"'{LAST}K'); got {layers!r}, the empty trainable set")
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
        raise MisconfigurationException(f"{owner}: layers must be indices >= 0, got {list(layers)!r}")
    return sorted(set(layers))


def _layers(model: nn.Module) -> nn.ModuleList:
    from lightning_drop.core.architectures import get_spec

    return get_spec(model).get_layers(model)


def _num_layers(model: nn.Module) -> int:
    return len(_layers(model))
