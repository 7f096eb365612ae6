"""Safetensors files read tensor by tensor without mapping them, and written byte for byte as safetensors does."""

from __future__ import annotations

import pytest
import torch

from lightning_drop.io import safetensors_io
from lightning_drop.io.safetensors_io import ReusedBuffer, SafetensorsShards, write_safetensors


def test_positional_reads_equal_safetensors_own_loader(tmp_path):
    """SafetensorsShards reads without mapping the file; every dtype and shape must come back bit for bit."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b.f32": torch.randn(7, generator=g),
               "c.i64": torch.arange(6).reshape(2, 3), "d.bool": torch.tensor([True, False, True]),
               "e.scalar": torch.tensor(2.5), "f.empty": torch.zeros(0, 4), "g.f16": torch.randn(4, 4).half()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ref = load_file(str(tmp_path / "model.safetensors"))
    with SafetensorsShards(tmp_path) as ct:
        got = ct.get_many(list(tensors))
        assert sorted(ct.keys()) == sorted(tensors)
        assert ct.nbytes("a.bf16") == 30 and ct.dtype_of("c.i64") == "I64"
        assert ct.get("b.f32", dtype=torch.float64).dtype == torch.float64
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # truncated shard
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsShards(tmp_path).get_many(list(tensors))


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"z.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b.f32": torch.randn(7, generator=g),
            "c.i64": torch.arange(6).reshape(2, 3), "d.bool": torch.tensor([True, False, True]),
            "e.scalar": torch.tensor(2.5), "f.empty": torch.zeros(0, 4), "a.f16": torch.randn(4, 4).half(),
            "ü.f64": torch.ones(3, dtype=torch.float64)}


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 16])  # 16 bytes: every cast goes through several staging chunks
def test_reused_buffer_reads_and_tensor_by_tensor_writes_are_exact(tmp_path, monkeypatch, dtype, chunk):
    """Reads into one reused buffer equal fresh reads; write_safetensors writes save_file's bytes, tensor by
    tensor or slice by slice."""
    from safetensors.torch import save_file

    if chunk is not None:
        monkeypatch.setattr(safetensors_io, "_CAST_CHUNK", chunk)
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in tensors.items()}
    buffer = ReusedBuffer()
    with SafetensorsShards(tmp_path) as ct:
        for _ in range(2):  # the second read reuses the allocation of the first
            got = ct.get_many(list(tensors), dtype=dtype, into=buffer)
            for k, v in ref.items():
                assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
        # None: each tensor whole; 16 bytes: every tensor in several slices, read, cast and written in turn
        write_safetensors(tmp_path / "ours.safetensors", ct, {k: k for k in tensors}, dtype, slice_bytes=chunk)
    save_file(ref, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
