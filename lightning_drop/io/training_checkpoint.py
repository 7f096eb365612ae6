"""Reading Lightning training checkpoints (`.ckpt` files, FSDP sharded directories) without running their code.

Distinct from the dropped Hugging Face checkpoint (`dropped_checkpoint`): these are what `Trainer` writes to
resume a fit. The callbacks and DropModule read their own records from one before Lightning restores it
(to rebuild drops and LoRA before optimizers or sharding exist), and `lightning-drop fit --ckpt_path`
checks that restoring it cannot unpickle code and that it holds the configured model (`refuse_other_model`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

CKPT_KEY = "lightning_drop"  # DropModule's record in a Lightning checkpoint (drop plan, LoRA, config)


def resume_path(trainer: Any) -> str | None:
    """The checkpoint this fit will restore, when it is known before the restore (for `Callback.setup` and
    `configure_model`).

    Lightning hands `fit(ckpt_path=...)` to the checkpoint connector only after setup, so it is known early
    only when set as `trainer.ckpt_path = path` before `fit` (what `lightning-drop fit --ckpt_path` does).
    A path left over from an earlier `fit/validate` of the same trainer is not user-managed and is ignored.
    """
    path = getattr(trainer, "ckpt_path", None)
    connector = getattr(trainer, "_checkpoint_connector", None)
    if not path or (connector is not None and not getattr(connector, "_user_managed", True)):
        return None
    return os.fspath(path)


_META_CACHE: dict[tuple[tuple[str, int, int], ...], dict[str, Any]] = {}


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """`callbacks` and DropModule's record of a Lightning checkpoint, read without restoring anything.

    A checkpoint file is memory-mapped; an FSDP sharded checkpoint (a directory) keeps them in its
    `meta.pt`. None for a directory in another format (e.g. DeepSpeed's). The last result is cached.
    Nothing is read that could run code: only tensors and plain data are unpickled (`weights_only=True`),
    and a sharded directory's `.metadata` (which the restore reads with plain `pickle.load`) may name only
    the distributed-checkpoint records; anything else raises ValueError.
    """
    from lightning.fabric.strategies.fsdp import _METADATA_FILENAME

    p = Path(path)
    if p.is_dir():
        p = p / _METADATA_FILENAME
        if not p.is_file():
            return None
    elif not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    sharded = p.parent / ".metadata" if p.name == _METADATA_FILENAME and (p.parent / ".metadata").is_file() else None
    key = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in (p, sharded) if f is not None)
    if key not in _META_CACHE:
        if sharded is not None:
            _check_distributed_metadata(sharded)
        ckpt = load_plain_checkpoint(p)
        if not isinstance(ckpt, dict):
            raise UserError(f"{p} is not a Lightning checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
        _META_CACHE.clear()
        _META_CACHE[key] = {"callbacks": dict(ckpt.get("callbacks") or {}), CKPT_KEY: ckpt.get(CKPT_KEY)}
        del ckpt
    return _META_CACHE[key]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise ValueError when restoring `path` would unpickle anything beyond tensors and plain data.

    Lightning restores some layouts with loaders that run pickled code: FSDP's full checkpoints through an
    unrestricted unpickler, sharded (torch.distributed.checkpoint) directories through `pickle.load` of
    their `.metadata`, URLs with `weights_only=False`. `lightning-drop fit|validate|test --ckpt_path` calls
    this first: a file or an FSDP directory must pass `checkpoint_meta`, and every pickled file of another
    directory (DeepSpeed's) must load with `weights_only=True`.
    """
    p = Path(path)
    if checkpoint_meta(p) is None:
        for f in sorted(p.rglob("*")):
            if f.suffix in (".pt", ".ckpt", ".pth", ".bin") and f.is_file():
                load_plain_checkpoint(f)


# what torch.distributed.checkpoint pickles into `.metadata` (its record dataclasses, sizes, dtypes, paths)
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "BytesStorageMetadata", "StorageMeta",
                                              "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def _check_distributed_metadata(path: Path) -> None:
    class PlainMetadata(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            if dtype or name in _DCP_GLOBALS.get(module, ()):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")

    try:
        with open(path, "rb") as f:
            PlainMetadata(f).load()
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused to load: it names objects beyond the distributed-checkpoint records, "
                         f"and unpickling them could run code ({_unpickling_reason(err)})") from None
    except (EOFError, AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not a readable distributed-checkpoint record ({type(err).__name__})") from None


def load_plain_checkpoint(path: str | os.PathLike) -> Any:
    """`torch.load` of tensors and plain data only (memory-mapped when the file allows it).

    Unpickling a user's file with `weights_only=False` runs whatever code its objects name, so anything
    beyond torch's safe types is refused with a one-line ValueError that names the offending global.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is not possible
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused to load: it holds pickled objects beyond tensors and plain data, and "
                         f"unpickling them could run code ({_unpickling_reason(err)})") from None
    except (EOFError, KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


#: config fields that fix the shapes and names of a model's weights: a resume must agree on each one both have
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def refuse_other_model(record: dict[str, Any] | None, config: dict[str, Any], source: str) -> None:
    """Raise UserError when DropModule's checkpoint `record` holds another model than `config` (a
    `config.to_dict()`), before anything is restored: Lightning would otherwise load the weights into a
    model rebuilt from the checkpoint, and the fit would silently train a model the user did not configure.

    Drops are not compared (a resume re-applies them); a record without a saved config is refused, as it was
    not written by DropModule.
    """
    saved = (record or {}).get("hf_config")
    if not isinstance(saved, dict):
        raise UserError(f"{source} was not written by DropModule (it has no '{CKPT_KEY}' record of its model): "
                        "resume only a checkpoint of this fit's model")

    def value(cfg: dict[str, Any], key: str) -> Any:
        return cfg.get("base_model_type") or cfg.get("model_type") if key == "model_type" else cfg.get(key)

    diffs = [f"{key} {value(saved, key)} vs {value(config, key)}" for key in ARCHITECTURE_FIELDS
             if value(saved, key) is not None and value(config, key) is not None
             and value(saved, key) != value(config, key)]
    if diffs:
        name = saved.get("_name_or_path")
        raise UserError(f"{source} holds another model than the configured one ({', '.join(diffs)}; checkpoint vs "
                        f"configured): configure the model it was trained on{f' ({name})' if name else ''} or "
                        "start a new fit without it")


def model_from_config(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A random-init causal LM of a saved `config.to_dict()` (dropped classes included), weights to load next."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.modeling_dropped import register_auto_classes

    register_auto_classes()
    cfg = dict(config)
    for key in ("auto_map", "architectures", "transformers_version"):
        cfg.pop(key, None)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(hf_config).to(dtype)


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights-only error that names what was refused (its message spans paragraphs)."""
    named = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return named[-1] if named else "torch.load(weights_only=True) refused it"
