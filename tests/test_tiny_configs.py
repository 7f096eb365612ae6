"""Every causal-LM model type of the installed transformers either becomes a tiny model that runs, through the
catalogue name `tiny-<model_type>`, or is refused with its reason: none is skipped silently."""

from __future__ import annotations


import pytest
import torch

from lightning_drop.errors import UserError
from lightning_drop.io.model_loading import load_model
from lightning_drop.io.tiny_models import TINY_FAMILIES, tiny_config
from lightning_drop.io.tiny_configs import REFUSED, VOCAB_SIZE, causal_lm_types

TYPES = causal_lm_types()
BUILT = [t for t in TYPES if t not in REFUSED]
# the few whose CPU reference kernels (linear attention, vision towers) take seconds even when tiny
HEAVY = {"bailing_hybrid", "gemma3", "got_ocr2", "inkling2_loop_text", "inkling2_text", "kimi_linear"}


def test_most_types_build_and_every_refusal_names_a_known_type():
    assert set(REFUSED) <= set(TYPES), sorted(set(REFUSED) - set(TYPES))
    assert len(BUILT) >= 0.8 * len(TYPES), (len(BUILT), len(TYPES))
    for model_type, reason in REFUSED.items():
        with pytest.raises(UserError, match=f"no tiny '{model_type}' model: .+"):
            tiny_config(model_type)
        assert len(reason) > 10


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=pytest.mark.slow) if t in HEAVY else t
                                        for t in BUILT])
def test_tiny_model_of_every_type_runs(model_type):
    model, tok = load_model(f"tiny-{model_type}")
    config = model.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            assert value <= {"vocab_size": VOCAB_SIZE, "hidden_size": 64, "num_hidden_layers": 8}[key], (key, value)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and isinstance(getattr(config, "vocab_size", None), int):
            assert 0 <= value < config.vocab_size, (key, value)
    ids = tok("tiny models", return_tensors="pt")["input_ids"][:, :10]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape
    assert torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) < 20_000_000


def test_family_tiny_configs_are_unchanged():
    """`tiny-<family>` of a family with an ArchSpec keeps its own hand-made config."""
    config = tiny_config("qwen2")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.sliding_window) == (64, 4, 320, 8)
    assert tiny_config("deepseek_v3").kv_lora_rank == 16 and "llama" in TINY_FAMILIES


@pytest.mark.parametrize("model_type, kinds", [("qwen3_next", {"linear_attention", "full_attention"}),
                                               ("lfm2", {"conv", "full_attention"}),
                                               ("gemma3_text", {"sliding_attention", "full_attention"})])
def test_hybrid_layer_lists_keep_every_kind(model_type, kinds):
    config = tiny_config(model_type)
    assert len(config.layer_types) == config.num_hidden_layers
    assert set(config.layer_types) == kinds


def test_unknown_type_is_one_line_error():
    with pytest.raises(UserError, match="not a causal-LM model type"):
        tiny_config("no_such_model")
