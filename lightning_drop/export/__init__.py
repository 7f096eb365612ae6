"""Exports of dropped models for inference engines.

- `export_nemotron_nas` / `load_nemotron_nas`: NVIDIA's Nemotron-NAS (`DeciLMForCausalLM`) layout,
  where a dropped attention or MLP is a `no_op` block (vLLM, TensorRT-LLM, llama.cpp's converter).
- `export_gguf`: a GGUF file for llama.cpp's `deci` architecture.
"""

from .gguf_deci import export_gguf
from ..io.nemotron_nas import load_nemotron_nas
from .nemotron import export_nemotron_nas

__all__ = ["export_gguf", "export_nemotron_nas", "load_nemotron_nas"]
