"""`lightning-drop drop`: checkpoint + report from one command; clear errors; nothing damaged."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from lightning_drop.cli import main
from lightning_drop.core.modeling_dropped import dropped_layers


def _args(c4_path, out, *extra):
    return ["drop", "--model", "tiny-llama", "--calibration", str(c4_path), "--num-samples", "4",
            "--seq-len", "64", "--output", str(out), *extra]


def test_drop_report_records_the_batch_size_it_scored_with(tmp_path, c4_path):
    """The calibration settings type carries the study's batch size; the drop job's own --batch-size is what
    its report must record."""
    out = tmp_path / "out"
    assert main(_args(c4_path, out, "--target", "attn", "--num", "1", "--batch-size", "3")) == 0
    assert json.loads((out / "importance.json").read_text())["calibration"]["batch_size"] == 3


@pytest.mark.parametrize("target,num,expect_attn,expect_mlp", [("attn", 2, 2, 0), ("mlp", 1, 0, 1),
                                                                ("block", 1, 1, 1), ("joint", 3, None, None)])
def test_drop_writes_checkpoint_and_report(tmp_path, c4_path, target, num, expect_attn, expect_mlp):
    out = tmp_path / "out"
    assert main(_args(c4_path, out, "--target", target, "--num", str(num))) == 0
    report = json.loads((out / "importance.json").read_text())
    assert report["metric"] == "cosine" and report["target"] == target
    assert len(report["attn"]) == len(report["mlp"]) == len(report["block"]) == 4
    assert report["calibration"]["num_samples"] == 4 and report["calibration"]["seq_len"] == 64
    attn, mlp = report["drop_attn_list"], report["drop_mlp_list"]
    if expect_attn is not None:
        assert (len(attn), len(mlp)) == (expect_attn, expect_mlp)
    else:
        assert len(attn) + len(mlp) == num
    # the selection is the lowest scores of the target's row(s)
    if target == "attn":
        assert attn == sorted(sorted(range(4), key=lambda i: (report["attn"][i], i))[:2])
    assert (out / "importance.png").stat().st_size > 5000
    model = AutoModelForCausalLM.from_pretrained(out)
    if target == "block":
        assert model.config.num_hidden_layers == 3  # plain checkpoint with the block removed
    else:
        assert dropped_layers(model) == (attn, mlp)


def test_iterative_report_has_every_round(tmp_path, c4_path):
    out = tmp_path / "it"
    assert main(_args(c4_path, out, "--target", "attn", "--num", "3", "--schedule", "iterative")) == 0
    report = json.loads((out / "importance.json").read_text())
    assert len(report["rounds"]) == 3
    assert sum(len(r["drop_attn"]) for r in report["rounds"]) == 3
    assert report["rounds"][1]["scores"]["attn"].count(None) == 1


def test_errors_are_one_line_and_leave_output_intact(tmp_path, c4_path, capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch")
    assert main(_args(c4_path, out, "--num", "1")) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "do not touch"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(_args(empty, tmp_path / "o1", "--num", "1")) == 2
    assert not (tmp_path / "o1").exists()
    assert main(_args(tmp_path / "missing.jsonl", tmp_path / "o2", "--num", "1")) == 2
    assert main(_args(c4_path, tmp_path / "o3", "--num", "5")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 3 and all(line.startswith("lightning-drop drop: error:") for line in err)
    assert "at most 4 can go" in err[-1]
    assert not (tmp_path / "o3").exists()
    assert main(_args(c4_path, tmp_path / "o5", "--num", "4", "--target", "block")) == 2  # every block
    assert "at most 3 can go without removing every sublayer" in capsys.readouterr().err
    assert not (tmp_path / "o5").exists()
    assert main(_args(c4_path, tmp_path / "o4", "--num", "1", "--keep", "7")) == 2
    assert "out of range" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["drop", "--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--target", "--num", "--ratio", "--calibration", "--num-samples", "--seq-len",
                "--metric", "--schedule", "--step", "--keep", "--output", "--text-field", "--shuffle", "--seed",
                "--batch-size", "--dtype", "--stream", "--tokenizer", "--overwrite", "--device", "--offload-dir",
                "--max-shard-size"):
        assert opt in text


@pytest.mark.parametrize("stream", [False, True])
def test_checkpoint_keeps_the_source_dtype_unless_told(tmp_path, c4_path, stream):
    """Scoring runs in float32; a bf16 source must not come back as a float32 checkpoint twice its size."""
    import json

    import torch
    from safetensors import safe_open

    from lightning_drop.io.tiny_models import tiny_model

    model, tok = tiny_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    assert json.loads((tmp_path / "src" / "config.json").read_text())["dtype"] == "bfloat16"
    extra = ("--stream",) if stream else ()

    def dtypes(out):
        found = set()
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                found |= {fh.get_slice(k).get_dtype() for k in fh.keys()}
        return found

    args = ["drop", "--model", str(tmp_path / "src"), "--calibration", str(c4_path), "--num-samples", "4",
            "--seq-len", "64", "--num", "1", *extra]
    assert main([*args, "--output", str(tmp_path / "auto")]) == 0
    assert dtypes(tmp_path / "auto") == {"BF16"}
    assert main([*args, "--output", str(tmp_path / "f32"), "--save-dtype", "float32"]) == 0
    assert dtypes(tmp_path / "f32") == {"F32"}
