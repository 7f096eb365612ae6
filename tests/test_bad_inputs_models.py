"""Models, tokenizers and checkpoints through the command line: saved weights are the source's, a checkpoint
whose weights disagree with its config is refused by name, one resolution rule for names, tokenizers that
belong to the model, GGUF files this tool cannot read, and options that would do nothing.

Every refusal runs the real entry point and must be one `error:` line, exit 2, nothing on disk changed
(`_fails_in_one_line` of tests/test_bad_inputs.py, with its `world` of inputs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_inputs import _copy_model, _fails_in_one_line

import lightning_drop as ld
from lightning_drop.cli import main
from lightning_drop.io.tiny_models import byte_tokenizer, tiny_model

COMMON = ["--num-samples", "2", "--seq-len", "32", "--num", "1"]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ------------------------------------------------------------------------ saved weights are the source's
@pytest.mark.parametrize("stream", [False, True])
def test_scoring_dtype_never_rounds_the_saved_weights(world, tmp_path, stream):  # noqa: F811
    """--dtype bfloat16 scores in bf16; the float32 checkpoint it writes holds the source's bits."""
    extra = ["--stream"] if stream else []
    out = tmp_path / "out"
    assert main(["drop", "--model", str(world / "model"), "--calibration", str(world / "c4.jsonl"), *COMMON,
                 "--target", "attn", "--dtype", "bfloat16", *extra, "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    src, saved = _tensors(world / "model"), _tensors(out)
    assert saved and set(saved) < set(src)  # one attention sublayer's tensors are gone
    assert all(_same_bits(saved[k], src[k]) for k in saved), [k for k in saved if not _same_bits(saved[k], src[k])]

    half = tmp_path / "half"  # --save-dtype still casts, once, from the source
    assert main(["drop", "--model", str(world / "model"), "--calibration", str(world / "c4.jsonl"), *COMMON,
                 "--target", "attn", "--dtype", "bfloat16", "--save-dtype", "float16", *extra,
                 "--output", str(half)]) == 0
    assert all(_same_bits(t, src[k].to(torch.float16)) for k, t in _tensors(half).items())


def test_catalogue_model_scored_in_bf16_saves_its_float32_weights(world, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(["drop", "--model", "tiny-llama", "--calibration", str(world / "c4.jsonl"), *COMMON,
                 "--target", "mlp", "--dtype", "bfloat16", "--output", str(out)]) == 0
    source = tiny_model("llama")[0].state_dict()
    saved = _tensors(out)
    assert saved and all(_same_bits(t, source[k]) for k, t in saved.items())


# ------------------------------------------------------------------ weights that disagree with the config
def _edit_config(world: Path, tmp: Path, name: str, **changes) -> Path:
    d = _copy_model(world, name, tmp)
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))
    return d


def _dropped_with_wrong_list(world: Path, tmp: Path) -> Path:
    """A dropped checkpoint (attention 1 gone) whose config.json says attention 2 is the one dropped."""
    model, tok = tiny_model("llama")
    ld.apply_drop(model, attn=[1])
    d = ld.save_dropped(model, tmp / "wrong-list", tok)
    config = json.loads((d / "config.json").read_text())
    assert config["drop_attn_list"] == [1]
    config["drop_attn_list"] = [2]
    (d / "config.json").write_text(json.dumps(config))
    return d


def _without_layer(world: Path, tmp: Path) -> Path:
    d = _copy_model(world, "no-layer-3", tmp)
    state = {k: v for k, v in load_file(d / "model.safetensors").items() if ".layers.3." not in k}
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


WEIGHT_CASES: list[tuple[str, Callable[[Path, Path], Path], str]] = [
    ("drop-list-disagrees", _dropped_with_wrong_list,
     "weights do not match config.json: 5 missing (model.layers.1.input_layernorm.weight"),
    ("more-layers-than-weights", lambda w, t: _edit_config(w, t, "five", num_hidden_layers=5),
     "weights do not match config.json: 9 missing (model.layers.4."),
    ("sizes-disagree", lambda w, t: _edit_config(w, t, "narrow", intermediate_size=96),
     "of another shape than config.json gives (model.layers.0.mlp.down_proj.weight [64, 128] vs config [64, 96]"),
    ("tensor-missing", _without_layer, "weights do not match config.json: 9 missing (model.layers.3."),
]


@pytest.mark.parametrize("command", ["perplexity", "speed", "drop", "drop-stream"])
@pytest.mark.parametrize("name,make,expect", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_weights_that_disagree_with_config_are_refused_by_name(world, tmp_path, capsys, command, name, make,  # noqa: F811
                                                               expect):
    """Never a random re-init: every loader (in memory, streamed) names the tensors in one line."""
    src = str(make(world, tmp_path))
    argv = {"perplexity": ["perplexity", "--model", src, "--data", str(world / "c4.jsonl"), "--seq-len", "32",
                           "--num-windows", "2"],
            "speed": ["speed", "--model", src, "--repeats", "1"],
            "drop": ["drop", "--model", src, "--calibration", str(world / "c4.jsonl"), *COMMON,
                     "--output", str(tmp_path / "o")],
            "drop-stream": ["drop", "--model", src, "--stream", "--calibration", str(world / "c4.jsonl"), *COMMON,
                            "--output", str(tmp_path / "o")]}[command]
    _fails_in_one_line(world, tmp_path, capsys, argv, expect)


# ------------------------------------------------------------------------------------ one resolution rule
@pytest.mark.parametrize("stream", [False, True])
def test_a_folder_named_like_a_catalogue_entry_is_that_folder(world, tmp_path, monkeypatch, stream):  # noqa: F811
    """`tiny-llama` in the working directory is the user's 2-layer model, with and without --stream."""
    model, tok = tiny_model("llama", num_layers=2, seed=7)
    ld.save_dropped(model, tmp_path / "tiny-llama", tok)
    monkeypatch.chdir(tmp_path)
    extra = ["--stream"] if stream else []
    assert main(["drop", "--model", "tiny-llama", "--calibration", str(world / "c4.jsonl"), *COMMON, *extra,
                 "--output", "out"]) == 0
    assert len(json.loads(Path("out/importance.json").read_text())["attn"]) == 2
    source = _tensors(tmp_path / "tiny-llama")
    assert all(_same_bits(t, source[k]) for k, t in _tensors(tmp_path / "out").items())


@pytest.mark.parametrize("stream", [False, True])
def test_a_folder_named_like_a_catalogue_entry_is_never_replaced_by_it(world, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                                       stream):
    """A folder `smollm2-135m` that is not a checkpoint is refused by its name, not swapped for the real model."""
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    argv = ["drop", "--model", "smollm2-135m", "--calibration", str(world / "c4.jsonl"), *COMMON,
            *(["--stream"] if stream else []), "--output", "out"]
    _fails_in_one_line(world, tmp_path, capsys, argv, "smollm2-135m")


# ------------------------------------------------------------------------------------------------ tokenizers
def _tokenizer_dir(tmp: Path, name: str, extra_tokens: int) -> Path:
    tok = byte_tokenizer()
    tok.add_tokens([f"<|extra{i}|>" for i in range(extra_tokens)])
    tok.save_pretrained(tmp / name)
    return tmp / name


def _wide_model(world: Path, tmp: Path) -> Path:
    """A model of 4096 embeddings without tokenizer files: the byte tokenizer (259 tokens) is not its own."""
    model, _ = tiny_model("llama", vocab_size=4096)
    model.save_pretrained(tmp / "wide")
    return tmp / "wide"


def _smaller(w: Path, t: Path) -> list[str]:
    return ["--model", str(_wide_model(w, t)), "--tokenizer", "tiny-llama"]


def _larger(w: Path, t: Path) -> list[str]:
    return ["--model", str(w / "model"), "--tokenizer", str(_tokenizer_dir(t, "big-tok", 100))]


TOKENIZER_CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("smaller-vocabulary", _smaller, "a vocabulary of 259 tokens for the 4096 embeddings"),
    ("smaller-vocabulary-stream", lambda w, t: [*_smaller(w, t), "--stream"],
     "a vocabulary of 259 tokens for the 4096 embeddings"),
    ("larger-vocabulary", _larger, "a vocabulary of 359 tokens for the 320 embeddings"),
    ("larger-vocabulary-stream", lambda w, t: [*_larger(w, t), "--stream"],
     "a vocabulary of 359 tokens for the 320 embeddings"),
    ("larger-vocabulary-for-tiny", lambda w, t: ["--model", "tiny-llama", "--tokenizer",
                                                 str(_tokenizer_dir(t, "big-tok", 100))],
     "a vocabulary of 359 tokens for the 320 embeddings of tiny-llama"),
]


@pytest.mark.parametrize("name,model_args,expect", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_a_tokenizer_of_another_model_is_refused(world, tmp_path, capsys, name, model_args, expect):  # noqa: F811
    argv = ["drop", *model_args(world, tmp_path), "--calibration", str(world / "c4.jsonl"), *COMMON,
            "--output", str(tmp_path / "o")]
    _fails_in_one_line(world, tmp_path, capsys, argv, expect)


def test_tokenizer_option_is_honoured_for_tiny_models(world, tmp_path):  # noqa: F811
    tok_dir = _tokenizer_dir(tmp_path, "own-tok", 1)
    out = tmp_path / "out"
    assert main(["drop", "--model", "tiny-llama", "--tokenizer", str(tok_dir), "--calibration",
                 str(world / "c4.jsonl"), *COMMON, "--output", str(out)]) == 0
    assert "<|extra0|>" in (out / "tokenizer.json").read_text()


# ---------------------------------------------------------------------------------------------------- GGUF
def _exported_gguf(world: Path, tmp: Path) -> Path:
    from lightning_drop.export import export_gguf

    return Path(export_gguf(world / "model", tmp / "exported.gguf", dtype="f32"))


def _truncated_gguf(world: Path, tmp: Path) -> Path:
    path = _exported_gguf(world, tmp)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _random_gguf(world: Path, tmp: Path) -> Path:
    path = tmp / "random.gguf"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    return path


def _unsupported_gguf(world: Path, tmp: Path) -> Path:
    """A well-formed GGUF file of an architecture transformers does not convert."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp / "rwkv.gguf"), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp / "rwkv.gguf"


GGUF_CASES: list[tuple[str, Callable[[Path, Path], Path], str]] = [
    ("exported-deci", _exported_gguf, "GGUF architecture 'deci'"),
    ("truncated", _truncated_gguf, "not a readable GGUF file"),
    ("random-bytes", _random_gguf, "not a readable GGUF file"),
    ("unsupported-architecture", _unsupported_gguf, "cannot be read back (GGUF model with architecture rwkv6"),
]


@pytest.mark.parametrize("name,make,expect", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_unreadable_gguf_is_one_line_naming_the_file(world, tmp_path, tmp_path_factory, capsys, monkeypatch,  # noqa: F811
                                                     name, make, expect):
    pytest.importorskip("gguf")
    monkeypatch.setenv("LIGHTNING_DROP_CACHE", str(tmp_path_factory.mktemp("cache")))  # the tool's, not the user's
    path = make(world, tmp_path)
    argv = ["perplexity", "--model", str(path), "--data", str(world / "c4.jsonl"), "--num-windows", "2"]
    _fails_in_one_line(world, tmp_path, capsys, argv, f"{path}: {expect}")


# ------------------------------------------------------------------------- options that would do nothing
OPTION_CASES: list[tuple[str, list[str], str]] = [
    ("offload-dir-without-stream", ["--offload-dir", "OFFLOAD"], "--offload-dir"),
    ("cuda-without-cuda", ["--device", "cuda"], "--device cuda"),
    ("cuda-without-cuda-stream", ["--device", "cuda", "--stream"], "--device cuda"),
]


@pytest.mark.parametrize("name,extra,expect", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_options_that_would_do_nothing_are_refused(world, tmp_path, capsys, name, extra, expect):  # noqa: F811
    if "cuda" in name and torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is honoured")
    extra = [str(tmp_path / "offload") if x == "OFFLOAD" else x for x in extra]
    argv = ["drop", "--model", str(world / "model"), "--calibration", str(world / "c4.jsonl"), *COMMON, *extra,
            "--output", str(tmp_path / "o")]
    _fails_in_one_line(world, tmp_path, capsys, argv, expect)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_is_honoured_in_memory(world, tmp_path, monkeypatch):  # noqa: F811
    """Scoring runs on the GPU (the model's forward sees CUDA tensors) and the checkpoint equals the CPU one's."""
    import lightning_drop.scoring.importance as importance

    seen = []
    real = importance.model_inputs
    monkeypatch.setattr(importance, "model_inputs", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        assert main(["drop", "--model", str(world / "model"), "--calibration", str(world / "c4.jsonl"), *COMMON,
                     "--device", device, "--output", str(outs[device])]) == 0
    assert any(torch.device(d).type == "cuda" for d in seen)
    report = {d: json.loads((o / "importance.json").read_text()) for d, o in outs.items()}
    assert report["cpu"]["drop_attn_list"] == report["cuda"]["drop_attn_list"]
    cpu, gpu = _tensors(outs["cpu"]), _tensors(outs["cuda"])
    assert cpu.keys() == gpu.keys() and all(_same_bits(cpu[k], gpu[k]) for k in cpu)
