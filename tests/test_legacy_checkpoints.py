"""Checkpoints written by earlier versions still load, through every documented path, with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
TEXT = {"llama-attn-mlp": ([1, 2], [3]), "llama-blocks": ([], []), "qwen3-attn": ([0], [])}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "expected.safetensors"))


@pytest.mark.parametrize("name", sorted(TEXT))
def test_text_checkpoint_loads_with_the_same_logits(name, expected):
    import lightning_drop as ld
    from transformers import AutoModelForCausalLM

    ids = expected["input_ids"]
    for model in (ld.load_model(str(FIXTURES / name))[0], ld.load_dropped(FIXTURES / name),
                  AutoModelForCausalLM.from_pretrained(FIXTURES / name)):
        assert ld.dropped_layers(model) == TEXT[name]
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected[f"{name}.logits"], atol=1e-5, rtol=0)


def test_vision_checkpoint_loads_with_the_same_logits(expected):
    import lightning_drop as ld

    model = ld.load_dropped(FIXTURES / "vit-attn-mlp")
    assert ld.dropped_layers(model) == ([1], [0])
    with torch.no_grad():
        logits = model(pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["vit-attn-mlp.logits"], atol=1e-5, rtol=0)
