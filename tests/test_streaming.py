"""Layer-streamed scoring and shard-by-shard dropping equal the in-memory path."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_drop.scoring import streamed_writer, streaming
from lightning_drop.cli import main
from lightning_drop.io.dropped_checkpoint import load_dropped, save_dropped
from lightning_drop.scoring.importance import compute_importance
from lightning_drop.io.tiny_models import TINY_FAMILIES, tiny_model
from lightning_drop.core.modeling_dropped import apply_drop
from lightning_drop.io.safetensors_io import INDEX_NAME, ReusedBuffer
from lightning_drop.scoring.streamed_writer import write_dropped_streaming
from lightning_drop.scoring.streaming import stream_importance

SEQ = 32  # longer than the tiny families' sliding window (8)
TINY_TEXT_FAMILIES = sorted(f for f, spec in TINY_FAMILIES.items() if spec.inputs == "text")
LONG_WINDOWS = ("llama", "qwen2", "gemma2", "gemma3")  # the cases whose windows must outrun a sliding window


def _save(tmp_path: Path, family: str, tokenizer: bool = True, **overrides) -> Path:
    model, tok = tiny_model(family, **overrides)
    out = tmp_path / f"src-{family}"
    model.save_pretrained(out, max_shard_size="150KB")  # several shards + model.safetensors.index.json
    if tokenizer:
        tok.save_pretrained(out)
    return out


def _windows(n: int = 5, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))


def _assert_close(ref, got, tol: float = 1e-5) -> None:
    assert ref.num_tokens == got.num_tokens
    for kind in ("attn", "mlp", "block"):
        for a, b in zip(ref.row(kind), got.row(kind), strict=True):
            assert (a is None) == (b is None), kind
            if a is not None:
                assert math.isclose(a, b, abs_tol=tol), (kind, ref.row(kind), got.row(kind))


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("qwen2", {"sliding_window": 8}),    # window < seq_len: sliding layers really slide
    ("qwen2", {"sliding_window": 64}),   # window > seq_len
    ("gemma2", {}),                      # sandwich norms, sliding/global alternation, scaled embedding
    ("gemma3", {}),                      # per-layer-type rotary embeddings
    # every other family: GPT-2-style decoders (`transformer.h`), learned/sinusoidal positions, hybrids,
    # and checkpoints whose names transformers renames or converts (fused MoE experts, Nemotron-H's backbone)
    *((family, {}) for family in TINY_TEXT_FAMILIES if family not in LONG_WINDOWS),
    ("arcee", {}),                       # a Llama-like family (tiny config from its config class)
])
def test_streamed_scores_equal_in_memory(tmp_path, family, overrides):
    src = _save(tmp_path, family, **overrides)
    assert (src / INDEX_NAME).is_file()
    windows = _windows() if family in LONG_WINDOWS else _windows(4, 16)
    ref = compute_importance(load_dropped(src), [windows[i:i + 2] for i in range(0, len(windows), 2)])
    got = stream_importance(src, windows, batch_size=2)
    _assert_close(ref, got)
    assert got.extra["streamed"] is True


def test_padded_batches_and_offload_dir(tmp_path):
    src = _save(tmp_path, "qwen2")
    ids = _windows(4)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding
    mask[3, -5:] = 0  # right padding
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    ref = compute_importance(load_dropped(src), batches)
    offload = tmp_path / "offload"
    got = stream_importance(src, batches, offload_dir=offload)
    _assert_close(ref, got)
    assert list(offload.iterdir()) == []  # memory-mapped hidden states are cleaned up


@pytest.mark.parametrize("metric", ["angular", "relative_magnitude", "cosine_no_residual", "reverse", "random"])
def test_every_metric(tmp_path, metric):
    src = _save(tmp_path, "llama")
    windows = _windows(4)
    ref = compute_importance(load_dropped(src), [windows[:2], windows[2:]], metric=metric, seed=3)
    got = stream_importance(src, windows, metric=metric, batch_size=2, seed=3)
    if metric in ("reverse", "random"):
        assert ref.to_dict() == got.to_dict()
    else:
        _assert_close(ref, got)


def test_dropped_checkpoint_and_extra_drops(tmp_path):
    src = _save(tmp_path, "gemma2")
    model = load_dropped(src)
    apply_drop(model, attn=[1], mlp=[2])
    dropped_dir = save_dropped(model, tmp_path / "dropped")
    windows = _windows(4)
    ref = compute_importance(load_dropped(dropped_dir), [windows[:2], windows[2:]])
    got = stream_importance(dropped_dir, windows, batch_size=2)  # stand-ins from modeling_dropped apply
    _assert_close(ref, got)
    assert got.attn[1] is None and got.mlp[2] is None and got.block[1] is not None
    # the same drop requested on top of the plain checkpoint (iterative re-scoring) scores the same
    _assert_close(ref, stream_importance(src, windows, batch_size=2, drop_attn=[1], drop_mlp=[2]))


def test_one_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    src = _save(tmp_path, "llama")
    seen = {}
    real_meta, real_release = streaming.meta_model, streaming._release

    def spy_meta(config, dtype=torch.float32):
        seen["model"] = real_meta(config, dtype)
        return seen["model"]

    def spy_release(module):
        layers = seen["model"].model.layers
        live = [i for i, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())]
        seen.setdefault("live", []).append(live)
        real_release(module)

    monkeypatch.setattr(streaming, "meta_model", spy_meta)
    monkeypatch.setattr(streaming, "_release", spy_release)
    stats: dict = {}
    stream_importance(src, _windows(4), batch_size=2, stats=stats)
    assert seen["live"] == [[], [0], [1], [2], [3]]  # embedding release, then each layer alone
    layer_params = sum(p.numel() for p in tiny_model("llama")[0].model.layers[0].parameters())
    assert stats["layer_bytes"] == layer_params * 4
    assert stats["hidden_bytes"] == 4 * SEQ * 64 * 4


def _live_cpu_storages() -> dict[int, int]:
    """data pointer -> bytes of every storage a Python-visible CPU tensor holds."""
    gc.collect()
    live = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes():
                live[storage.data_ptr()] = storage.nbytes()
    return live


def test_no_layer_outlives_its_turn(tmp_path):
    """Per-layer objects kept alive (weights, outputs, hook state) would make memory grow with depth."""
    src = _save(tmp_path, "llama")
    seen: list[tuple[int, set[int], dict[int, int]]] = []

    def on_layer(i, layer):
        weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        seen.append((i, weights, _live_cpu_storages()))

    stream_importance(src, _windows(4), batch_size=2, on_layer=on_layer)
    assert [i for i, _, _ in seen] == list(range(4))
    # every layer's weights are views of one buffer, the same for all layers
    assert all(weights == seen[0][1] for _, weights, _ in seen) and len(seen[0][1]) == 1
    # the same storages are alive while each layer runs: nothing of layer i survives into layer i + 1
    assert all(live == seen[0][2] for _, _, live in seen), [sorted(live.values()) for _, _, live in seen]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    files = lambda d: {p.name for p in d.iterdir() if "safetensors" not in p.name}  # noqa: E731
    assert files(a) == files(b)
    for name in files(a) - {"importance.png", "importance.json"}:  # reports compared by the callers
        if name.endswith((".json", ".py")):
            assert (a / name).read_text() == (b / name).read_text(), name


@pytest.mark.parametrize("family,attn,mlp", [
    ("llama", [1], [2]), ("llama", [0, 3], [0, 3]), ("gemma2", [2], []),
    # checkpoints whose names transformers converts on load: per-expert tensors fused, a renamed LM head /
    # prefix; the written names are the checkpoint's own, renumbered where blocks go
    ("deepseek_v3", [1], [2]), ("deepseek_v3", [1], [1]), ("gpt_neox", [0], [3]), ("nemotron_h", [1], [1]),
])
def test_sharded_writer_equals_save_dropped(tmp_path, family, attn, mlp):
    src = _save(tmp_path, family)
    model = load_dropped(src)
    apply_drop(model, attn=attn, mlp=mlp)
    _, tok = tiny_model(family)
    save_dropped(model, tmp_path / "mem", tok)
    write_dropped_streaming(src, tmp_path / "str", attn, mlp, tok, dtype=torch.float32, max_shard_size="100KB")
    index = json.loads((tmp_path / "str" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    reloaded = load_dropped(tmp_path / "str")
    ids = _windows(1)
    assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("target,num", [("attn", 2), ("block", 1), ("joint", 3)])
def test_drop_stream_command_matches_in_memory(tmp_path, c4_path, target, num):
    src = _save(tmp_path, "llama")
    common = ["drop", "--model", str(src), "--calibration", str(c4_path), "--num-samples", "4", "--seq-len", "48",
              "--batch-size", "2", "--target", target, "--num", str(num)]
    assert main([*common, "--output", str(tmp_path / "mem")]) == 0
    assert main([*common, "--output", str(tmp_path / "str"), "--stream", "--max-shard-size", "100KB"]) == 0
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    rep_mem = json.loads((tmp_path / "mem" / "importance.json").read_text())
    rep_str = json.loads((tmp_path / "str" / "importance.json").read_text())
    assert rep_str.pop("streamed") is True
    assert rep_str["cost"].pop("layer_loads") == 4  # one read of each layer
    for kind in ("attn", "mlp", "block"):
        assert rep_mem.pop(kind) == pytest.approx(rep_str.pop(kind), abs=1e-5)
    assert rep_mem["cost"].pop("seconds") > 0 and rep_str["cost"].pop("seconds") > 0  # timings differ
    assert rep_mem == rep_str


def test_drop_stream_iterative(tmp_path, c4_path):
    src = _save(tmp_path, "llama")
    common = ["drop", "--model", str(src), "--calibration", str(c4_path), "--num-samples", "2", "--seq-len", "32",
              "--target", "attn", "--num", "2", "--schedule", "iterative"]
    assert main([*common, "--output", str(tmp_path / "mem")]) == 0
    assert main([*common, "--output", str(tmp_path / "str"), "--stream"]) == 0
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    rounds = json.loads((tmp_path / "str" / "importance.json").read_text())["rounds"]
    assert len(rounds) == 2 and rounds[1]["scores"]["attn"].count(None) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_tokenizer_option(tmp_path, c4_path, capsys, stream):
    src = _save(tmp_path, "llama", tokenizer=False)
    args = ["drop", "--model", str(src), "--calibration", str(c4_path), "--num-samples", "2", "--seq-len", "32",
            "--num", "1", *(["--stream"] if stream else [])]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    assert "--tokenizer" in capsys.readouterr().err.replace("pass a tokenizer reference", "--tokenizer")
    assert main([*args, "--output", str(tmp_path / "b"), "--tokenizer", "tiny-llama"]) == 0
    assert (tmp_path / "b" / "tokenizer.json").is_file()


def test_stream_errors_are_one_line(tmp_path, c4_path, capsys):
    assert main(["drop", "--model", "tiny-llama", "--num", "1", "--stream", "--output", str(tmp_path / "o")]) == 2
    assert "--stream needs a local checkpoint directory" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(tiny_model("llama")[0].config.to_dict()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        stream_importance(bare, _windows(2))


@pytest.mark.slow
def test_smollm2_streamed_scores_equal_in_memory(c4_path):
    from lightning_drop.io.model_loading import load_model, resolve
    from lightning_drop.io.text_data import CalibrationConfig, calibration_windows

    model, tok = load_model("smollm2-135m")
    windows = calibration_windows(tok, CalibrationConfig(source=str(c4_path), num_samples=4, seq_len=128))
    ref = compute_importance(model, [windows[:2], windows[2:]])
    del model
    got = stream_importance(resolve("smollm2-135m"), windows, batch_size=2)
    _assert_close(ref, got)


# ------------------------------------------------------------------------------------------------------ FSDP
def test_lightning_fsdp_refuses_cpu():
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match="requires a GPU accelerator"):  # why the project shards with FSDP2
        pl.Trainer(accelerator="cpu", strategy="fsdp", devices=2, logger=False)


def test_dropped_writer_holds_one_slice_at_a_time(tmp_path, monkeypatch):
    """Whatever the shard size, the writer's memory is one slice of one tensor, less than the largest tensor."""
    src = _save(tmp_path, "llama")
    sizes: list[int] = []

    class Recording(ReusedBuffer):
        def views(self, layout, extra_bytes=0):
            out = super().views(layout, extra_bytes)
            sizes.append(self.nbytes)
            return out

    monkeypatch.setattr(streamed_writer, "ReusedBuffer", Recording)
    write_dropped_streaming(src, tmp_path / "out", [1], [2], dtype=torch.bfloat16, max_shard_size="10GB",
                            slice_bytes=4096)
    written = _tensors(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 1 and len(sizes) > len(written)
    largest = max(t.numel() * t.element_size() for t in written.values())
    assert max(sizes) <= 2 * 4096 + 2 * 64 < largest  # a slice and its staging (for the cast), 64-byte aligned
    reference = tmp_path / "whole"
    write_dropped_streaming(src, reference, [1], [2], dtype=torch.bfloat16, slice_bytes=None)
    assert _tensors(reference).keys() == written.keys()
    assert all(torch.equal(_tensors(reference)[k], t) for k, t in written.items())
