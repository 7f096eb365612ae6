"""Sharded training of DropModule: FSDP2 (`fully_shard`) per decoder layer under Lightning's ModelParallelStrategy,
with tensor parallelism where the user gives a plan.

`DropModule.configure_model` calls `shard_model` when the trainer's strategy is a `ModelParallelStrategy`:
every decoder layer (found through the model's ArchSpec, so every family and its dropped variant) and then
the root are sharded with `torch.distributed.fsdp.fully_shard` over the mesh's `data_parallel` dimension,
in bf16 mixed precision on GPU. With `tensor_parallel_size > 1` the module's `tp_plan` (`auto`: the plan
transformers ships with the model's config) is applied first over the `tensor_parallel` dimension
(`lightning_drop.lightning.tensor_parallel`). `FSDP2Strategy` (`--trainer.strategy fsdp2`) is that strategy
with a pure data-parallel mesh by default (every process holds one shard); it runs on CPU (gloo) as on GPU
(NCCL), on one node or many (`trainer.num_nodes`):

    lightning-drop fit --config configs/sharded/recover_fsdp2.yaml --trainer.devices 8 --trainer.num_nodes 2

Everything DDP does works sharded with the same decisions (fit-start drops happen in `Callback.setup`,
before sharding; later drops and scoring run on the sharded layers, whose hooks see full parameters). What
needs the whole model after training (the fit-end measurements, `DropModule(save_dir=...)`) gets it through
`gather_to_directory`: parameters are gathered one at a time (a collective on every rank), large ones (the
embedding, the head) in row slices, and rank zero writes them, LoRA merged, one decoder layer per safetensors
file; the saved checkpoint is then written from there by the streamed writer, one slice at a time, so rank
zero holds at most one layer or one slice of one tensor for saving.

Refused at setup, one line on every rank: FSDP1 (`FSDPStrategy`, CUDA only) and DeepSpeed ZeRO-3 (use
`fsdp2`); with `tensor_parallel_size > 1`, a missing or unusable plan (`check_plan`), `load_sharded` and the
callbacks that attach LoRA adapters or hold a teacher (use `tensor_parallel_size: 1`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..core.architectures import get_spec
from ..errors import UserError
from ..io.safetensors_io import SLICE_BYTES
from .sharded_weights import find_decoder, full_tensors, gather_to_directory, unsharded_class
from .tensor_parallel import base_model, check_plan, layer_prefix, parallelize, resolve_plan

STRATEGY_NAME = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` with a data-parallel mesh by default: all processes of all nodes shard the model.

    Lightning's own default (`auto`) puts every process of a node into the tensor-parallel dimension, which
    needs a plan (`DropModule(tp_plan=...)`); here `data_parallel_size="auto"` means world size / tensor size,
    and `tensor_parallel_size: auto` (with `data_parallel_size: auto`) is Lightning's layout: tensor
    parallelism over the processes of a node, data parallelism across nodes.
    Writable in YAML as `trainer.strategy: fsdp2` or with its class path and any init arg of the parent.
    """

    strategy_name = STRATEGY_NAME

    def __init__(self, data_parallel_size: int | Literal["auto"] = "auto",
                 tensor_parallel_size: int | Literal["auto"] = 1, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        check_strategy(self, self.lightning_module)  # before any process group or callback: one line on every rank
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            self._data_parallel_size = max(1, self.num_nodes * self.num_processes // self._tensor_parallel_size)
        super().setup_environment()


if torch.distributed.is_available() and STRATEGY_NAME not in StrategyRegistry:
    # `--trainer.strategy fsdp2` (the registry resolves strategy names at Trainer init)
    StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy,
                              description="FSDP2 with one unit per decoder layer of the model (lightning_drop)")


# ------------------------------------------------------------------------------------------ strategies
def sharded_strategy(strategy: Any) -> str | None:
    """The class name of `strategy` when it shards parameters across processes (FSDP, ModelParallel,
    DeepSpeed ZeRO-3), else None."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False):
        return f"{type(strategy).__name__} (ZeRO stage 3)"
    return None


def is_fsdp2(strategy: Any) -> bool:
    """Whether `strategy` shards through `DropModule.configure_model` (Lightning's ModelParallelStrategy)."""
    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(strategy: Any, module: Any = None) -> None:
    """Refuse, on every rank before any model work, a sharding this project cannot train with (one line).

    With a tensor-parallel dimension, `module` (a DropModule) must bring a plan that fits its model (`check_plan`)
    and must not read its weights after sharding (`load_sharded`, which reads data-parallel rows only).
    """
    name = sharded_strategy(strategy)
    if name is None:
        return
    if not is_fsdp2(strategy):
        raise UserError(f"{name} is not supported: shard with FSDP2 (`--trainer.strategy fsdp2`, Lightning's "
                        "ModelParallelStrategy), or use `ddp`")
    tp = tensor_parallel_size(strategy)
    hf_model = getattr(module, "hf_model", None) if module is not None else None
    if tp <= 1 or hf_model is None:
        return
    hparams = getattr(module, "hparams", {})
    if hparams.get("load_sharded"):
        raise UserError(f"{name}: load_sharded reads each process's data-parallel rows, not tensor-parallel "
                        "splits: load the model whole (load_sharded: false) or use tensor_parallel_size: 1")
    check_plan(hf_model, hparams.get("tp_plan"), tp)


def refuse_tensor_parallel(trainer: Any, what: str) -> None:
    """Raise (one line, at setup, on every rank alike) if the trainer splits tensors: `what` cannot run so."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    tp = tensor_parallel_size(getattr(trainer, "strategy", None))
    if tp > 1:
        raise MisconfigurationException(f"{what} cannot run with tensor parallelism (tensor_parallel_size={tp}): "
                                        "use tensor_parallel_size: 1")


def tensor_plan(module: Any) -> tuple[Any, dict[str, str]] | None:
    """(tensor-parallel mesh, plan) of a DropModule whose trainer's mesh has a tensor-parallel dimension, else None."""
    strategy = module.trainer.strategy
    if tensor_parallel_size(strategy) == 1:
        return None
    return strategy.device_mesh["tensor_parallel"], resolve_plan(module.hf_model, module.hparams.get("tp_plan"))


def tensor_parallel_size(strategy: Any) -> int:
    """How many processes split each tensor: the size of a ModelParallelStrategy's tensor-parallel dimension,
    before the mesh exists as after (Lightning's `auto` puts every process of a node there unless the
    data-parallel size is given); 1 under any other strategy."""
    if not is_fsdp2(strategy):
        return 1
    mesh = getattr(strategy, "_device_mesh", None)
    if mesh is not None:
        return int(mesh["tensor_parallel"].size())
    tp, dp = getattr(strategy, "_tensor_parallel_size", 1), getattr(strategy, "_data_parallel_size", "auto")
    if tp != "auto":
        return int(tp)
    world = getattr(strategy, "num_nodes", 1) * (getattr(strategy, "num_processes", 1) or 1)
    return world // int(dp) if dp != "auto" else (getattr(strategy, "num_processes", 1) or 1)


def data_parallel_share(trainer: Any) -> tuple[int, int]:
    """(this process's index, number of processes) among those that take different batches: every process,
    except that the processes of a tensor-parallel group split one forward and so take the same batches."""
    mesh = getattr(getattr(trainer, "strategy", None), "_device_mesh", None)  # ModelParallelStrategy's, once set up
    if mesh is not None:
        return mesh["data_parallel"].get_local_rank(), mesh["data_parallel"].size()
    return getattr(trainer, "global_rank", 0), getattr(trainer, "world_size", 1)


def refuse_if_sharded(trainer: Any, what: str, instead: str) -> None:
    """Raise (one line, at setup, on every rank) if the trainer shards parameters: `what` cannot run sharded."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    name = sharded_strategy(getattr(trainer, "strategy", None))
    if name is not None:
        raise MisconfigurationException(f"{what} cannot run under {name}: {instead}")


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module inside it) has been sharded with `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: nn.Module, mesh: Any, device: torch.device,
                tp: tuple[Any, dict[str, str]] | None = None) -> None:
    """`fully_shard` every decoder layer of `model`, then `model` itself (a no-op when already sharded); with `tp`
    ((tensor-parallel mesh, plan), `tensor_plan`) the plan's linear layers are split over that mesh first.

    bf16 compute with fp32 gradient reduction on GPU; full precision on CPU, where bf16 matmuls are slow.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    if device.type == "cpu":
        _fixed_mmap_threshold()
    hf = find_decoder(model)
    if tp is not None:
        split = parallelize(base_model(hf), *tp)
        rank_zero_info(f"tensor parallelism over {tp[0].size()} processes: split {len(split)} linear layers")
    for layer in get_spec(hf).get_layers(hf):
        fully_shard(layer, **_shard_settings(mesh, device))
    fully_shard(model, **_shard_settings(mesh, device))


def _shard_settings(mesh: Any, device: torch.device) -> dict[str, Any]:
    """`fully_shard`'s arguments for every unit: the mesh, and bf16 compute with fp32 reduction on GPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    kwargs: dict[str, Any] = {"mesh": mesh}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return kwargs


def _fixed_mmap_threshold(size: int = 128 * 1024) -> None:
    """Return the gathered layers' memory to the system when freed (CPU processes, glibc).

    glibc raises its mmap threshold each time a large block is freed, so the next layers' all-gather buffers
    come from the heap, which keeps them: measured with benchmarks/fsdp_memory.py, a rank then peaks at 0.84x
    DDP's memory instead of 0.64x. A fixed threshold (`mallopt(M_MMAP_THRESHOLD)`) stops that.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, size)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: nothing to tune
        pass


@contextmanager
def whole_root(module: nn.Module) -> Iterator[None]:
    """Hold the root unit's parameters (embeddings, final norm, head) gathered while code runs a part of a sharded
    model that is not the root's forward (scoring calls the decoder body): a collective; no-op unsharded.

    The root is initialized first, as its first forward would, so no decoder layer takes the root's role.
    """
    from torch.distributed.fsdp import FSDPModule

    roots: list[Any] = []
    for m in module.modules():
        if isinstance(m, FSDPModule) and not any(r is m or _contains(r, m) for r in roots):
            roots.append(m)
    for root in roots:
        root._get_fsdp_state()._lazy_init()  # what the root's first forward does (no public entry point)
        root.unshard()
    try:
        yield
    finally:
        for root in roots:
            root.reshard()


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


# ----------------------------------------------------------------------------- DropModule, sharded
def gathered_dir(module: Any, slice_bytes: int | None = SLICE_BYTES) -> str | None:
    """The full weights of `module.model` (sharded) as a Hugging Face directory on rank zero, None elsewhere.

    A collective: every rank calls it. Gathered once per model state (step, drops, adapters) and kept in a
    temporary directory until `drop_gathered` (the module's teardown); tensors larger than `slice_bytes` leave
    the ranks in row slices (`gather_to_directory`).
    """
    import tempfile

    trainer = module.trainer
    key = (trainer.global_step, tuple(map(tuple, module.drop_plan)), repr(module.lora_config))
    cached = getattr(module, "_gathered", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    drop_gathered(module)
    directory = tempfile.mkdtemp(prefix="lightning_drop_gathered_") if trainer.is_global_zero else None
    gather_to_directory(module.model, directory, module.hf_model.config, module.lora_config,
                        get_spec(module.hf_model).layer_prefix, slice_bytes)
    module._gathered = (key, directory)
    trainer.strategy.barrier("gathered_dir")
    return directory


def drop_gathered(module: Any) -> None:
    """Remove the gathered copy of `gathered_dir` (rank zero's temporary directory)."""
    import shutil

    cached = getattr(module, "_gathered", None)
    if cached is not None and cached[1] is not None:
        shutil.rmtree(cached[1], ignore_errors=True)
    module._gathered = None


def save_sharded(module: Any, out_dir: str, slice_bytes: int | None = SLICE_BYTES) -> None:
    """Write the dropped checkpoint of a sharded `module.model`: gathered a layer (or a row slice of a tensor
    larger than `slice_bytes`) at a time, then written by the streamed writer on rank zero, one slice at a
    time: rank zero holds one layer or one slice, never the whole model. Every rank calls it."""
    from lightning.pytorch.utilities import rank_zero_info

    from ..scoring.streamed_writer import write_dropped_streaming

    source = gathered_dir(module, slice_bytes)
    if module.trainer.is_global_zero:
        write_dropped_streaming(source, out_dir, tokenizer=module.tokenizer,
                                dtype=getattr(torch, module.hparams.dtype), max_shard_size="5GB",
                                slice_bytes=slice_bytes)
        rank_zero_info(f"saved the {'dropped ' if any(module.drop_plan) else ''}model to {out_dir}")
    module.trainer.strategy.barrier("save_sharded")


def unshard_module(module: Any) -> None:
    """Replace the sharded `module.model` by a plain one with the full weights on every rank (a collective).

    Used before a change of structure during training (a drop, adapters attached or merged): the change is
    made on the plain model and `reshard_module` shards it again. The optimizer state of every parameter is
    kept by name for that rebuild (`module._state_by_name`). Correct rather than lean: for that moment every
    rank holds the whole model, as under DDP.
    """
    if not is_sharded(module.model):
        return
    old = module.model
    trainer = getattr(module, "_trainer", None)
    names = {id(p): n for n, p in module.named_parameters()}  # the names `rebuild_optimizers` looks them up by
    module._state_by_name = {names[id(p)]: s for opt in (trainer.optimizers if trainer is not None else [])
                             for p, s in opt.state.items() if id(p) in names}
    trainable = {n: p.requires_grad for n, p in old.named_parameters()}
    full = {n: t for n, t in full_tensors(old, keep=True)}
    buffers = {n: b for n, b in old.named_buffers()}
    lora, config = module.lora_config, module.hf_model.config.to_dict()
    with torch.device("meta"):
        module.model = module._model_from_config(config)
        module.lora_config = None
        if lora is not None:
            module.add_lora(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                            target_modules=lora["target_modules"])
    module.model.load_state_dict(full, strict=True, assign=True)
    for name, buffer in module.model.named_buffers():
        if buffer.is_meta and name in buffers:  # non-persistent buffers (rotary tables) are not in a state dict
            owner, _, leaf = name.rpartition(".")
            module.model.get_submodule(owner).register_buffer(leaf, buffers[name].detach().clone(), persistent=False)
    module.hf_model.tie_weights()
    for name, p in module.model.named_parameters():
        p.requires_grad_(trainable.get(name, p.requires_grad))
    if trainer is not None:
        module.model.to(trainer.strategy.root_device)


def reshard_module(module: Any) -> dict[str, Any]:
    """Shard `module.model` again after `unshard_module` (every rank; nothing to do after `swap_dropped_layers`);
    returns the kept optimizer state by name (names of `module.named_parameters()`)."""
    strategy = module.trainer.strategy
    shard_model(module.model, strategy.device_mesh["data_parallel"], strategy.root_device, tensor_plan(module))
    state = getattr(module, "_state_by_name", None) or {}
    module._state_by_name = None
    return state


# ------------------------------------------------------------------------- a drop inside the sharded model
def layer_swap_refusal(module: Any) -> str | None:
    """Why a drop in the sharded `module.model` cannot swap sublayers layer by layer (`swap_dropped_layers`),
    or None when it can. Then only the layers that change are gathered; else the whole model is (`unshard_module`)."""
    from torch.distributed.fsdp import FSDPModule

    model = getattr(module, "model", None)
    if not isinstance(model, nn.Module) or not is_sharded(model):
        return "the model is not sharded"
    if getattr(module, "lora_config", None) is not None:
        # a layer is rebuilt from the model's config, which knows nothing of peft's adapters inside it
        return "LoRA adapters are attached"
    spec = get_spec(module.hf_model)
    if spec.staged or not isinstance(module.hf_model, FSDPModule):
        return "the layers are not one list under a sharded root"  # staged families: no list to put a layer back in
    if not all(isinstance(layer, FSDPModule) for layer in spec.get_layers(module.hf_model)):
        return "a decoder layer is not a unit of its own"
    return None


def swap_dropped_layers(module: Any, attn: list[int], mlp: list[int]) -> None:
    """Drop sublayers of the sharded `module.model` layer by layer (every rank; collectives): each decoder layer
    that changes is gathered (that layer only), rebuilt plain, dropped (`apply_drop`, which also marks the
    model and its config dropped) and sharded again; the other layers and the root stay sharded as they are.

    The optimizer state of the rebuilt layers' surviving parameters is kept by name (`module._state_by_name`,
    picked up by `reshard_module`): each keeps its shape and sharding, so its state still fits.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from ..core.modeling_dropped import apply_drop

    refusal = layer_swap_refusal(module)
    if refusal is not None:
        raise RuntimeError(f"cannot drop layer by layer in the sharded model: {refusal}")
    hf, strategy = module.hf_model, module.trainer.strategy
    spec, config = get_spec(hf), hf.config.to_dict()
    with torch.device("meta"):
        apply_drop(module._model_from_config(config), attn=attn, mlp=mlp)  # a wrong request fails before any change
        template = spec.get_layers(module._model_from_config(config))
    layers, changed = spec.get_layers(hf), sorted(set(attn) | set(mlp))
    names = {id(p): n for n, p in module.named_parameters()}
    rebuilt = {id(p) for i in changed for p in layers[i].parameters()}
    module._state_by_name = {names[id(p)]: s for opt in module.trainer.optimizers for p, s in opt.state.items()
                             if id(p) in rebuilt}
    for i in changed:
        old, new = layers[i], template[i]
        full = dict(full_tensors(old, keep=True))
        new.to_empty(device=strategy.root_device)
        new.load_state_dict(full, strict=True)
        for name, buffer in old.named_buffers():  # non-persistent ones (not in a state dict) as they were
            owner, _, leaf = name.rpartition(".")
            target = new.get_submodule(owner)
            if leaf in target._non_persistent_buffers_set:
                target.register_buffer(leaf, buffer.detach().clone(), persistent=False)
        trainable = {n: p.requires_grad for n, p in old.named_parameters()}
        for n, p in new.named_parameters():
            p.requires_grad_(trainable.get(n, p.requires_grad))
        layers[i] = new
        del old, full
    sharded_class, plain = type(hf), unsharded_class(hf)
    hf.__class__ = plain  # so that apply_drop switches it to the dropped class where it is not one yet
    apply_drop(hf, attn=attn, mlp=mlp)
    if type(hf) is plain:
        hf.__class__ = sharded_class
    else:  # back under FSDP as `fully_shard` puts a class it shards: a subclass of FSDPModule and of it
        hf.__class__ = type(f"FSDP{type(hf).__name__}", (FSDPModule, type(hf)),
                            {k: v for k, v in vars(sharded_class).items() if k == "__deepcopy__"})
    tp = tensor_plan(module)
    for i in changed:
        if tp is not None:  # split as the plan splits the other layers, so their optimizer state still fits
            parallelize(layers[i], *tp, prefix=layer_prefix(hf, layers[i]))
        fully_shard(layers[i], **_shard_settings(strategy.device_mesh["data_parallel"], strategy.root_device))
    _new_root_init(hf)
    rank_zero_info(f"dropped inside the sharded model: rebuilt only the changed layers {changed}")


def _new_root_init(root: nn.Module) -> None:
    """Make the root's first-forward set-up (which FSDP2 runs once) run again, so that layers sharded after it
    join the root's units rather than each becoming a root of its own at its first forward."""
    from torch.distributed.fsdp import FSDPModule

    states = [m._get_fsdp_state() for m in root.modules() if isinstance(m, FSDPModule)]
    states[0]._state_ctx.all_states.clear()  # the root's record of its units, shared with them
    for state in states:
        state._is_root = None
    states[0]._lazy_init()
