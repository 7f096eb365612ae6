"""A store of a teacher's top-k next-token log-probabilities over the training windows, so distillation can
train the student without holding the teacher.

A live teacher doubles what training holds (a 70B teacher is 140 GB in bf16) and full logits are too big to
keep (vocabulary x 2 bytes per token). The store keeps, per position of every training window, the teacher's
`k` largest log-probabilities at the distillation temperature (`values.npy`, float16 or float32) and their
token ids (`ids.npy`, int32): `k x (2 + 4)` bytes per token for float16, read back through memory maps, so
only the rows of the current batch are ever in memory. bfloat16 is not offered: it takes the same two bytes
with 3 fewer mantissa bits, and log-probabilities need none of its range.

Rows are found by the content of the window, not its position in the dataset: `keys.npy` holds a 64-bit
hash of each window's token ids and `windows.npy` the ids themselves (4 bytes per token), against which every
looked-up row is checked, so shuffled batches find their rows and a window the store does not hold is an
error, never a wrong row. `manifest.json` records what the store was computed from (k, temperature,
vocabulary, value dtype, the windows' SHA-256, a fingerprint of the teacher's weights); its digest identifies
the store in a training checkpoint. The store is written into a temporary directory renamed into place when
complete (`atomic_io`), and a directory that is not a store of these inputs is never replaced unless asked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic_io import atomic_dir, write_json
from .output_targets import check_output
from ..errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
FILES = ("values.npy", "ids.npy", "windows.npy", "keys.npy")
VALUE_DTYPES = {"float16": np.float16, "float32": np.float32}


def fingerprint(model: nn.Module) -> torch.Tensor:
    """Per-tensor (sum, sum of squares) of a model's floating weights, in float64 on the CPU: equal models
    agree to rounding, a different initialization or training does not. Summed in slices, so a large
    teacher's biggest tensor (an embedding of 1G entries) never gets a float64 copy of its own."""
    rows = []
    for t in model.state_dict().values():
        if t.is_floating_point():
            total = torch.zeros(2, dtype=torch.float64, device=t.device)
            for part in t.detach().reshape(-1).split(1 << 24):
                wide = part.double()
                total += torch.stack((wide.sum(), wide.square().sum()))
            rows.append(total)
    return torch.stack(rows).cpu()


def same_fingerprint(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two fingerprints are of the same weights (to the rounding of a move or a rebuild)."""
    return a is not None and b is not None and a.shape == b.shape and bool(
        torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6))


def _rows32(windows: torch.Tensor) -> np.ndarray:
    """The windows as contiguous int32 (what the store keeps and hashes); ids must fit."""
    if windows.ndim != 2 or windows.is_floating_point() or windows.is_complex():
        raise UserError(f"teacher logits: windows must be a [N, L] integer tensor, got {tuple(windows.shape)} "
                        f"{windows.dtype}")
    return np.ascontiguousarray(windows.detach().cpu().to(torch.int32).numpy())


def row_keys(windows: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's int32 token ids: where a window's row is found."""
    rows = windows if isinstance(windows, np.ndarray) else _rows32(windows)
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in rows],
                    dtype=np.uint64)


def windows_digest(windows: torch.Tensor) -> str:
    """SHA-256 of the windows' shape and int32 ids."""
    rows = _rows32(windows)
    return hashlib.sha256(repr(rows.shape).encode() + rows.tobytes()).hexdigest()


def manifest_for(teacher: nn.Module | None, windows: torch.Tensor, k: int, temperature: float, vocab_size: int,
                 dtype: str = "float16", teacher_fingerprint: torch.Tensor | None = None) -> dict[str, Any]:
    """What a store of these inputs records; `teacher_fingerprint` None with `teacher` None: not known here."""
    if dtype not in VALUE_DTYPES:
        raise UserError(f"teacher logits: dtype must be one of {', '.join(VALUE_DTYPES)}, got {dtype!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise UserError(f"teacher logits: k must be an integer in [1, {vocab_size}] (the vocabulary), got {k!r}")
    mark = teacher_fingerprint if teacher_fingerprint is not None else (
        fingerprint(teacher) if teacher is not None else None)
    return {"format": FORMAT, "k": k, "temperature": float(temperature), "vocab_size": int(vocab_size),
            "dtype": dtype, "rows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "windows_sha256": windows_digest(windows),
            "teacher_fingerprint": None if mark is None else mark.tolist()}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON: the identity of a store (no timestamps in it)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def mismatches(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a store's manifest and the one its inputs give now, in words (empty: the same).
    An expected teacher fingerprint of None (the teacher is not at hand) is not compared."""
    out = []
    for key, what in (("format", "format"), ("k", "k"), ("temperature", "temperature"),
                      ("vocab_size", "vocabulary size"), ("dtype", "value dtype"), ("rows", "number of windows"),
                      ("seq_len", "window length")):
        if found.get(key) != expected[key]:
            out.append(f"{what} (store {found.get(key)!r}, now {expected[key]!r})")
    if not out and found.get("windows_sha256") != expected["windows_sha256"]:
        out.append("training windows (other token ids)")
    theirs, mine = found.get("teacher_fingerprint"), expected["teacher_fingerprint"]
    if mine is not None and (theirs is None or not same_fingerprint(torch.tensor(theirs), torch.tensor(mine))):
        out.append("teacher (its weights differ)")
    return out


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete store at `path`, or None when `path` holds none."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") is None:
        return None
    if not all((path / name).is_file() for name in FILES):
        return None
    return manifest


def check_store_path(path: str | Path, option: str = "teacher_logits") -> Path:
    """Refuse, before any work, a path that is neither a store nor a place one can be written to."""
    path = Path(path).expanduser()
    if read_manifest(path) is not None:
        return path
    return check_output(path, kind="dir", overwrite=False, option=option,
                        hint="it is not a teacher-logit store; give a new path or remove it")


def check_store_options(path: Any, k: Any, dtype: Any) -> None:
    """The options of a store (`teacher_logits`, `teacher_logits_k`, `teacher_logits_dtype`), checked before
    any work: `path` None means no store."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"teacher_logits_k must be an integer >= 1, got {k!r}")
    if dtype not in VALUE_DTYPES:
        raise UserError(f"teacher_logits_dtype must be one of {', '.join(VALUE_DTYPES)}, got {dtype!r}")
    if path is not None:
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise UserError(f"teacher_logits must be a directory path or null, got {path!r}")
        check_store_path(path)


class TeacherLogitStore:
    """A written store, memory-mapped: `lookup(ids)` gives the stored top-k of each row of a batch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise UserError(f"teacher logits: {self.path} is not a complete teacher-logit store")
        self.manifest = manifest
        self.digest = manifest_digest(manifest)
        self.k, self.temperature = int(manifest["k"]), float(manifest["temperature"])
        self.vocab_size = int(manifest["vocab_size"])
        arrays = {name.split(".")[0]: np.load(self.path / name, mmap_mode="r") for name in FILES}
        n, length = manifest["rows"], manifest["seq_len"]
        shapes = {"values": (n, length, self.k), "ids": (n, length, self.k), "windows": (n, length), "keys": (n,)}
        for name, shape in shapes.items():
            if arrays[name].shape != shape:
                raise UserError(f"teacher logits: {self.path}/{name}.npy has shape {arrays[name].shape}, its "
                                f"manifest says {shape}: the store is damaged; remove it to rewrite it")
        self.values, self.ids, self.windows = arrays["values"], arrays["ids"], arrays["windows"]
        self._row: dict[int, int] = {}
        for row, key in enumerate(np.asarray(arrays["keys"]).tolist()):
            self._row.setdefault(key, row)  # a repeated window has one teacher output: its first row

    def __len__(self) -> int:
        return len(self.windows)

    def rows_of(self, ids: torch.Tensor) -> np.ndarray:
        """The store's row of each batch row, checked token by token; a row it does not hold is an error."""
        rows32 = _rows32(ids)
        if rows32.shape[1] != self.windows.shape[1]:
            raise UserError(f"teacher logits: batch rows have {rows32.shape[1]} tokens, the store at {self.path} "
                            f"holds windows of {self.windows.shape[1]}")
        found = []
        for i, (key, row) in enumerate(zip(row_keys(rows32).tolist(), rows32)):
            at = self._row.get(key)
            if at is None or not np.array_equal(self.windows[at], row):
                raise UserError(f"teacher logits: batch row {i} is not one of the {len(self)} windows in the store "
                                f"at {self.path}: the training windows changed since it was written")
            found.append(at)
        return np.asarray(found)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities [B, L, k] as stored, token ids [B, L, k] int64) of the batch rows `ids` [B, L]."""
        rows = self.rows_of(ids)
        order = np.argsort(rows)  # memory maps read fastest in file order
        values = np.empty((len(rows), *self.values.shape[1:]), self.values.dtype)
        top = np.empty((len(rows), *self.ids.shape[1:]), np.int32)
        values[order], top[order] = self.values[rows[order]], self.ids[rows[order]]
        return torch.from_numpy(values), torch.from_numpy(top).long()


@torch.no_grad()
def top_k_logprobs(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest log-probabilities of softmax(logits / T) per position and their token ids."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1, sorted=False)
    return values, ids


def _batches(windows: torch.Tensor, batch_size: int) -> Iterable[tuple[int, torch.Tensor]]:
    for start in range(0, windows.shape[0], batch_size):
        yield start, windows[start:start + batch_size]


@torch.no_grad()
def write_store(path: str | Path, teacher: nn.Module, windows: torch.Tensor, *, k: int, temperature: float = 1.0,
                dtype: str = "float16", batch_size: int = 8, manifest: dict[str, Any] | None = None,
                overwrite: bool = False) -> TeacherLogitStore:
    """Run `teacher` over every window (rows of `windows` [N, L], no padding) and store its top-k.

    `manifest`: what `manifest_for` gave (computed here when None). A non-empty `path` is replaced only with
    `overwrite`; nothing appears at `path` unless the whole store was written.
    """
    vocab = output_vocab_size(teacher)
    manifest = manifest or manifest_for(teacher, windows, k, temperature, vocab, dtype)
    target = check_output(path, kind="dir", overwrite=overwrite, option="teacher_logits",
                          hint="it is not a teacher-logit store of these inputs; give a new path or remove it")
    rows = _rows32(windows)
    n, length = rows.shape
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        with atomic_dir(target) as tmp:
            values = np.lib.format.open_memmap(tmp / "values.npy", mode="w+", dtype=VALUE_DTYPES[dtype],
                                               shape=(n, length, k))
            ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.int32, shape=(n, length, k))
            for start, batch in _batches(windows, batch_size):
                logits = teacher(input_ids=batch.to(device), use_cache=False).logits
                v, i = top_k_logprobs(logits, k, temperature)
                values[start:start + len(batch)] = v.to(torch.float32).cpu().numpy()
                ids[start:start + len(batch)] = i.to(torch.int32).cpu().numpy()
            values.flush()
            ids.flush()
            del values, ids
            np.save(tmp / "windows.npy", rows)
            np.save(tmp / "keys.npy", row_keys(rows))
            write_json(tmp / MANIFEST, manifest)
    finally:
        teacher.train(was_training)
    return TeacherLogitStore(target)


def output_vocab_size(model: nn.Module) -> int:
    """Rows of the model's output head (what its logits span), else `config.vocab_size`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def training_windows(dataset: Any) -> torch.Tensor:
    """The [N, L] token windows of a training dataset: a `WindowDataset`'s tensor, else its items' `input_ids`
    stacked (items must be unpadded and of one length: the store is keyed by the whole window)."""
    windows = getattr(dataset, "windows", None)
    if isinstance(windows, torch.Tensor) and windows.ndim == 2:
        return windows
    try:
        items = [dataset[i] for i in range(len(dataset))]
    except TypeError:
        raise UserError(f"teacher logits need a map-style training dataset (len and indexing), got "
                        f"{type(dataset).__name__}") from None
    if not items:
        raise UserError("teacher logits: the training dataset is empty")
    rows, lengths = [], set()
    for item in items:
        ids = item["input_ids"] if isinstance(item, dict) else item
        mask = item.get("attention_mask") if isinstance(item, dict) else None
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise UserError("teacher logits need unpadded training windows (an attention mask of ones): the "
                            "store is keyed by the window's token ids")
        rows.append(torch.as_tensor(ids))
        lengths.add(rows[-1].shape[-1])
    if len(lengths) != 1:
        raise UserError(f"teacher logits need training windows of one length, got lengths {sorted(lengths)[:5]}")
    return torch.stack(rows)


class StoreMismatch(UserError):
    """The store at a path was written from other inputs than the ones given now."""


def prepare_store(path: str | Path, windows: torch.Tensor, *, teacher: nn.Module | None, k: int,
                  temperature: float, vocab_size: int, dtype: str = "float16", batch_size: int = 8,
                  writer: bool = True, barrier: Callable[[], Any] = lambda: None, digest: str | None = None,
                  log: Callable[[str], Any] = lambda msg: None) -> TeacherLogitStore:
    """The store at `path` for these inputs: reused when its manifest matches, written first when absent.

    Every process of a distributed run calls this with the same inputs; `writer` (rank zero) alone writes,
    then every process calls `barrier` exactly once and opens the store (a shared file system is assumed).
    The checks before the barrier read only what every process sees alike, so all of them fail together.
    `teacher` None: none at hand (a resumed run), so its fingerprint is not compared and an absent store
    cannot be written; `digest` (from a checkpoint) must then equal the store's.
    """
    expected = manifest_for(teacher, windows, k, temperature, vocab_size, dtype)
    found = read_manifest(path)

    def check(manifest: dict[str, Any]) -> None:
        problems = mismatches(manifest, expected)
        if digest is not None and not problems and manifest_digest(manifest) != digest:
            problems.append("store (not the one the checkpoint trained with)")
        if problems:
            raise StoreMismatch(f"the teacher-logit store at {path} was written for another "
                                f"{'; '.join(problems)}: remove it or give another teacher_logits path")

    if found is not None:
        check(found)
    elif teacher is None:
        raise UserError(f"teacher logits: no store at {path} and no teacher to write it (a run resumed after the "
                        f"teacher was freed): restore the store or start the recovery again")
    error: BaseException | None = None
    if writer and found is None:
        n, length = windows.shape
        per_token = k * (np.dtype(VALUE_DTYPES[dtype]).itemsize + 4) + 4
        log(f"teacher logits: writing the top-{k} of {n} windows x {length} tokens to {path} "
            f"({n * length * per_token / 1e9:.3g} GB)")
        try:
            write_store(path, teacher, windows, k=k, temperature=temperature, dtype=dtype, batch_size=batch_size,
                        manifest=expected)
        except Exception as err:  # raised after the barrier, so the other processes are not left waiting
            error = err
    barrier()
    if error is not None:
        raise error
    if read_manifest(path) is None:
        raise UserError(f"teacher logits: no complete store at {path} after rank zero wrote it (it failed, or "
                        f"{path} is not on a file system every process sees)")
    store = TeacherLogitStore(path)
    check(store.manifest)
    if found is not None:
        log(f"teacher logits: reusing the store at {path} ({len(store)} windows, k={store.k})")
    return store
