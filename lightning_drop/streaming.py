"""Models larger than memory: layer-streamed scoring and shard-by-shard dropped checkpoints.

The reference code fits 70B models by propagating the calibration hidden states one decoder layer at a
time. `stream_importance` does the same without ever building the model: the whole CausalLM exists only
on the meta device (no storage), the embedding is read from the safetensors files, the hidden states of all
calibration windows are kept on CPU (or memory-mapped under `offload_dir`), and then for each layer i the
tensors of that one layer are read, assigned into the meta layer (`load_state_dict(assign=True)`), run over
every window batch, scored with the very hooks of `lightning_drop.importance`, and released again.

What each layer receives besides its hidden states (causal/sliding-window masks for `config.layer_types[i]`,
rotary position embeddings, position ids) is not re-implemented here: a probe stands in for the layers and
the family's own decoder `forward` is run until it calls layer i, so the arguments are exactly the ones the
full model would pass. The layer-0 hidden states are captured the same way from a real embedding.

Peak memory ~ one layer + all hidden states (N x seq_len x hidden x dtype bytes) + the embedding (only
during the first pass) + one batch of activations, whatever the number of layers: every layer is read into
the same buffer (`ReusedBuffer`), the hidden states are updated in place, and the heap's free pages are
handed back after each layer (see `_trim_heap`).

`write_dropped_streaming` writes the same checkpoint as `dropped_checkpoint.save_dropped` would for the in-memory
model (same tensors, names, config, remote code, tokenizer files; each shard byte for byte what
`safetensors` writes), one tensor at a time, copying tensors from the source shards and skipping the
dropped modules' tensors.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .architectures import get_spec
from .dropped_checkpoint import (
    _add_remote_code,
    _compact_blocks,
    atomic_dir,
    checkpoint_kind,
    is_llm_drop_config,
    read_config,
)
from .errors import UserError
from .importance import (
    METRICS,
    ImportanceAccumulator,
    ImportanceScores,
    _as_batch,
    _decoder,
    _hidden,
    compute_importance,
)
from .modeling_dropped import (
    apply_drop,
    dropped_classes,
    dropped_layers,
    normalize_drop_list,
    register_auto_classes,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the data section, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


# ------------------------------------------------------------------------------------------ checkpoint files
class SafetensorsShards:
    """Tensor name -> file of a (possibly sharded) safetensors checkpoint; reads only the tensors asked for.

    Tensors are read with plain positional file reads, never memory-mapped: safetensors' own loader maps the
    whole file, so one 5-10 GB shard would count in full against an address-space limit (`ulimit -v`).
    Memory is the tensors asked for, nothing more.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_NAME
        self._headers: dict[Path, tuple[int, dict[str, dict[str, Any]]]] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.weight_map = {k: self.directory / v for k, v in weight_map.items()}
        elif single.is_file():
            self.weight_map = {k: single for k in self._file_header(single)[1]}
        else:
            raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.directory}: streaming reads "
                                    "safetensors checkpoints only")
        missing = sorted({str(p.name) for p in self.weight_map.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {', '.join(missing)}")

    def __enter__(self) -> "SafetensorsShards":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._headers.clear()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(name)
        return self.get_many([name], dtype=dtype)[name]

    def get_many(self, names: Iterable[str], what: str = "", dtype: torch.dtype | None = None,
                 into: ReusedBuffer | None = None) -> dict[str, torch.Tensor]:
        """Read `names` (file by file); floating tensors are cast to `dtype` one at a time as they are read.

        With `into`, the tensors are views of that buffer's one allocation (valid until its next use)
        instead of fresh tensors: see `ReusedBuffer`.
        """
        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise UserError(f"{self.directory} lacks tensors{' of ' + what if what else ''}: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        places = self._places(names, dtype, into) if into is not None else {}
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            data_start, header = self._file_header(path)
            with open(path, "rb") as f:
                for n in group:
                    if n not in header:
                        raise UserError(f"{path.name} does not hold {n}, although the index says so")
                    label = f"{path.name}:{n}"
                    if n not in places:
                        t = _read_tensor(f, data_start, header[n], label)
                        out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                        continue
                    target, staging = places[n]
                    if staging is None:
                        _read_into(f, data_start, header[n], label, target)
                    else:
                        _read_cast(f, data_start, header[n], label, target, staging)
                    out[n] = target
        return {n: out[n] for n in names}

    def _places(self, names: list[str], dtype: torch.dtype | None,
                into: ReusedBuffer) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """name -> (its view of `into`, in the dtype asked for; the uint8 staging view that a tensor to be cast
        is read through, chunk by chunk, else None). Laid out before any read: the buffer is sized once."""
        plan = []
        for n in names:
            st_dtype, shape = self._header(n)
            if st_dtype not in _TORCH_DTYPES:
                raise UserError(f"{self.weight_map[n].name}:{n}: unsupported safetensors dtype {st_dtype}")
            src = _TORCH_DTYPES[st_dtype]
            cast = dtype is not None and src.is_floating_point and src != dtype
            plan.append((n, shape, dtype if cast else src, cast))
        staging_size = min(_CAST_CHUNK, max((self.nbytes(n) for n, _, _, cast in plan if cast), default=0))
        views = into.views([(shape, d) for _, shape, d, _ in plan], staging_size)
        staging = views.pop()
        return {n: (view, staging if cast else None) for (n, _, _, cast), view in zip(plan, views)}

    def _file_header(self, path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
        if path not in self._headers:
            try:
                self._headers[path] = read_safetensors_header(path)
            except (ValueError, UnicodeDecodeError) as err:
                raise UserError(f"{path} is not a safetensors file ({err})") from None
        return self._headers[path]

    def _header(self, name: str) -> tuple[str, list[int]]:
        info = self._file_header(self.weight_map[name])[1][name]
        return info["dtype"], list(info["shape"])

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        st_dtype, shape = self._header(name)
        size = dtype.itemsize if dtype is not None else _TORCH_DTYPES[st_dtype].itemsize
        return _numel(shape) * size

    def dtype_of(self, name: str) -> str:
        return self._header(name)[0]


def _read_tensor(f: Any, data_start: int, info: dict[str, Any], label: str) -> torch.Tensor:
    """One tensor of an open safetensors file, read into fresh (non-mapped) memory."""
    if info["dtype"] not in _TORCH_DTYPES:
        raise UserError(f"{label}: unsupported safetensors dtype {info['dtype']}")
    t = torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]])
    _read_into(f, data_start, info, label, t)
    return t


def _seek_tensor(f: Any, data_start: int, info: dict[str, Any], label: str, nbytes: int) -> None:
    begin, end = info["data_offsets"]
    if end - begin != nbytes:
        raise UserError(f"{label}: header says {end - begin} bytes for shape {info['shape']} {info['dtype']}")
    f.seek(data_start + begin)


def _read_exactly(f: Any, t: torch.Tensor, label: str) -> None:
    """Fill the contiguous CPU tensor `t` with the next bytes of `f`."""
    if t.numel() and f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != t.numel() * t.element_size():
        raise UserError(f"{label}: file ends before the tensor does (truncated shard?)")


def _read_into(f: Any, data_start: int, info: dict[str, Any], label: str, t: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `t` (the tensor's dtype and shape) from an open safetensors file."""
    _seek_tensor(f, data_start, info, label, t.numel() * t.element_size())
    _read_exactly(f, t, label)


_CAST_CHUNK = 16 * 2**20  # bytes: a tensor stored in another dtype is read and cast this much at a time


def _read_cast(f: Any, data_start: int, info: dict[str, Any], label: str, target: torch.Tensor,
               staging: torch.Tensor) -> None:
    """Fill `target` from a tensor stored in another dtype, read through the uint8 `staging` chunk by chunk
    (so that a large embedding never exists twice, once per dtype)."""
    src = _TORCH_DTYPES[info["dtype"]]
    flat = target.view(-1)
    _seek_tensor(f, data_start, info, label, flat.numel() * src.itemsize)
    step = max(staging.numel() // src.itemsize, 1)  # (an empty tensor has an empty staging view)
    for start in range(0, flat.numel(), step):
        chunk = staging[:min(step, flat.numel() - start) * src.itemsize].view(src)
        _read_exactly(f, chunk, label)
        flat[start:start + chunk.numel()].copy_(chunk)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _view_as(buffer: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The start of the uint8 `buffer` as a contiguous tensor of `dtype` and `shape`."""
    nbytes = _numel(shape) * dtype.itemsize
    return buffer[:nbytes].view(dtype).view(list(shape))


_ALIGN = 64  # bytes between views: each starts as aligned as a fresh CPU allocation would


class ReusedBuffer:
    """One CPU allocation that the tensors of each layer (or each tensor written) are read into, in turn.

    Reading every layer into fresh tensors made resident memory grow by most of a layer per layer: glibc
    serves tensors of a few MB from its heap (its mmap threshold rises to the size of the first ones freed),
    and the holes that a freed layer leaves there are not reused for the next layer's equal-sized, aligned
    allocations. Reading into one buffer, grown only when a larger request comes, keeps the weights at one
    allocation whatever the number of layers. The views it hands out are valid until its next `views` call.
    """

    def __init__(self) -> None:
        self._data: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self._data is None else self._data.numel()

    def views(self, layout: Sequence[tuple[Sequence[int], torch.dtype]], extra_bytes: int = 0) -> list[torch.Tensor]:
        """Disjoint contiguous views, one per (shape, dtype) of `layout`, and last a uint8 view of `extra_bytes`."""
        offsets, end = [], 0
        for shape, dtype in (*layout, ((extra_bytes,), torch.uint8)):
            offsets.append(end)
            end += -(-_numel(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        if end == 0:
            return [torch.empty(list(shape), dtype=dtype) for shape, dtype in (*layout, ((0,), torch.uint8))]
        if end > self.nbytes:
            self._data = None  # the old allocation goes before the larger one is made
            self._data = torch.empty(end, dtype=torch.uint8)
        assert self._data is not None
        return [_view_as(self._data[off:], dtype, shape)
                for off, (shape, dtype) in zip(offsets, (*layout, ((extra_bytes,), torch.uint8)))]


# ------------------------------------------------------------------------------------------------ meta model
def load_config(model_dir: str | os.PathLike) -> Any:
    """The transformers config of a checkpoint directory (plain, dropped, or LLM-Drop reference format)."""
    from transformers import AutoConfig

    register_auto_classes()
    raw = read_config(model_dir)
    if is_llm_drop_config(raw):
        spec = get_spec(raw["model_type"])
        config_cls, _ = dropped_classes(spec)
        cfg = dict(raw)
        for key in ("auto_map", "architectures", "model_type"):
            cfg.pop(key, None)
        n = cfg.get("num_hidden_layers")
        cfg["drop_attn_list"] = normalize_drop_list(cfg.get("drop_attn_list"), n)
        cfg["drop_mlp_list"] = normalize_drop_list(cfg.get("drop_mlp_list"), n)
        cfg["base_model_type"] = raw["model_type"]
        return config_cls(**cfg)
    get_spec(str(raw.get("model_type", "")))  # one-line error for an unsupported architecture
    return AutoConfig.from_pretrained(str(model_dir))


def meta_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The CausalLM of `config` on the meta device (no storage), dropped stand-ins in place."""
    import transformers

    spec = get_spec(config)
    config_cls, model_cls = dropped_classes(spec)
    cls = model_cls if isinstance(config, config_cls) else getattr(transformers, spec.causal_lm_class)
    with torch.device("meta"):
        model = cls(config)
    return model.to(dtype).eval()


def _generation_config(model_dir: Path, config: Any) -> Any:
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(model_dir))
    return GenerationConfig.from_model_config(config)


# ------------------------------------------------------------------------------------ layer argument probing
class _Reached(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("probe reached")
        self.args, self.kwargs = args, kwargs


class _Probe(nn.Module):
    """Stands in for decoder layer `index`: passes the hidden states on, or stops the forward at the target."""

    def __init__(self, index: int, target: list[int]) -> None:
        super().__init__()
        self.index, self.target = index, target

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.index == self.target[0]:
            raise _Reached(args, kwargs)
        return args[0] if args else kwargs["hidden_states"]


class _LayerArgs:
    """The exact (args, kwargs) the family's decoder forward passes to layer i, for one batch.

    The decoder runs with probes in place of its layers; masks, rotary embeddings and position ids are
    built by the family's own code from the batch's shape and attention mask.
    """

    def __init__(self, decoder: nn.Module, num_layers: int) -> None:
        self.decoder = decoder
        self.target = [0]
        self.probes = nn.ModuleList([_Probe(j, self.target) for j in range(num_layers)])

    def __call__(self, i: int, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None) -> tuple[tuple, dict]:
        real = self.decoder.layers
        self.target[0] = i
        self.decoder.layers = self.probes
        try:
            self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         use_cache=False)
        except _Reached as reached:
            return reached.args, reached.kwargs
        finally:
            self.decoder.layers = real
        raise RuntimeError(f"{type(self.decoder).__name__}.forward never called layer {i}")


def _materialize_outside_layers(model: nn.Module, decoder: nn.Module, tensors: SafetensorsShards,
                                config: Any, dtype: torch.dtype, device: torch.device) -> None:
    """Real embedding (from the checkpoint) and rotary embedding on `device`; layers and norm stay meta."""
    prefix = next(name for name, mod in model.named_modules() if mod is decoder)
    embed = decoder.get_input_embeddings()
    embed_name = next(name for name, mod in decoder.named_children() if mod is embed)
    # Non-persistent buffers (e.g. Gemma's embed_scale) come from the family's own initializer.
    for name, buf in list(embed.named_buffers(recurse=False)):
        embed._buffers[name] = torch.empty_like(buf, device="cpu")
    model._init_weights(embed)
    keys = {k: f"{prefix}.{embed_name}.{k}" for k in embed.state_dict()}
    state = tensors.get_many(keys.values(), what="the embedding", dtype=dtype, into=ReusedBuffer())
    embed.load_state_dict({k: state[v] for k, v in keys.items()}, assign=True, strict=True)
    embed.to(device)
    rotary = getattr(decoder, "rotary_emb", None)
    if isinstance(rotary, nn.Module):
        with torch.device(device):
            decoder.rotary_emb = type(rotary)(config)


def _release(module: nn.Module) -> None:
    """Give a module's storage back (its parameters become meta tensors again)."""
    module.to_empty(device="meta")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc; elsewhere nothing to do).

    A layer's forward leaves its activations' memory free but resident in glibc's heap, in holes of sizes
    the next layer does not fit exactly, so without this resident memory still crept up layer after layer.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# --------------------------------------------------------------------------------------------- hidden states
class _HiddenStore:
    """Hidden states of every calibration batch: CPU tensors, or files memory-mapped under `offload_dir`."""

    def __init__(self, offload_dir: str | os.PathLike | None) -> None:
        self.items: list[torch.Tensor] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="hidden-", dir=offload_dir)

    def add(self, value: torch.Tensor) -> None:
        value = value.detach().to("cpu")
        if self._tmp is None:
            self.items.append(value.clone() if value.is_shared() else value)
            return
        path = Path(self._tmp.name) / f"batch-{len(self.items):06d}.bin"
        stored = torch.from_file(str(path), shared=True, size=value.numel(), dtype=value.dtype).view(value.shape)
        stored.copy_(value)
        self.items.append(stored)

    def set(self, b: int, value: torch.Tensor) -> None:
        stored = self.items[b]
        if self._tmp is None and (stored.dtype != value.dtype or stored.shape != value.shape):
            self.items[b] = value.detach().to("cpu")
            return
        # In place: each batch keeps the allocation made for layer 0, so no layer leaves a hole in the heap.
        stored.copy_(value)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.items)

    def close(self) -> None:
        self.items.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


def _batches(windows: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    if isinstance(windows, torch.Tensor):
        if windows.dim() != 2:
            raise UserError(f"calibration windows must be a 2-D LongTensor (samples x seq_len), got {tuple(windows.shape)}")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        return [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]
    return [_as_batch(b, torch.device("cpu")) for b in windows]


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def stream_importance(model_dir: str | os.PathLike, windows: Any, metric: str = "cosine", batch_size: int = 4,
                      device: str | torch.device = "cpu", offload_dir: str | os.PathLike | None = None,
                      dtype: torch.dtype | str = torch.float32, drop_attn: Sequence[int] = (),
                      drop_mlp: Sequence[int] = (), seed: int = 0, progress: bool = False,
                      stats: dict[str, Any] | None = None,
                      on_layer: Callable[[int, nn.Module], None] | None = None) -> ImportanceScores:
    """`compute_importance` of the checkpoint in `model_dir` with one decoder layer in memory at a time.

    `windows` is a LongTensor (samples x seq_len, cut into `batch_size` batches) or an iterable of batches
    (dicts with `input_ids` and optional `attention_mask`). `drop_attn`/`drop_mlp` drop further sublayers
    on top of what the checkpoint already dropped (iterative re-scoring). `stats`, when given, receives the
    sizes that bound memory (bytes of the largest layer, the embedding and the hidden states). `on_layer(i,
    layer)` is called once layer i has run over every batch, before its weights are released (memory probes,
    progress); the layer's weights are views of a buffer that the next layer overwrites, so keep none of them.
    """
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    model = meta_model(config, dtype)
    if drop_attn or drop_mlp:
        apply_drop(model, attn=list(drop_attn), mlp=list(drop_mlp))
    if metric in ("reverse", "random"):  # positional: no data pass, nothing loaded
        return compute_importance(model, [], metric=metric, seed=seed)
    spec = get_spec(model)
    layers = spec.get_layers(model)
    decoder = _decoder(model)
    batches = _batches(windows, batch_size)
    if not batches:
        raise UserError("no calibration data: the batches held no real tokens")
    acc = ImportanceAccumulator(model, metric, spec).to(device)
    store = _HiddenStore(offload_dir)
    weights = ReusedBuffer()
    layer_bytes = 0
    try:
        with SafetensorsShards(model_dir) as tensors:
            _materialize_outside_layers(model, decoder, tensors, config, dtype, device)
            embed = decoder.get_input_embeddings()
            embed_bytes = sum(p.numel() * p.element_size() for p in embed.parameters())
            probe = _LayerArgs(decoder, len(layers))
            for batch in batches:  # layer-0 inputs, exactly as the decoder computes them
                mask = batch.get("attention_mask")
                args, kwargs = probe(0, mask.to(device) if mask is not None else None,
                                     input_ids=batch["input_ids"].to(device))
                store.add(args[0] if args else kwargs["hidden_states"])
                acc.count_tokens(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
            if acc.num_tokens == 0:
                raise UserError("no calibration data: the batches held no real tokens")
            _release(embed)
            _trim_heap()
            order: Iterable[int] = range(len(layers))
            if progress:
                from tqdm.auto import tqdm

                order = tqdm(order, desc="layers (streamed)", unit="layer")
            with acc.hooks():
                for i in order:
                    layer = layers[i]
                    names = {k: f"{spec.layer_prefix}.{i}.{k}" for k in layer.state_dict()}
                    state = tensors.get_many(names.values(), what=f"layer {i}", dtype=dtype, into=weights)
                    layer.load_state_dict({k: state[v] for k, v in names.items()}, assign=True, strict=True)
                    del state
                    layer.to(device)
                    layer_bytes = max(layer_bytes, sum(p.numel() * p.element_size() for p in layer.parameters()))
                    for b, batch in enumerate(batches):
                        mask = batch.get("attention_mask")
                        mask = mask.to(device) if mask is not None else None
                        hidden = store.items[b].to(device)
                        args, kwargs = probe(i, mask, inputs_embeds=hidden)
                        acc.set_mask(mask)
                        if args:
                            out = layer(hidden, *args[1:], **kwargs)
                        else:
                            out = layer(**{**kwargs, "hidden_states": hidden})
                        store.set(b, _hidden(out))
                        del out, hidden, args, kwargs
                    if on_layer is not None:
                        on_layer(i, layer)
                    _release(layer)
                    _trim_heap()
        if stats is not None:
            stats.update(layer_bytes=layer_bytes, embedding_bytes=embed_bytes, hidden_bytes=store.nbytes())
    finally:
        store.close()
    scores = acc.scores()
    scores.extra["streamed"] = True
    return scores


# ------------------------------------------------------------------------------------------ dropped writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read shard size '{size}' (e.g. 2GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * factor)


def _target_model(model_dir: Path, config: Any, dtype: torch.dtype, attn: Sequence[int],
                  mlp: Sequence[int]) -> tuple[nn.Module, nn.Module, str, dict[int, int]]:
    """(dropped meta model, model to save, kind, layer renumbering) — the choices `save_dropped` makes."""
    model = meta_model(config, dtype)
    model.generation_config = _generation_config(model_dir, config)
    old_attn, old_mlp = dropped_layers(model) if isinstance(config, dropped_classes(get_spec(config))[0]) else ([], [])
    new_attn = sorted(set(attn) - set(old_attn))
    new_mlp = sorted(set(mlp) - set(old_mlp))
    if new_attn or new_mlp:
        apply_drop(model, attn=new_attn, mlp=new_mlp)
    spec = get_spec(model)
    kind = checkpoint_kind(model)
    target, remap = model, {}
    if kind == "blocks":
        blocks = dropped_layers(model)[0]
        target = _compact_blocks(model, spec, blocks) or model
        if target is model:
            kind = "dropped"
        else:
            keep = [i for i in range(config.num_hidden_layers) if i not in set(blocks)]
            remap = {old: new for new, old in enumerate(keep)}
    return model, target, kind, remap


def write_dropped_streaming(model_dir: str | os.PathLike, out_dir: str | os.PathLike, attn: Sequence[int] = (),
                            mlp: Sequence[int] = (), tokenizer: Any = None, dtype: torch.dtype | str | None = None,
                            max_shard_size: int | str = "2GB",
                            extra: Callable[[Path], None] | None = None) -> Path:
    """Write what `save_dropped(load_model(model_dir) with attn/mlp dropped)` writes, one shard at a time.

    `attn`/`mlp` are the drop lists (original layer indices; the checkpoint's own drops are kept either way).
    Tensors are cast to `dtype` (default: the checkpoint's own `dtype`), as the in-memory path saves the
    model in the dtype it was loaded with. Memory: the largest tensor, whatever `max_shard_size` is.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    if dtype is None:
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, target, kind, remap = _target_model(model_dir, config, dtype, attn, mlp)
    spec = get_spec(model)
    expected = list(remove_tied_weights_from_state_dict(target.state_dict(), target))
    layer_re = re.compile(rf"^{re.escape(spec.layer_prefix)}\.(\d+)\.")

    def rename(key: str) -> str:
        m = layer_re.match(key)
        if m and remap:
            old = int(m.group(1))
            return f"{spec.layer_prefix}.{remap[old]}." + key[m.end():] if old in remap else ""
        return key

    limit = _parse_size(max_shard_size)
    with SafetensorsShards(model_dir) as tensors:
        source = {}
        for key in tensors.keys():
            new = rename(key)
            if new:
                source.setdefault(new, key)
        missing = [k for k in expected if k not in source]
        if missing:
            raise UserError(f"{model_dir} lacks tensors the dropped model needs: {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
        shards: list[list[str]] = [[]]
        size = 0
        sizes = {k: tensors.nbytes(source[k], dtype if _is_float(tensors.dtype_of(source[k])) else None)
                 for k in expected}
        for key in expected:
            if shards[-1] and size + sizes[key] > limit:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += sizes[key]
        names = ([SINGLE_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        with atomic_dir(out_dir) as tmp:
            weight_map = {}
            buffer = ReusedBuffer()  # one allocation for every tensor, for the reason given there
            for name, keys in zip(names, shards):
                write_safetensors(tmp / name, tensors, {k: source[k] for k in keys}, dtype, buffer)
                weight_map.update({k: name for k in keys})
            if len(shards) > 1:
                index = {"metadata": {"total_parameters": target.num_parameters(), "total_size": sum(sizes.values())},
                         "weight_map": dict(sorted(weight_map.items()))}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            # config.json / generation_config.json exactly as `save_pretrained` writes them
            target.config.dtype = str(dtype).split(".")[1]
            target.config.architectures = [type(target).__name__]
            target.config.save_pretrained(tmp)
            if target.can_generate():
                target.generation_config.save_pretrained(tmp)
            if kind == "dropped":
                _add_remote_code(tmp, model)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if extra is not None:
                extra(tmp)
    return out_dir


def write_safetensors(path: str | os.PathLike, tensors: SafetensorsShards, names: dict[str, str],
                      dtype: torch.dtype | None = None, buffer: ReusedBuffer | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """The safetensors file `safetensors.torch.save_file` writes for {name: tensors[source]} (floating
    tensors cast to `dtype`), byte for byte, but written one tensor at a time.

    `save_file` needs every tensor of the file in memory at once: with the default 2GB shards that alone
    was most of a small model. Here the header is computed from the source headers, and each tensor is read
    (into `buffer`) and written in turn, so memory is one tensor.
    """
    from safetensors.torch import save

    metadata = {"format": "pt"} if metadata is None else metadata
    buffer = buffer or ReusedBuffer()
    layout: dict[str, tuple[torch.dtype, list[int]]] = {}
    for name, src in names.items():
        st_dtype, shape = tensors._header(src)
        cast = dtype is not None and _is_float(st_dtype)
        layout[name] = (dtype if cast else _TORCH_DTYPES[st_dtype], shape)  # type: ignore[assignment]
    # safetensors' own order of the tensors in the file (by dtype, then name), from one-element stand-ins
    probe = save({name: torch.zeros(1, dtype=d) for name, (d, _) in layout.items()}, metadata=metadata)
    probe_header = json.loads(probe[8:8 + int.from_bytes(probe[:8], "little")])
    stored_metadata = probe_header.pop("__metadata__", None)
    order = sorted(probe_header, key=lambda name: probe_header[name]["data_offsets"][0])
    header: dict[str, Any] = {} if stored_metadata is None else {"__metadata__": stored_metadata}
    offset = 0
    for name in order:
        d, shape = layout[name]
        nbytes = _numel(shape) * d.itemsize
        header[name] = {"dtype": _ST_DTYPES[d], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            t = tensors.get_many([names[name]], dtype=dtype, into=buffer)[names[name]]
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _is_float(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))
