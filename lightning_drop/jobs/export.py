"""`lightning-drop export`: a (dropped) checkpoint for inference engines, as Nemotron-NAS or GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ..io.output_targets import check_output
from ..errors import UserError

ExportFormat = Literal["nemotron-nas", "gguf"]
ExportDtype = Literal["f32", "f16", "bf16", "q8_0"]


def export_main(model: str, format: ExportFormat, output: str, dtype: ExportDtype | None = None,
                tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Export for inference engines: Nemotron-NAS (vLLM, TensorRT-LLM) or GGUF.

    Args:
        model: checkpoint dir, hub id or catalogue name
        format: nemotron-nas (a directory vLLM and TensorRT-LLM load) or gguf (one file for llama.cpp)
        output: directory (nemotron-nas) or .gguf file
        dtype: tensor type (default: bf16 for nemotron-nas, f16 for gguf)
        tokenizer: tokenizer (directory, hub id or catalogue name) to write with the model, instead of the
            model's own (needed when the model has none)
        overwrite: replace an existing --output

    Returns the path written.
    """
    if format != "gguf" and dtype == "q8_0":
        raise UserError("q8_0 is a GGUF type; nemotron-nas takes f32, f16 or bf16")
    src: Any = model
    tok = None
    if tokenizer:
        # the writers load a model reference with its own tokenizer: given another, the job loads both here,
        # after the target is checked against every input
        from ..io.model_loading import load_model

        check_output(output, kind="file" if format == "gguf" else "dir", overwrite=overwrite,
                     sources=[model, tokenizer])
        src, tok = load_model(model, dtype="float32", tokenizer=tokenizer)
    if format == "gguf":
        from ..export.gguf_deci import export_gguf

        path = export_gguf(src, output, dtype=dtype or "f16", tokenizer=tok, overwrite=overwrite)
    else:
        from ..export.nemotron import export_nemotron_nas

        path = export_nemotron_nas(src, output, dtype=dtype or "bf16", tokenizer=tok, overwrite=overwrite)
    print(f"wrote {path}")
    return Path(path)
