"""Models larger than memory: layer-streamed scoring and shard-by-shard dropped checkpoints.

The reference code fits 70B models by propagating the calibration hidden states one decoder layer at a
time. `stream_importance` does the same without ever building the model: the whole CausalLM exists only
on the meta device (no storage), the embedding is read from the safetensors files, the hidden states of all
calibration windows are kept on CPU (or memory-mapped under `offload_dir`), and then for each layer i the
tensors of that one layer are read, assigned into the meta layer (`load_state_dict(assign=True)`), run over
every window batch, scored with the very hooks of `lightning_drop.scoring.importance`, and released again.

What each layer receives besides its hidden states (causal/sliding-window masks for `config.layer_types[i]`,
rotary position embeddings, position ids) is not re-implemented here: a probe stands in for the layers and
the family's own decoder `forward` is run until it calls layer i, so the arguments are exactly the ones the
full model would pass. The layer-0 hidden states are captured the same way from a real embedding.

Peak memory ~ one layer + all hidden states (N x seq_len x hidden x dtype bytes) + the embedding (only
during the first pass) + one batch of activations, whatever the number of layers: every layer is read into
the same buffer (`safetensors_io.ReusedBuffer`), the hidden states are updated in place, and the heap's free
pages are handed back after each layer (see `_trim_heap`).

`streamed_writer.write_dropped_streaming` writes the same checkpoint as `dropped_checkpoint.save_dropped` would for the in-memory
model (same tensors, names, config, remote code, tokenizer files; each shard byte for byte what
`safetensors` writes), one tensor at a time, copying tensors from the source shards and skipping the
dropped modules' tensors.

The safetensors files themselves are read and written by `lightning_drop.io.safetensors_io`; this module
decides what to read, when, and what to write.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..core.architectures import get_spec
from ..io.dropped_checkpoint import is_llm_drop_config, read_config, require_weights
from ..errors import UserError
from .forward_pass import as_batch, decoder_body, hidden_of
from .importance import ImportanceAccumulator, ImportanceScores, compute_importance
from .metrics import ImportanceMetric, resolve_metric
from ..core.modeling_dropped import apply_drop, dropped_classes, normalize_drop_list, register_auto_classes

# The safetensors reading and writing that lived here moved to `safetensors_io`; its names stay importable
# from `lightning_drop.scoring.streaming`.
from ..io.safetensors_io import (  # noqa: F401  (INDEX_NAME, SINGLE_NAME, the header reader, writer: re-exports)
    INDEX_NAME,
    SINGLE_NAME,
    ReusedBuffer,
    SafetensorsShards,
    read_safetensors_header,
    write_safetensors,
)


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


def check_weights(model_dir: str | os.PathLike, model: nn.Module) -> None:
    """Refuse, before any layer runs, a checkpoint whose tensors are not exactly the (meta) model's.

    What `dropped_checkpoint.load_complete` refuses for a loaded model, read from the safetensors headers:
    a missing tensor would otherwise end the run late, an unexpected one be silently skipped.
    """
    import re

    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in remove_tied_weights_from_state_dict(state, model).items()}
    with SafetensorsShards(model_dir) as tensors:
        found = {k: tuple(tensors._header(k)[1]) for k in tensors.keys()}

    def ignored(key: str, patterns: Any) -> bool:
        return any(re.search(p, key) for p in patterns or ())

    missing = [k for k in expected if k not in found and not ignored(k, model._keys_to_ignore_on_load_missing)]
    unexpected = [k for k in found if k not in state and not ignored(k, model._keys_to_ignore_on_load_unexpected)]
    mismatched = [(k, found[k], expected[k]) for k in expected if k in found and found[k] != expected[k]]
    require_weights(model_dir, missing, unexpected, mismatched)


def load_generation_config(model_dir: Path, config: Any) -> Any:
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
    return [as_batch(b, torch.device("cpu")) for b in windows]


# ---------------------------------------------------------------------------------------------------- scoring
def check_streamable(metric: ImportanceMetric, span: int | None = None) -> None:
    """Refuse what one layer in memory cannot score: a model metric (`loss`) runs every layer after a
    candidate's for each candidate, a span compares states several layers apart."""
    if metric.model is not None or span is not None:
        what = f"--metric {metric.name}" if metric.model is not None else "--span"
        raise UserError(f"{what} needs the whole model for every candidate, which --stream never holds: "
                        "leave out --stream (score in memory, e.g. --dtype bfloat16) or use --metric cosine")


@torch.no_grad()
def stream_importance(model_dir: str | os.PathLike, windows: Any,
                      metric: str | Callable | ImportanceMetric = "cosine", batch_size: int = 4,
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
    measure = resolve_metric(metric)
    check_streamable(measure)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    model = meta_model(config, dtype)
    check_weights(model_dir, model)
    if drop_attn or drop_mlp:
        apply_drop(model, attn=list(drop_attn), mlp=list(drop_mlp))
    if measure.positional is not None:  # no data pass, nothing loaded
        return compute_importance(model, [], metric=measure, seed=seed)
    spec = get_spec(model)
    layers = spec.get_layers(model)
    decoder = decoder_body(model)
    batches = _batches(windows, batch_size)
    if not batches:
        raise UserError("no calibration data: the batches held no real tokens")
    acc = ImportanceAccumulator(model, measure, spec).to(device)
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
            # closing the bar at once ends its line, also when the loop is interrupted
            with acc.hooks(), contextlib.closing(order) if progress else contextlib.nullcontext():
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
                        store.set(b, hidden_of(out))
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
