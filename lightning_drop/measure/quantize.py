"""4-bit (or 8-bit) GPTQ and AWQ of a dropped model, saved so that `load_model` reloads it.

Backend: `gptqmodel` (the maintained successor of AutoGPTQ, which also carries AWQ). It runs on CPU with
torch 2.13 / transformers 5.x: GPTQ in float32, AWQ in bfloat16 with its torch AWQ kernel. Install it with
the `quant` extra, keeping torch pinned (`pip install -c constraints.txt "lightning-drop[quant]"` where the
constraints file holds `torch==<version>`; unpinned, pip may pull a CUDA torch).

`autoawq` and `auto-gptq` are kept as named backends only to say why they cannot run on this stack.

Dropped checkpoints (`model_type: dropped_<base>`) are quantized through gptqmodel's definition of the base
family, registered under the dropped model type with `layer_modules_strict = False`, so the sublayers that
are gone are simply skipped. The model is always read from a directory (gptqmodel's offloading re-reads
weights by name from the source checkpoint, which would silently undo an in-memory drop) and with
`offload_to_disk=False`.

Quality before and after (the paper's Table 10 shape) is measured by `lightning_drop.measure.quality_table`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..io.text_data import load_documents, make_windows
from ..errors import UserError, param

from .quality_table import format_quality_table
from ..io.safetensors_io import dir_size

log = logging.getLogger(__name__)

METHODS = ("gptq", "awq")
BITS = (4, 8)
BACKENDS = ("gptqmodel", "autoawq", "auto-gptq")
GROUP_SIZES = (128, 64, 32)
AWQ_OUT_MULTIPLE = 64  # gptqmodel's AWQ clip search processes output channels in batches of 64 (or 256)
EXTRA_HINT = ("pip install -c constraints.txt 'lightning-drop[quant]' "
              "(constraints.txt pins torch==<your torch version>, so pip cannot swap in a CUDA torch)")
QUANT_REPORT = "lightning_drop_quant.json"


class QuantizationBackendError(RuntimeError):
    """A quantization backend is missing or cannot run on this machine/stack."""


@dataclass
class QuantizeResult:
    """What `quantize` did: where it wrote, with which settings, how long it took and the sizes on disk."""

    out_dir: str
    method: str
    bits: int
    group_size: int
    backend: str
    num_samples: int
    seq_len: int
    seconds: float
    size_before_bytes: int
    size_after_bytes: int
    quantized_modules: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Argument checks and backend availability
# --------------------------------------------------------------------------------------------------
def check_args(method: str, bits: int, backend: str = "gptqmodel") -> tuple[str, int, str]:
    """Normalize and validate (method, bits, backend); one-line ValueError on bad input."""
    m = str(method).lower()
    if m not in METHODS:
        raise UserError(f"unknown quantization method {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise UserError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if m == "awq" and bits != 4:
        # gptqmodel 7.6 writes 8-bit AWQ without error, but the reloaded model is wrong (measured: relative
        # logit error 0.31 at 8 bits vs 0.11 at 4 bits on the same model)
        raise UserError(f"AWQ here is 4-bit only (its 8-bit checkpoints reload wrong); use method='gptq' for {bits} bits")
    b = str(backend).lower().replace("_", "-")
    if b not in BACKENDS:
        raise UserError(f"unknown quantization backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return m, bits, b


def _use_gptqmodel() -> str:
    """The backend to use instead, as the user spells it."""
    return param("backend", "'gptqmodel'", "gptqmodel")


def backend_status(backend: str = "gptqmodel") -> str | None:
    """None when `backend` can run here, else a one-line reason (with what it needs)."""
    import importlib.util

    backend = check_args("gptq", 4, backend)[2]
    if backend == "autoawq":
        return ("backend 'autoawq' does not run on this stack: AutoAWQ 0.2.9 is deprecated by its authors "
                f"(transformers 5 unsupported) and its forward pass needs CUDA; use {_use_gptqmodel()}, "
                f"which does AWQ on CPU and GPU ({EXTRA_HINT})")
    if backend == "auto-gptq":
        return ("backend 'auto-gptq' does not run on this stack: auto-gptq 0.7.1 fails to import with "
                f"transformers 5 (no_init_weights) and is unmaintained; use {_use_gptqmodel()}, its successor "
                f"({EXTRA_HINT})")
    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"quantization needs {' and '.join(missing)}, not installed in this environment: {EXTRA_HINT}")
    return None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); Linux only, else False."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def require_backend(backend: str = "gptqmodel") -> None:
    reason = backend_status(backend)
    if reason is not None:
        raise QuantizationBackendError(reason)


def _import_gptqmodel() -> Any:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gptqmodel  # noqa: F401  (heavy: imports its kernels)

    return gptqmodel


def register_dropped_definitions() -> list[str]:
    """Make gptqmodel quantize `dropped_<base>` checkpoints with the base family's module tree.

    The dropped classes are the base classes with some sublayers replaced by parameter-free stand-ins, so
    the base definition fits once it is told that listed modules may be missing (`layer_modules_strict`).
    Returns the model types registered.
    """
    _import_gptqmodel()
    from gptqmodel.models import auto

    from ..core.architectures import DROPPED_PREFIX, SPECS

    done = []
    for spec in SPECS:
        for base in spec.model_types:
            dropped = DROPPED_PREFIX + base
            base_def = auto.MODEL_MAP.get(base)
            if base_def is None:
                continue
            if dropped not in auto.MODEL_MAP:
                auto.MODEL_MAP[dropped] = type(f"Dropped{base_def.__name__}", (base_def,),
                                               {"layer_modules_strict": False})
            if dropped not in auto.SUPPORTED_MODELS:
                auto.SUPPORTED_MODELS.append(dropped)
            done.append(dropped)
    return done


# --------------------------------------------------------------------------------------------------
# Shapes: group size and what will be quantized
# --------------------------------------------------------------------------------------------------
def quantized_linears(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{name: (in_features, out_features)} of the Linear layers inside decoder layers (built on meta)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.architectures import get_spec
    from ..core.modeling_dropped import register_auto_classes
    from ..io.model_loading import from_pretrained

    register_auto_classes()
    config = from_pretrained(AutoConfig.from_pretrained, model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    prefix = get_spec(model).layer_prefix + "."
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefix)}


def auto_group_size(in_features: Iterable[int]) -> int:
    """Largest of 128/64/32 that divides every quantized input width; -1 (per channel) if none does."""
    widths = set(in_features)
    if not widths:
        raise UserError("nothing to quantize: the model has no Linear layers inside its decoder layers")
    for g in GROUP_SIZES:
        if all(w % g == 0 for w in widths):
            return g
    return -1


def check_shapes(linears: dict[str, tuple[int, int]], method: str, group_size: int) -> None:
    if not linears:
        raise UserError("nothing to quantize: the model has no Linear layers inside its decoder layers")
    if group_size != -1:
        bad = sorted({i for i, _ in linears.values() if i % group_size})
        if bad:
            raise UserError(f"group_size {group_size} does not divide the input widths {bad}; "
                             f"leave group_size unset to pick one, or use -1 (per output channel)")
    if method == "awq":
        bad = sorted({o for _, o in linears.values() if o % AWQ_OUT_MULTIPLE})
        if bad:
            raise UserError(f"AWQ (gptqmodel) needs every quantized output width to be a multiple of "
                             f"{AWQ_OUT_MULTIPLE}; this model has {bad}: use method='gptq'")


# --------------------------------------------------------------------------------------------------
# Calibration text
# --------------------------------------------------------------------------------------------------
#: The old name of the one text reader (`lightning_drop.io.text_data.load_documents` also takes a list of texts).
read_texts = load_documents


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------
def _source_dir(model: str | os.PathLike, stack: list) -> Path:
    """A directory for `model`: an existing checkpoint dir, or a catalogue name saved to a temp dir."""
    from ..io.model_loading import load_model, resolve, tiny_family

    ref = str(model)
    if tiny_family(ref) is not None:
        from ..io.dropped_checkpoint import save_dropped

        m, tok = load_model(ref)
        tmp = Path(tempfile.mkdtemp(prefix="ld-quant-src-"))
        stack.append(tmp)
        return save_dropped(m, tmp / "model", tokenizer=tok)
    path = Path(resolve(ref))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory not found (or no config.json): {model}")
    return path


def quantize(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "gptq",
    bits: int = 4,
    group_size: int | None = None,
    calibration: str | os.PathLike | Sequence[str] | None = "c4-sample",
    num_samples: int = 64,
    seq_len: int = 512,
    backend: str = "gptqmodel",
    sym: bool = True,
    batch_size: int = 1,
    dtype: torch.dtype | str | None = None,
) -> QuantizeResult:
    """Quantize the checkpoint at `model_dir` (plain, block-dropped or sublayer-dropped) into `out_dir`.

    `calibration`: texts, a file or a sample name (see `text_data.load_documents`; default the offline C4 sample); cut into `num_samples` blocks of `seq_len` tokens
    (EOS after each document). `group_size=None` picks the largest of 128/64/32 dividing every quantized
    width. `dtype` is the precision the model is calibrated in and its unquantized tensors (embeddings,
    norms, lm_head) are saved in: default float16 on GPU; on CPU bfloat16 for AWQ (gptqmodel's CPU AWQ
    kernel needs a half type) and for GPTQ float32 unless the CPU has bfloat16 hardware (avx512_bf16/amx). The result is written atomically and reloads with
    `lightning_drop.io.model_loading.load_model(out_dir)`.
    """
    method, bits, backend = check_args(method, bits, backend)
    if calibration is None:
        raise UserError(f"quantization needs calibration text: pass {param('calibration', '...', 'SOURCE')} "
                        "(texts, a .jsonl/.txt file or a sample name)")
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or (group_size != -1 and group_size < 1)):
        raise UserError(f"group_size must be a positive integer or -1 (per output channel), got {group_size!r}")
    on_cpu = not torch.cuda.is_available()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype != "auto" else None
        if not isinstance(dtype, torch.dtype):
            raise UserError("dtype must be one of bfloat16, float16, float32 or auto")
    if dtype is None:  # CPUs without bf16 hardware emulate half matmuls (slow); AWQ's CPU kernel needs half
        if not on_cpu:
            dtype = torch.float16
        else:
            dtype = torch.bfloat16 if method == "awq" or cpu_has_fast_bf16() else torch.float32
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UserError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if method == "awq" and dtype == torch.float32:
        raise UserError("AWQ (gptqmodel) calibrates in bfloat16 or float16, not float32")
    require_backend(backend)
    if on_cpu and dtype != torch.float32 and not cpu_has_fast_bf16():
        log.warning("%s on a CPU without bfloat16 hardware (no avx512_bf16/amx_bf16): half-precision matmuls are "
                    "emulated and slow%s", method.upper(), " (AWQ cannot use float32 here)" if method == "awq"
                    else "; dtype='float32' is faster for GPTQ")
    cleanup: list[Path] = []
    try:
        src = _source_dir(model_dir, cleanup)
        linears = quantized_linears(src)
        if group_size is None:
            group_size = auto_group_size(i for i, _ in linears.values())
        check_shapes(linears, method, group_size)
        texts = load_documents(calibration)

        from transformers import AutoTokenizer

        from ..io.model_loading import from_pretrained

        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, src)
        blocks = make_windows(tokenizer, texts, seq_len, num_samples)
        calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in blocks]

        _import_gptqmodel()
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

        from ..io.dropped_checkpoint import atomic_dir

        register_dropped_definitions()
        kwargs: dict[str, Any] = dict(bits=bits, group_size=group_size, sym=sym, offload_to_disk=False,
                                      device="cpu" if on_cpu else None)
        if method == "awq":
            kwargs.update(method="awq", format="gemm")
        qconfig = QuantizeConfig(**kwargs)
        q_backend = BACKEND.AWQ_TORCH if method == "awq" and on_cpu else BACKEND.AUTO
        start = time.perf_counter()
        qmodel = GPTQModel.load(str(src), qconfig, dtype=dtype)
        qmodel.quantize(calib, batch_size=batch_size, backend=q_backend)
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            qmodel.save(str(tmp))
            _copy_remote_code(src, tmp)
            seconds = time.perf_counter() - start
            result = QuantizeResult(
                out_dir=str(out_dir), method=method, bits=bits, group_size=group_size, backend=backend,
                num_samples=int(blocks.shape[0]), seq_len=seq_len, seconds=round(seconds, 2),
                size_before_bytes=dir_size(src), size_after_bytes=dir_size(tmp),
                quantized_modules=len(linears),
            )
            (tmp / QUANT_REPORT).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        del qmodel
        log.info("quantized %s -> %s (%s %d-bit, group %d) in %.1f s: %.2f MB -> %.2f MB", model_dir, out_dir,
                 method, bits, group_size, seconds, result.size_before_bytes / 1e6, result.size_after_bytes / 1e6)
        return result
    finally:
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True)


def _copy_remote_code(src: Path, dst: Path) -> None:
    """Keep the `auto_map` modeling files of a dropped checkpoint next to its quantized copy."""
    config = json.loads((dst / "config.json").read_text()) if (dst / "config.json").is_file() else {}
    refs = {v.split(".")[0] for v in (config.get("auto_map") or {}).values() if isinstance(v, str)}
    for f in src.glob("*.py"):
        if f.stem in refs or f.name == "architectures.py" and refs:
            shutil.copyfile(f, dst / f.name)


def quantize_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, **kwargs: Any) -> QuantizeResult:
    """Save an in-memory (dropped) model to a temporary directory, then `quantize` it into `out_dir`."""
    from ..io.dropped_checkpoint import save_dropped

    tmp = Path(tempfile.mkdtemp(prefix="ld-quant-"))
    try:
        src = save_dropped(model, tmp / "model", tokenizer=tokenizer)
        return quantize(src, out_dir, **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_quantized_dir(path: str | os.PathLike) -> bool:
    p = Path(path) / "config.json"
    return p.is_file() and json.loads(p.read_text()).get("quantization_config") is not None


def format_report(res: dict[str, Any]) -> str:
    lines = [f"{res['method']} {res['bits']}-bit (group {res['group_size']}, {res['backend']}) "
             f"in {res['seconds']:.1f} s: {res['size_before_bytes'] / 1e6:.2f} MB -> {res['size_after_bytes'] / 1e6:.2f} MB"]
    if "quantized_perplexity" in res:
        lines.append(f"perplexity {res['source_perplexity']:.4f} -> {res['quantized_perplexity']:.4f} "
                     f"({res['perplexity_increase_pct']:+.2f}%) over {res['num_windows']} x {res['seq_len']} tokens")
    if res.get("table"):
        lines += ["", format_quality_table(res["table"]).rstrip()]
    if res.get("table_files"):
        lines.append("table written to " + " and ".join(res["table_files"]))
    return "\n".join(lines)
