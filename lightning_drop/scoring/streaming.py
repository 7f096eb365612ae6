"""Models larger than memory: layer-streamed scoring and shard-by-shard dropped checkpoints.

The reference code fits 70B models by propagating the calibration hidden states one decoder layer at a
time. `stream_importance` does the same without ever building the model: the whole CausalLM exists only
on the meta device (no storage), the embedding is read from the safetensors files, the hidden states of all
calibration windows are kept on CPU (or memory-mapped under `offload_dir`), and then for each layer i the
tensors of that one layer are read, assigned into the meta layer (`load_state_dict(assign=True)`), run over
every window batch, scored with the very hooks of `lightning_drop.scoring.importance`, and released again.

What each layer receives besides its hidden states (causal/sliding-window masks for `config.layer_types[i]`,
rotary position embeddings, position ids) is not re-implemented here: a probe stands in for the layers and
the family's own decoder `forward` is run until it calls layer i (`layer_probe`), so the arguments are exactly
the ones the full model would pass. The layer-0 hidden states are captured the same way from a real embedding.

Peak memory ~ one layer + all hidden states (N x seq_len x hidden x dtype bytes) + the embedding (only
during the first pass) + one batch of activations, whatever the number of layers: every layer is read into
the same buffer (`safetensors_io.ReusedBuffer`), the hidden states are updated in place, and the heap's free
pages are handed back after each layer (see `_trim_heap`).

The `loss` metric streams too (`LayerStream`, driven by `loss_metric.streamed_loss_scores`): in one sweep per
round each layer, read once, runs the base hidden states and the hidden states of every candidate that has
reached it (a candidate starts at its own layer with its stand-ins swapped in), and the final norm and LM head
then turn each into a loss. Memory adds one copy of the hidden states per candidate.

`streamed_writer.write_dropped_streaming` writes the same checkpoint as `dropped_checkpoint.save_dropped` would for the in-memory
model (same tensors, names, config, remote code, tokenizer files; each shard byte for byte what
`safetensors` writes), one tensor at a time, copying tensors from the source shards and skipping the
dropped modules' tensors.

The safetensors files themselves are read and written by `lightning_drop.io.safetensors_io`, under the names
transformers gives their tensors (`lightning_drop.io.checkpoint_names`: renamed prefixes, fused MoE experts);
the layer arguments come from `layer_probe`; this module decides what to read, when, and what to write.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError
from .checkpoint_meta import check_weights, load_config, meta_model
from .forward_pass import as_batch, decoder_body, hidden_of
from .importance import KINDS, ImportanceAccumulator, ImportanceScores, compute_importance, model_metric_scores
from .loss_metric import loss_scores, streamed_loss_scores
from .metrics import ImportanceMetric, resolve_metric
from ..core.architectures import get_spec
from ..core.modeling_dropped import apply_drop

from ..io.safetensors_io import ReusedBuffer, SafetensorsShards
from .layer_probe import LayerArgs, Replay, layers_replaced


def _release(module: nn.Module) -> None:
    """Give a module's weights back: its parameters and persistent buffers become meta tensors again. The
    non-persistent buffers (rotary tables, sinusoidal positions) were computed at construction, are in no
    checkpoint, and stay for the module's next load."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = torch.empty_like(buf, device="meta")


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
    """Refuse what one layer in memory cannot score: a span compares states several layers apart, and a
    model metric other than `loss` runs a model that is never built (`loss` streams each candidate's tail)."""
    if span is not None or (metric.model is not None and metric.model is not loss_scores):
        what = f"--metric {metric.name}" if span is None else "--span"
        raise UserError(f"{what} needs the whole model for every candidate, which --stream never holds: "
                        "leave out --stream (score in memory, e.g. --dtype bfloat16) or use --metric cosine")


class LayerStream:
    """A checkpoint's CausalLM on the meta device and the hidden states of its calibration batches, run
    one decoder layer at a time: each layer is read from the safetensors files, run over every batch and
    freed. `stream_importance` scores with it; the `loss` metric (`streamed_loss_scores`) also runs every
    candidate's tail and the LM head with it.

    Use: construct (checks the weights), `start()` (layer-0 inputs), `sweep(...)` (every layer once),
    `head()` (the logits of final hidden states), `close()`.
    """

    def __init__(self, model_dir: str | os.PathLike, windows: Any, batch_size: int = 4,
                 device: str | torch.device = "cpu", offload_dir: str | os.PathLike | None = None,
                 dtype: torch.dtype | str = torch.float32, drop_attn: Sequence[int] = (),
                 drop_mlp: Sequence[int] = ()) -> None:
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device, self.model_dir, self.offload_dir = torch.device(device), Path(model_dir), offload_dir
        self.config = load_config(self.model_dir)
        self.model = meta_model(self.config, self.dtype)
        self.names = check_weights(self.model_dir, self.model)
        # every name of each parameter: a tied LM head is stored under the embedding's name
        names: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        self._aliases = {name: group for group in names.values() for name in group}
        if drop_attn or drop_mlp:
            apply_drop(self.model, attn=list(drop_attn), mlp=list(drop_mlp))
        self.spec = get_spec(self.model)
        self.layers = self.spec.get_layers(self.model)
        self.decoder = decoder_body(self.model)
        self.layers_attr = self.spec.layers.split(".")[-1]
        self.windows, self.batch_size = windows, batch_size
        self.batches: list[dict[str, torch.Tensor]] = []
        self.layer_loads, self.layer_bytes, self.embed_bytes = 0, 0, 0
        self._stack = contextlib.ExitStack()
        self.store = self.new_store()
        self._weights = ReusedBuffer()

    def new_store(self) -> _HiddenStore:
        """An empty store of one hidden state per batch (memory-mapped under `offload_dir` if given)."""
        store = _HiddenStore(self.offload_dir)
        self._stack.callback(store.close)
        return store

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input ids, attention mask or None) of batch `b`, on the device."""
        batch = self.batches[b]
        mask = batch.get("attention_mask")
        return batch["input_ids"].to(self.device), mask.to(self.device) if mask is not None else None

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, mod in self.model.named_modules() if mod is module)

    def _read_state(self, keys: list[str], what: str) -> list[nn.Module]:
        """Read the model tensors `keys` (a tied one from wherever the checkpoint stores it) into the meta
        model and move their modules to the device; returns those modules."""
        source = {k: next((a for a in self._aliases.get(k, [k]) if a in self.names), k) for k in keys}
        state = self.names.read(self.tensors, dict.fromkeys(source.values()), what, self.dtype, ReusedBuffer())
        self.model.load_state_dict({k: state[v] for k, v in source.items()}, assign=True, strict=False)
        owners = list({id(m): m for m in (self.model.get_submodule(k.rpartition(".")[0]) for k in keys)}.values())
        for module in owners:
            module.to(self.device)
        return owners

    def _materialize_outside_layers(self) -> None:
        """Real weights of the decoder outside its layers (embedding, learned positions, norms) from the
        checkpoint and its buffers on the device; the layers stay meta. A rotary embedding is rebuilt on the
        device as the family builds it (its tables in float32 whatever the dtype)."""
        prefix = self._name_of(self.decoder)
        prefix = f"{prefix}." if prefix else ""
        layers = f"{prefix}{self.layers_attr}."
        self._read_state([k for k in self.model.state_dict() if k.startswith(prefix) and not k.startswith(layers)],
                         "the embedding")
        for name, child in self.decoder.named_children():
            if name != self.layers_attr:
                child.to(self.device)
        for name, buf in list(self.decoder._buffers.items()):
            if buf is not None:
                self.decoder._buffers[name] = buf.to(self.device)
        rotary = getattr(self.decoder, "rotary_emb", None)
        if isinstance(rotary, nn.Module):
            with torch.device(self.device):
                self.decoder.rotary_emb = type(rotary)(self.config)

    def start(self) -> list[int]:
        """Read the embedding, store every batch's layer-0 input (exactly as the decoder computes it) and free
        the embedding again; returns each batch's number of real tokens."""
        self.batches = _batches(self.windows, self.batch_size)
        if not self.batches:
            raise UserError("no calibration data: the batches held no real tokens")
        self.tensors = self._stack.enter_context(SafetensorsShards(self.model_dir))
        self._materialize_outside_layers()
        embed = self.decoder.get_input_embeddings()
        self.embed_bytes = sum(p.numel() * p.element_size() for p in embed.parameters())
        self.probe = LayerArgs(self.decoder, self.layers_attr, self.layers)
        tokens = []
        for b in range(len(self.batches)):
            ids, mask = self.batch(b)
            args, kwargs = self.probe(0, mask, input_ids=ids)
            self.store.add(args[0] if args else kwargs["hidden_states"])
            tokens.append(int(mask.sum()) if mask is not None else ids.numel())
        _release(embed)
        _trim_heap()
        return tokens

    def sweep(self, each: Callable[[int, nn.Module, int, torch.Tensor, Callable], None] | None = None,
              on_layer: Callable[[int, nn.Module], None] | None = None, progress: bool = False) -> None:
        """Every layer i in turn, read once: for each batch b, `each(i, layer, b, hidden, run)` (if given) sees
        the batch's input `hidden` to layer i and `run`, which applies layer i to any hidden states of that
        batch with the arguments the decoder would pass; then the stored state becomes layer i's output."""
        order: Iterable[int] = range(len(self.layers))
        if progress:
            from tqdm.auto import tqdm

            order = tqdm(order, desc="layers (streamed)", unit="layer")
        # closing the bar at once ends its line, also when the loop is interrupted
        with contextlib.closing(order) if progress else contextlib.nullcontext():
            for i in order:
                layer = self.layers[i]
                names = {k: f"{self.spec.layer_prefix}.{i}.{k}" for k in layer.state_dict()}
                state = self.names.read(self.tensors, names.values(), f"layer {i}", self.dtype, self._weights)
                layer.load_state_dict({k: state[v] for k, v in names.items()}, assign=True, strict=True)
                del state
                layer.to(self.device)
                self.layer_loads += 1
                self.layer_bytes = max(self.layer_bytes, sum(p.numel() * p.element_size() for p in layer.parameters()))
                for b in range(len(self.batches)):
                    _, mask = self.batch(b)
                    hidden = self.store.items[b].to(self.device)
                    args, kwargs = self.probe(i, mask, inputs_embeds=hidden)

                    def run(h: torch.Tensor, layer: nn.Module = layer, args: tuple = args,
                            kwargs: dict = kwargs) -> torch.Tensor:
                        return hidden_of(layer(h, *args[1:], **kwargs) if args
                                         else layer(**{**kwargs, "hidden_states": h}))

                    if each is not None:
                        each(i, layer, b, hidden, run)
                    self.store.set(b, run(hidden))
                    del hidden, args, kwargs, run
                if on_layer is not None:
                    on_layer(i, layer)
                _release(layer)
                _trim_heap()

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[int, torch.Tensor], torch.Tensor]]:
        """Inside: `logits(b, last)` of batch b from its last layer's output, by the family's own forward
        (final norm, LM head, any soft-capping) with every layer replaying `last`; the modules outside the
        layers and the embedding are read once on entry and freed on exit."""
        prefixes = (f"{self.spec.layer_prefix}.", self._name_of(self.decoder.get_input_embeddings()) + ".")
        wanted = [k for k in self.model.state_dict() if not k.startswith(prefixes)]
        owners = self._read_state(wanted, "the final norm and LM head")
        replay = Replay()
        replays = nn.ModuleList([replay] * len(self.layers))

        def logits(b: int, last: torch.Tensor) -> torch.Tensor:
            _, mask = self.batch(b)
            replay.value = last.to(self.device)
            try:
                with layers_replaced(self.decoder, self.layers_attr, replays):
                    return self.model(inputs_embeds=replay.value, attention_mask=mask, use_cache=False).logits
            finally:
                replay.value = None

        try:
            yield logits
        finally:
            for module in owners:
                _release(module)
            _trim_heap()

    def close(self) -> None:
        self._stack.close()


@torch.no_grad()
def stream_importance(model_dir: str | os.PathLike, windows: Any,
                      metric: str | Callable | ImportanceMetric = "cosine", batch_size: int = 4,
                      device: str | torch.device = "cpu", offload_dir: str | os.PathLike | None = None,
                      dtype: torch.dtype | str = torch.float32, drop_attn: Sequence[int] = (),
                      drop_mlp: Sequence[int] = (), seed: int = 0, progress: bool = False,
                      stats: dict[str, Any] | None = None,
                      on_layer: Callable[[int, nn.Module], None] | None = None,
                      kinds: Sequence[str] = KINDS) -> ImportanceScores:
    """`compute_importance` of the checkpoint in `model_dir` with one decoder layer in memory at a time.

    `windows` is a LongTensor (samples x seq_len, cut into `batch_size` batches) or an iterable of batches
    (dicts with `input_ids` and optional `attention_mask`). `drop_attn`/`drop_mlp` drop further sublayers
    on top of what the checkpoint already dropped (iterative re-scoring). `stats`, when given, receives the
    sizes that bound memory (bytes of the largest layer, the embedding and the hidden states). `on_layer(i,
    layer)` is called once layer i has run over every batch, before its weights are released (memory probes,
    progress); the layer's weights are views of a buffer that the next layer overwrites, so keep none of them.
    `kinds`: the rows the `loss` metric scores (its cost grows with the candidates; see `streamed_loss_scores`).
    """
    measure = resolve_metric(metric)
    check_streamable(measure)
    stream = LayerStream(model_dir, windows, batch_size, device, offload_dir, dtype, drop_attn, drop_mlp)
    try:
        if measure.positional is not None:  # no data pass, nothing loaded
            return compute_importance(stream.model, [], metric=measure, seed=seed)
        if measure.model is not None:
            out = streamed_loss_scores(stream, kinds, on_layer=on_layer, progress=progress)
            scores = model_metric_scores(measure, stream.model, out)
        else:
            acc = ImportanceAccumulator(stream.model, measure, stream.spec).to(stream.device)
            for count in stream.start():
                acc.count_tokens(count)
            if acc.num_tokens == 0:
                raise UserError("no calibration data: the batches held no real tokens")
            with acc.hooks():
                stream.sweep(lambda i, layer, b, hidden, run: acc.set_mask(stream.batch(b)[1]), on_layer, progress)
            scores = acc.scores()
        if stats is not None:
            stats.update(layer_bytes=stream.layer_bytes, embedding_bytes=stream.embed_bytes,
                         hidden_bytes=stream.store.nbytes())
    finally:
        stream.close()
    scores.extra["streamed"] = True
    scores.extra["layer_loads"] = stream.layer_loads
    return scores
