"""`lightning-drop families`: the support table, generated from the code, and docs/families.md kept current."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_drop.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def _run(capsys, fmt: str) -> str:
    capsys.readouterr()
    assert main(["families", "--format", fmt]) == 0
    return capsys.readouterr().out


def test_table_statuses_and_layouts_come_from_the_code(capsys):
    rows = {r["model_type"]: r for r in json.loads(_run(capsys, "json"))}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(rows) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert rows["llama"]["status"] == "supported" and "GGUF" in rows["llama"]["engines"]
    assert rows["qwen2"]["status"] == "supported" and rows["qwen2"]["engines"] == ["transformers"]
    assert rows["bart"] == dict(model_type="bart", status="refused", sublayers="", engines=[], layout="encoder-decoder")
    assert rows["gpt2"]["status"] == "supported" and rows["gpt2"]["layout"] == "transformer.h[i]"
    assert rows["gpt2"]["sublayers"] == "attn `attn`, mlp `mlp`"
    assert "parallel residual" in rows["gpt_neox"]["layout"]
    assert "hybrid" in rows["qwen3_next"]["layout"] and "linear_attn" in rows["qwen3_next"]["layout"]
    assert rows["granitemoe"]["status"] == "supported" and "mlp `block_sparse_moe`" in rows["granitemoe"]["sublayers"]
    assert rows["gpt_oss"]["status"] == "supported" and rows["llama4_text"]["status"] == "supported"  # MoE pairs
    assert "post-norm" in rows["openai-gpt"]["layout"] and rows["exaone"]["status"] == "supported"
    assert rows["jetmoe"]["status"] == rows["youtu"]["status"] == rows["bloom"]["status"] == "supported"
    assert "mlp (MoE)" in rows["bailing_hybrid"]["layout"]
    assert "hybrid" in rows["lfm2"]["layout"] and "conv" in rows["lfm2"]["layout"]
    assert "hybrid" not in rows["llama4_text"]["layout"]  # chunked + full attention: one mixer kind, two masks
    assert "encoder layer" in rows["bert"]["layout"] and rows["bert"]["status"] == "refused"
    assert all(r["status"] in ("supported", "not yet", "refused") for r in rows.values())
    assert all(r["layout"] for r in rows.values() if r["status"] != "supported")


def test_docs_families_page_is_current(capsys):
    assert DOC.read_text() == _run(capsys, "markdown"), \
        "regenerate: lightning-drop families --format markdown > docs/families.md"
