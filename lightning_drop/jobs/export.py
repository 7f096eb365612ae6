"""`lightning-drop export`: a (dropped) checkpoint for inference engines, as Nemotron-NAS or GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..errors import UserError

ExportFormat = Literal["nemotron-nas", "gguf"]
ExportDtype = Literal["f32", "f16", "bf16", "q8_0"]


def export_main(model: str, format: ExportFormat, output: str, dtype: ExportDtype | None = None,
                overwrite: bool = False) -> Path:
    """Export for inference engines: Nemotron-NAS (vLLM, TensorRT-LLM) or GGUF.

    Args:
        model: checkpoint dir, hub id or catalogue name
        format: nemotron-nas (a directory vLLM and TensorRT-LLM load) or gguf (one file for llama.cpp)
        output: directory (nemotron-nas) or .gguf file
        dtype: tensor type (default: bf16 for nemotron-nas, f16 for gguf)
        overwrite: replace an existing --output

    Returns the path written.
    """
    if format == "gguf":
        from ..export.gguf_deci import export_gguf

        path = export_gguf(model, output, dtype=dtype or "f16", overwrite=overwrite)
    else:
        if dtype == "q8_0":
            raise UserError("q8_0 is a GGUF type; nemotron-nas takes f32, f16 or bf16")
        from ..export.nemotron import export_nemotron_nas

        path = export_nemotron_nas(model, output, dtype=dtype or "bf16", overwrite=overwrite)
    print(f"wrote {path}")
    return Path(path)
