"""Config class for checkpoints written by `lightning_drop.export.nemotron` (model_type "nemotron-nas").

Copied next to every export and named in its `auto_map`, so that `AutoConfig.from_pretrained(dir,
trust_remote_code=True)` (what vLLM does) returns a config whose `block_configs[i].attention.no_op`,
`.n_heads_in_group`, `block_configs[i].ffn.no_op`, `.ffn_mult` are readable as attributes, as vLLM's
`DeciLMForCausalLM` reads them. Self-contained: depends only on transformers. Written for this project;
it does not contain NVIDIA's remote code.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import LlamaConfig


class BlockPart(dict):
    """A JSON object whose keys also read as attributes (it serializes as a plain dict)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


def _wrap_blocks(blocks: Any) -> list:
    out = []
    for block in blocks or []:
        block = dict(block)
        out.append(BlockPart({k: BlockPart(v) if isinstance(v, dict) else v for k, v in block.items()}))
    return out


if int(transformers.__version__.split(".")[0]) >= 5:

    class DeciLMConfig(LlamaConfig):
        model_type = "nemotron-nas"

        def __post_init__(self, **kwargs: Any) -> None:
            blocks = kwargs.pop("block_configs", None)
            super().__post_init__(**kwargs)
            self.block_configs = _wrap_blocks(blocks)

else:  # transformers 4.x: plain __init__ configs

    class DeciLMConfig(LlamaConfig):  # type: ignore[no-redef]
        model_type = "nemotron-nas"

        def __init__(self, block_configs: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.block_configs = _wrap_blocks(block_configs)
