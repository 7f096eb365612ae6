"""A series of checkpoints of one model, for scoring them alike: what each reference is, checked without loading
weights, then each model loaded in turn.

A reference is a Lightning training checkpoint of a `DropModule` fit (`.ckpt`, read through
`training_checkpoint` without unpickling code: its weights, its drops and its model config), a local Hugging
Face directory (a dropped checkpoint too), a catalogue name, or a hub id with an optional `@revision` (a
branch, tag or commit: `EleutherAI/pythia-70m@step3000`). With `HF_HUB_OFFLINE=1` a revision must already be in
the local cache; one that is not is a one-line error before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import UserError
from .dropped_checkpoint import read_config
from .model_loading import catalogue_name, load_model, load_tokenizer, resolve, tiny_family
from .tiny_models import tiny_config
from .training_checkpoint import ARCHITECTURE_FIELDS, CKPT_KEY, checkpoint_meta, load_plain_checkpoint, \
    model_from_config

#: the fields that must agree along a series: the same architecture and the same vocabulary
SERIES_FIELDS = tuple(f for f in ARCHITECTURE_FIELDS if f != "tie_word_embeddings")


@dataclass
class SeriesItem:
    """One reference of a series: its kind (`ckpt`, `dir`, `catalogue`, `hub`), where it loads from, its model
    config (a `config.to_dict()`) and, for a training checkpoint, its global step."""

    ref: str
    kind: str
    path: str
    config: dict[str, Any]
    step: int | None = None

    @property
    def label(self) -> str:
        """The row name in a figure: the training step of a `.ckpt`, else the reference's last part."""
        if self.step is not None:
            return str(self.step)
        return self.ref.rstrip("/").rsplit("/", 1)[-1]


def hub_snapshot(ref: str, config_only: bool = True) -> str:
    """The local snapshot directory of `owner/name[@revision]`, downloaded when online: only `config.json` with
    `config_only` (the checks before any long work), else the whole snapshot (to load the model)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, \
        RevisionNotFoundError
    from huggingface_hub.constants import HF_HUB_OFFLINE

    repo, _, revision = ref.partition("@")
    where = f"{repo} at revision {revision}" if revision else repo
    try:
        if config_only:
            return str(Path(hf_hub_download(repo, "config.json", revision=revision or None,
                                            local_files_only=HF_HUB_OFFLINE)).parent)
        return snapshot_download(repo, revision=revision or None, local_files_only=HF_HUB_OFFLINE)
    except LocalEntryNotFoundError:
        raise UserError(f"{where} is not in the local Hugging Face cache and the hub is offline "
                        "(HF_HUB_OFFLINE=1): download it once with network, or give a local directory") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo} has no revision {revision!r} (a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo} is not a model on the hub (or it is private)") from None
    except EntryNotFoundError:
        raise UserError(f"{where} has no config.json: not a transformers model") from None


def describe(ref: str) -> SeriesItem:
    """What `ref` is, read without loading weights; a missing file or revision is a one-line error."""
    path = Path(ref).expanduser()
    if path.suffix == ".ckpt" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {ref}")
        record = (checkpoint_meta(path) or {}).get(CKPT_KEY) or {}
        if not isinstance(record.get("hf_config"), dict):
            raise UserError(f"{ref} was not written by a DropModule fit (it has no '{CKPT_KEY}' record of its "
                            "model): give the training checkpoints of a DropModule fit")
        if record.get("lora"):
            raise UserError(f"{ref} holds unmerged LoRA adapters: merge them (DropModule.load_from_checkpoint(path)"
                            ".save_pretrained(dir)) and give that directory")
        return SeriesItem(ref, "ckpt", str(path), dict(record["hf_config"]), _global_step(path))
    if path.is_dir():
        return SeriesItem(ref, "dir", str(path), read_config(path))
    family = tiny_family(ref)
    if family is not None:
        return SeriesItem(ref, "catalogue", ref, tiny_config(family).to_dict())
    if catalogue_name(ref) is not None:
        return SeriesItem(ref, "catalogue", ref, read_config(resolve(ref)))
    if ref.startswith((".", "/", "~")) or ref.split("@")[0].count("/") != 1:
        raise FileNotFoundError(f"model not found: {ref} (not a file, a directory, a catalogue name or owner/name)")
    snapshot = hub_snapshot(ref)
    return SeriesItem(ref, "hub", snapshot, read_config(snapshot))


def _global_step(path: Path) -> int | None:
    ckpt = load_plain_checkpoint(path)
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def check_series(items: Sequence[SeriesItem]) -> None:
    """One model's checkpoints: the same architecture and vocabulary throughout (compared with the first)."""
    def value(cfg: dict[str, Any], key: str) -> Any:
        return cfg.get("base_model_type") or cfg.get("model_type") if key == "model_type" else cfg.get(key)

    first = items[0]
    for item in items[1:]:
        diffs = [f"{k} {value(first.config, k)} vs {value(item.config, k)}" for k in SERIES_FIELDS
                 if value(first.config, k) is not None and value(item.config, k) is not None
                 and value(first.config, k) != value(item.config, k)]
        if diffs:
            raise UserError(f"{item.ref} is another model than {first.ref} ({', '.join(diffs)}): a series holds "
                            "checkpoints of one architecture and vocabulary")


def load_item(item: SeriesItem, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model in eval mode, its tokenizer or None) of one series item; a `.ckpt` carries no tokenizer."""
    if item.kind != "ckpt":
        return load_model(_loadable(item), dtype=dtype)
    from ..core.modeling_dropped import apply_drop

    ckpt = load_plain_checkpoint(item.path)
    record = ckpt[CKPT_KEY]
    model = model_from_config(record["hf_config"], dtype)
    attn, mlp = list(record.get("drop_attn_list") or []), list(record.get("drop_mlp_list") or [])
    if attn or mlp:
        apply_drop(model, attn=attn, mlp=mlp)
    prefix = "model."  # DropModule holds the transformers model as `.model`
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{item.ref}: its weights do not fit its recorded model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    return model.to(dtype).eval(), None


def _loadable(item: SeriesItem) -> str:
    """What `load_model` / `load_tokenizer` take for a non-`.ckpt` item (a hub snapshot is completed first)."""
    if item.kind == "hub":
        return hub_snapshot(item.ref, config_only=False)
    return item.ref if item.kind == "catalogue" else item.path


def series_tokenizer(items: Sequence[SeriesItem], tokenizer: str | None) -> Any:
    """`tokenizer` when given, else the first item's own (a `.ckpt` has none: then `tokenizer` is needed)."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    for item in items:
        if item.kind != "ckpt":
            return load_tokenizer(_loadable(item))
    raise UserError("training checkpoints (.ckpt) carry no tokenizer: pass --tokenizer (the fit's, e.g. its "
                    "model reference)")

