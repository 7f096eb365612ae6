"""Text for calibration and training: load documents from anywhere, pack them into token windows.

Packing follows the LLM-Drop reference code's calibration convention: each document tokenized without special
tokens and followed by EOS, everything concatenated, cut into consecutive `seq_len` windows, the first N
used — no padding, so every position of every window is a real token.

Offline samples (no hub needed): `c4-sample`, `wiki-sample`, `tinystories-sample` come from the calibration
files inside the `exllamav2==0.3.2` wheel on PyPI, downloaded once with pip and unzipped into the cache (the
package itself is never installed: it would pull torch and compile). `c4-sample` prefers
`$LIGHTNING_DROP_C4` and the shared `c4_demo.jsonl` copy when present.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..errors import UserError, input_file
from ..core.options import CalibrationConfig

EXLLAMAV2 = "exllamav2==0.3.2"
_WHEEL_DATA = "exllamav2/conversion/standard_cal_data/"
SAMPLES = {"c4-sample": "c4.utf8", "wiki-sample": "wiki.utf8", "tinystories-sample": "tiny.utf8"}
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
_TOKENIZE_CHUNK = 64  # documents per batched tokenizer call when only the first windows are needed


# ----------------------------------------------------------------------------------------------- sources
def _cache_dir() -> Path:
    from .cache import cache_dir

    return cache_dir()


def _shared_c4() -> Path | None:
    """The shared test copy of C4, next to the repo (or under `$LIGHTNING_DROP_SHARED`)."""
    roots = [os.environ.get("LIGHTNING_DROP_SHARED"), Path(__file__).resolve().parents[3] / "shared"]
    for root in roots:
        if root and (path := Path(root) / "data" / "c4_demo.jsonl").is_file():
            return path
    return None


def fetch_sample_file(name: str) -> Path:
    """Path of an exllamav2 calibration file (`c4.utf8`, ...), downloading the wheel once into the cache."""
    out = _cache_dir() / "data" / EXLLAMAV2.replace("==", "-")
    if not (out / name).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", EXLLAMAV2,
                   "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise ConnectionError(f"could not download {EXLLAMAV2} from PyPI for its sample data ({last}); "
                                   "pass a local .jsonl/.txt/.parquet source or set LIGHTNING_DROP_C4")
            staged = Path(tmp) / "files"
            staged.mkdir()
            with zipfile.ZipFile(wheels[0]) as zf:
                for member in zf.namelist():
                    if member.startswith(_WHEEL_DATA) and not member.endswith("/"):
                        (staged / Path(member).name).write_bytes(zf.read(member))
            try:
                os.replace(staged, out)  # atomic; a concurrent fetch that won leaves `out` in place
            except OSError:
                if not (out / name).is_file():
                    raise
    path = out / name
    if not path.is_file():
        have = sorted(p.name for p in out.iterdir())
        raise FileNotFoundError(f"{name} is not in the {EXLLAMAV2} wheel data; it has {have}")
    return path


def _split_sample(name: str, text: str) -> list[str]:
    """Each exllamav2 file (`name` as in SAMPLES) separates documents its own way (looked at the files)."""
    if name == "c4.utf8":  # one document per line (C4 newlines already flattened to spaces)
        docs = text.splitlines()
    elif name == "wiki.utf8":  # wikiextractor output: <doc id=.. url=.. title=..>\nTitle\n\nBody\n</doc>
        docs = re.findall(r"<doc[^>]*>\n(.*?)</doc>", text, flags=re.S)
    else:  # tiny.utf8: TinyStories separated by <|endoftext|> lines
        docs = text.split("<|endoftext|>")
    return [d.strip() for d in docs]


def sample_source(name: str) -> Path:
    """Where a named offline sample comes from (see module docstring for the order)."""
    if name not in SAMPLES:
        raise UserError(f"unknown sample {name!r}; choose from {sorted(SAMPLES)}")
    if name == "c4-sample":
        if env := os.environ.get("LIGHTNING_DROP_C4"):
            if not Path(env).exists():
                raise FileNotFoundError(f"LIGHTNING_DROP_C4 points to a missing path: {env}")
            return Path(env)
        if shared := _shared_c4():
            return shared
    return fetch_sample_file(SAMPLES[name])


def _records_field(records: Iterator[tuple[str, Any]], field: str, where: Path) -> Iterator[str]:
    """Pull `field` from each (location, record), with errors that name the location and the fields."""
    for loc, rec in records:
        if isinstance(rec, str) and field == "text":
            yield rec
            continue
        if not isinstance(rec, dict):
            raise UserError(f"{where}{loc}: expected a JSON object with a {field!r} field, got {type(rec).__name__}")
        if field not in rec:
            raise UserError(f"{where}{loc}: no field {field!r}; available fields: {sorted(rec)}")
        if not isinstance(rec[field], str):
            kind = "null" if rec[field] is None else type(rec[field]).__name__
            raise UserError(f"{where}{loc}: field {field!r} is {kind}, not a string")
        yield rec[field]


def _not_utf8(path: Path, err: UnicodeDecodeError, where: str = "") -> UserError:
    return UserError(f"{path}{where} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r}); convert it, "
                     "e.g. iconv -f latin1 -t utf-8")


def read_utf8(path: Path) -> str:
    """A text file's contents; a file in another encoding is the user's to convert, named in one line."""
    try:
        return input_file(path, "text file").read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with input_file(path, "JSON lines file").open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err, f" line {n}") from None
            if line.strip():
                try:
                    yield f" line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n}: invalid JSON ({e.msg})") from None


def _json_records(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    """A JSON array of records/strings, a dict of columns, or JSON lines saved as `.json`."""
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError:
        yield from jsonl_records(path)
        return
    if isinstance(data, dict):
        if isinstance(data.get(field), list):
            data = [{field: v} for v in data[field]]
        else:
            raise UserError(f"{path}: no list field {field!r}; available fields: {sorted(data)}")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    yield from ((f" item {i}", rec) for i, rec in enumerate(data))


def _parquet_texts(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if field not in names:
        raise UserError(f"{path}: no column {field!r}; available fields: {names}")
    column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    return list(_records_field(((f" row {i}", {field: v}) for i, v in enumerate(column)), field, path))


def _dataset_texts(ds: Any, field: str, label: str, limit: int | None) -> list[str]:
    """Texts of a `datasets` Dataset / IterableDataset, stopping after `limit` rows."""
    names = getattr(ds, "column_names", None)  # None for some streaming datasets
    if names is not None and field not in names:
        raise UserError(f"dataset {label}: no field {field!r}; available fields: {names}")
    rows = itertools.islice(iter(ds), limit)
    return list(_records_field(((f" row {i}", r) for i, r in enumerate(rows)), field, Path(label)))


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`name[:config][@split]` -> (name, config, split)."""
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, split or None


#: Config and split used when a spec names neither: C4 needs a config, and the paper calibrates on its
#: validation split.
HUB_DEFAULTS: dict[str, tuple[str | None, str]] = {"allenai/c4": ("en", "validation"), "c4": ("en", "validation")}


def resolve_hf_spec(spec: str, split: str | None = None) -> tuple[str, str | None, str]:
    """(name, config, split) of a hub spec, with the known defaults filled in (else split `train`)."""
    name, config, spec_split = parse_hf_spec(spec)
    default_config, default_split = HUB_DEFAULTS.get(name, (None, "train"))
    return name, config or default_config, spec_split or split or default_split


def _hf_texts(spec: str, field: str, split: str | None, limit: int | None) -> list[str]:
    """Stream a hub dataset (C4 validation alone is tens of GB; streaming reads only what is used)."""
    import datasets

    name, config, split = resolve_hf_spec(spec, split)
    label = f"{name!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        return _dataset_texts(ds, field, label, limit)
    except ValueError as e:
        if "available fields" in str(e):
            raise
        err = e
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
        err = e
    first = (str(err).strip().splitlines() or [""])[0][:200]
    offline = " (HF_DATASETS_OFFLINE=1)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
    raise UserError(f"could not load Hugging Face dataset {label}{offline}: {type(err).__name__}: {first}; "
                     f"not a local file either — use a .txt/.json/.jsonl/.parquet path or 'c4-sample'") from err


def _looks_local(source: str) -> bool:
    return source.lower().endswith(LOCAL_SUFFIXES) or source.startswith(("/", "./", "../", "~", "\\")) \
        or os.path.exists(os.path.expanduser(source))


def check_source(source: str | os.PathLike | Iterable[str]) -> None:
    """Refuse a local source that cannot be read — missing, or a FIFO or device whose read would block — without
    reading it, so that a job can check its text before it loads a model."""
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) not in SAMPLES and _looks_local(os.fspath(source)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"document source not found: {path}")
        if not path.is_dir():
            input_file(path, "document source")


def load_documents(source: str | os.PathLike | Iterable[str], text_field: str = "text", split: str | None = None,
                   limit: int | None = None) -> list[str]:
    """Documents (non-blank strings, in source order) from a file, a directory, a sample name or a hub spec.

    Sources: a `.txt` file (one document) or a directory of `.txt` files (sorted by path); `.json`/`.jsonl`
    records with `text_field`; a `.parquet` column; a `datasets.save_to_disk` directory; an offline sample
    (`c4-sample`, `wiki-sample`, `tinystories-sample`); otherwise a hub spec `name[:config][@split]`. Texts
    already in memory (a list of strings) pass through the same checks, so every caller reads text one way.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1 or None, got {limit}")
    if not isinstance(source, (str, os.PathLike)):
        texts: Sequence[str] = [str(t) for t in source]
        label = "the given texts"
    elif (source := os.fspath(source)) in SAMPLES:
        path = sample_source(source)
        if path.suffix != ".utf8":
            return load_documents(path, text_field="text", limit=limit)
        texts = _split_sample(SAMPLES[source], path.read_text(encoding="utf-8"))
        label = f"{source} ({path})"
    elif _looks_local(source):
        check_source(source)
        path = Path(source).expanduser()
        label = str(path)
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if (split or "train") not in ds:
                    raise UserError(f"{path}: no split {split or 'train'!r}; available splits: {sorted(ds)}")
                ds = ds[split or "train"]
            texts = _dataset_texts(ds, text_field, label, None)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise UserError(f"no .txt files in directory {path}")
            texts = [read_utf8(p) for p in files]
        elif path.suffix.lower() == ".txt":
            texts = [read_utf8(path)]
        elif path.suffix.lower() == ".jsonl":
            texts = list(_records_field(jsonl_records(path), text_field, path))
        elif path.suffix.lower() == ".json":
            texts = list(_records_field(_json_records(path, text_field), text_field, path))
        elif path.suffix.lower() == ".parquet":
            texts = _parquet_texts(path, text_field)
        else:
            raise UserError(f"unsupported file type {path.suffix!r} for {path}; use one of {LOCAL_SUFFIXES}")
    else:
        texts = _hf_texts(source, text_field, split, limit)
        label = source
    docs = [t for t in texts if t.strip()]
    if not docs:
        raise UserError(f"no documents (all empty) in {label}")
    return docs[:limit]


# ---------------------------------------------------------------------------------------------- windows
def token_chunks(tokenizer: Any, documents: Sequence[str], eos: int) -> Iterator[list[int]]:
    """Token ids of each document + EOS, tokenized in batches (one fast-tokenizer call per chunk)."""
    for start in range(0, len(documents), _TOKENIZE_CHUNK):
        batch = list(documents[start:start + _TOKENIZE_CHUNK])
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            yield list(ids) + [eos]


def make_windows(tokenizer: Any, documents: Iterable[str], seq_len: int, num_samples: int | None = None,
                 shuffle: bool = False, seed: int = 0, max_positions: int | None = None) -> torch.Tensor:
    """LongTensor [n, seq_len]: the EOS-joined token stream cut into consecutive non-overlapping windows.

    The one window maker for calibration, training and held-out (perplexity, quantization) text alike, so
    every measure sees text cut the same way. Blank documents are skipped. The first `num_samples` windows
    (all when None), or a seeded random choice of them with `shuffle`; fewer than asked is a warning.
    `seq_len` is capped at `max_positions` (the model's context) when given.
    """
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of strings, not one string")
    docs = [d for d in documents if d.strip()]
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    if num_samples is not None and num_samples < 1:
        raise UserError(f"num_samples must be >= 1 or None, got {num_samples}")
    if max_positions is not None and seq_len > max_positions:
        warnings.warn(f"seq_len {seq_len} exceeds the model context; capped at max_positions={max_positions}",
                      stacklevel=2)
        seq_len = max_positions
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; documents are joined with EOS")
    need = None if shuffle or num_samples is None else num_samples * seq_len
    stream: list[int] = []
    for ids in token_chunks(tokenizer, docs, eos):  # stops early once the first windows are covered
        stream.extend(ids)
        if need is not None and len(stream) >= need:
            break
    available = len(stream) // seq_len
    if available == 0:
        raise UserError(f"too little text: {len(stream)} tokens available from {len(docs)} documents, "
                         f"need {seq_len} for one window of seq_len={seq_len}")
    windows = torch.tensor(stream[:available * seq_len], dtype=torch.long).view(available, seq_len)
    n = available if num_samples is None else min(num_samples, available)
    if num_samples is not None and available < num_samples:
        warnings.warn(f"only {available} windows of {seq_len} tokens available ({len(stream)} tokens), "
                      f"{num_samples} asked; using {available}", stacklevel=2)
    if shuffle:
        order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
        return windows[order]
    return windows[:n]


def calibration_windows(tokenizer: Any, cfg: CalibrationConfig | None = None,
                        max_positions: int | None = None) -> torch.Tensor:
    """`make_windows` over `cfg.source` — the one call an importance tracker needs."""
    cfg = cfg or CalibrationConfig()
    docs = load_documents(cfg.source, text_field=cfg.text_field)
    return make_windows(tokenizer, docs, cfg.seq_len, cfg.num_samples, shuffle=cfg.shuffle, seed=cfg.seed,
                        max_positions=max_positions)
