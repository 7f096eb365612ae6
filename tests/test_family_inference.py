"""A model type the family table does not know: inferred from its module names and proven on the model itself,
or refused in one line naming what did not match, before its weights load and with nothing written."""

from __future__ import annotations


import pytest

from lightning_drop import apply_drop, get_spec
from lightning_drop.cli import main
from lightning_drop.core import architectures
from lightning_drop.errors import UserError
from lightning_drop.io.family_inference import infer_spec, prove_spec, spec_or_inferred
from lightning_drop.io.model_loading import load_model, tiny_model
from test_bad_inputs import _fingerprint



@pytest.fixture
def granite_unknown(monkeypatch, tmp_path):
    """A saved tiny Granite model while the table has no Granite family (a type it does not know)."""
    model, tok = tiny_model("granite")
    model.save_pretrained(tmp_path / "granite")
    tok.save_pretrained(tmp_path / "granite")
    spec = get_spec("granite")
    monkeypatch.delitem(architectures._BY_MODEL_TYPE, "granite")
    yield tmp_path / "granite", spec
    architectures._BY_MODEL_TYPE["granite"] = spec  # whatever the test registered, the shipped family again


def test_unknown_llama_like_type_is_inferred_proven_and_used(granite_unknown, capsys):
    path, shipped = granite_unknown
    with pytest.raises(UserError, match="unsupported architecture 'granite'"):
        get_spec("granite")
    model, _ = load_model(str(path))
    assert "family inferred: 'granite'" in capsys.readouterr().err
    spec = get_spec(model)  # registered once proven
    assert (spec.attn, spec.mlp, spec.attn_norms, spec.mlp_norms) == \
        (shipped.attn, shipped.mlp, shipped.attn_norms, shipped.mlp_norms)
    apply_drop(model, attn=[1], mlp=[2])  # the inferred family drops like a shipped one


def test_a_layout_the_names_do_not_describe_fails_the_proof():
    """Minimax has Llama's module names, but its lightning-attention layers do not compute x + attn(norm(x))
    exactly as a drop does: the proof on the model catches it and says what differed."""
    model, _ = tiny_model("minimax")
    spec = infer_spec(model)
    problem = prove_spec(model, spec)
    assert problem is not None and problem.startswith("dropped != zeroed")
    with pytest.raises(UserError, match=r"^cannot infer a family for 'minimax': dropped != zeroed"):
        spec_or_inferred(model)
    with pytest.raises(UserError, match="unsupported architecture 'minimax'"):
        get_spec("minimax")  # a failed proof registers nothing


@pytest.mark.parametrize("model_type, reason", [
    ("bert", "no layer list at model.layers"),
    ("zaya", "modules outside the Llama-like layout: post_attention_residual_scale, post_mlp_residual_scale"),
])
def test_uninferable_type_is_one_line_before_loading_weights(tmp_path, capsys, model_type, reason):
    """Through the command line: the checkpoint has a config and no weights, so only a refusal made from the
    module names (built on the meta device) can give this message; nothing is written."""
    from lightning_drop.io.tiny_configs import shrunk_config

    shrunk_config(model_type, {"eos_token_id": 0, "pad_token_id": 1, "bos_token_id": 2}).save_pretrained(tmp_path / "m")
    before = _fingerprint(tmp_path)
    capsys.readouterr()
    code = main(["drop", "--model", str(tmp_path / "m"), "--num", "1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert f"error: unsupported architecture '{model_type}': cannot infer a family" in lines[0] and reason in lines[0]
    assert _fingerprint(tmp_path) == before


def test_a_known_vision_family_is_pointed_to_the_vision_tools_not_inferred(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(UserError, match="'vit' is a vision transformer: use lightning_drop.vision"):
        load_model(str(tmp_path))
