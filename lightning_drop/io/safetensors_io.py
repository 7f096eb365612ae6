"""Safetensors files read and written one tensor at a time, with plain file reads and writes.

The streamed paths (`lightning_drop.scoring.streaming`) must stay within one layer's memory however large the
checkpoint is. `SafetensorsShards` therefore reads only the tensors asked for, with positional reads rather
than safetensors' own memory map (a mapped 5-10 GB shard counts in full against an address-space limit), and
can read them into one reused allocation (`ReusedBuffer`); `write_safetensors` writes the bytes
`safetensors.torch.save_file` would, without holding the whole file's tensors at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .atomic_io import read_json
from ..errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SLICE_BYTES = 16 * 2**20  # bytes of one tensor in memory at once where tensors are copied in slices
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}


# ------------------------------------------------------------------------------------------------- reading
def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the data section, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def dir_size(path: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    """Bytes on disk of the files matching `pattern` in `path`: by default a checkpoint's weights."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


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
            what = "a safetensors index: 'weight_map' maps each tensor name to its shard's file name"
            weight_map = read_json(index, what, {"weight_map": dict})["weight_map"]
            if not all(isinstance(v, str) and v for v in weight_map.values()):
                raise UserError(f"{index} has a 'weight_map' value that is not a file name; expected {what}")
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

    def read_slices(self, name: str, dtype: torch.dtype | None = None, into: ReusedBuffer | None = None,
                    slice_bytes: int | None = SLICE_BYTES) -> Iterator[torch.Tensor]:
        """The tensor `name` as consecutive flat slices of at most `slice_bytes` (None: one slice), floating
        tensors cast to `dtype`; each slice is a view of `into` valid until the next one, so copying a tensor
        of any size takes one slice of memory."""
        if name not in self.weight_map:
            raise KeyError(name)
        st_dtype, shape = self._header(name)
        if st_dtype not in _TORCH_DTYPES:
            raise UserError(f"{self.weight_map[name].name}:{name}: unsupported safetensors dtype {st_dtype}")
        src = _TORCH_DTYPES[st_dtype]
        out = dtype if dtype is not None and src.is_floating_point and src != dtype else src
        numel, into = _numel(shape), into or ReusedBuffer()
        step = numel if slice_bytes is None else max(1, slice_bytes // max(src.itemsize, out.itemsize))
        path = self.weight_map[name]
        data_start, header = self._file_header(path)
        label = f"{path.name}:{name}"
        with open(path, "rb") as f:
            _seek_tensor(f, data_start, header[name], label, numel * src.itemsize)
            for start in range(0, numel, max(step, 1)):
                n = min(step, numel - start)
                if out == src:
                    view = into.views([((n,), src)])[0]
                    _read_exactly(f, view, label)
                else:
                    view, staging = into.views([((n,), out)], n * src.itemsize)
                    chunk = staging.view(src)
                    _read_exactly(f, chunk, label)
                    view.copy_(chunk)
                yield view

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

    def meta(self, name: str) -> torch.Tensor:
        """The stored tensor `name` on the meta device: its dtype and shape, no data."""
        st_dtype, shape = self._header(name)
        return torch.empty(shape, dtype=_TORCH_DTYPES.get(st_dtype, torch.uint8), device="meta")


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


# ------------------------------------------------------------------------------------------------- writing
def write_safetensors(path: str | os.PathLike, tensors: SafetensorsShards, names: dict[str, str],
                      dtype: torch.dtype | None = None, buffer: ReusedBuffer | None = None,
                      metadata: dict[str, str] | None = None, slice_bytes: int | None = SLICE_BYTES) -> None:
    """The safetensors file `safetensors.torch.save_file` writes for {name: tensors[source]} (floating
    tensors cast to `dtype`), byte for byte, but written one slice of one tensor at a time.

    `save_file` needs every tensor of the file in memory at once: with the default 2GB shards that alone
    was most of a small model, and a 49,152-row embedding alone is a large part of a layer-by-layer write.
    Here the header is computed from the source headers, and each tensor is copied in slices of at most
    `slice_bytes` (read into `buffer`; None: whole tensors), so memory is one slice.
    """
    buffer = buffer or ReusedBuffer()
    layout: dict[str, tuple[torch.dtype, list[int]]] = {}
    for name, src in names.items():
        st_dtype, shape = tensors._header(src)
        cast = dtype is not None and is_float_dtype(st_dtype)
        layout[name] = (dtype if cast else _TORCH_DTYPES[st_dtype], shape)  # type: ignore[assignment]
    write_streamed(path, layout, lambda name: tensors.read_slices(names[name], dtype, buffer, slice_bytes),
                   metadata)


def write_streamed(path: str | os.PathLike, layout: dict[str, tuple[torch.dtype, Sequence[int]]],
                   pieces: Callable[[str], Iterable[torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """The safetensors file `save_file` writes for tensors of `layout` ({name: (dtype, shape)}), byte for
    byte, where the data of each tensor comes as `pieces(name)`: consecutive slices (any shape, its dtype),
    written as they come. The header is written first, from the final shapes: no tensor need ever be whole."""
    from safetensors.torch import save

    metadata = {"format": "pt"} if metadata is None else metadata
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
        header[name] = {"dtype": _ST_DTYPES[d], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            written = 0
            for piece in pieces(name):
                if piece.dtype != layout[name][0]:
                    raise RuntimeError(f"{name}: a {piece.dtype} slice for a {layout[name][0]} tensor")
                if piece.numel():
                    f.write(memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy()))
                written += piece.numel() * piece.element_size()
            begin, end = header[name]["data_offsets"]
            if written != end - begin:  # a short or long stream would shift every later tensor
                raise RuntimeError(f"{name}: {written} bytes written for a tensor of {end - begin}")


def is_float_dtype(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))
