"""Tiny random-init models of every supported family (and of any causal-LM model type), with an offline
byte-level tokenizer: what the tests, the examples and `tiny-<family>` catalogue names run on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.architectures import SPECS
from ..core.decoder_families import LLAMA_LIKE_FAMILIES
from .tiny_configs import causal_lm_class, shrunk_config

# families with a hand-sized tiny config (Baichuan ships no transformers class); the Llama-like families are
# their config classes' defaults, shrunk (`tiny_config` reaches them by model type)
TINY_FAMILIES = {spec.family: spec for spec in SPECS if spec.family != "baichuan" and spec.family not in LLAMA_LIKE_FAMILIES}
_TINY_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)


def byte_tokenizer() -> Any:
    """An offline byte-level tokenizer (256 bytes + specials): every text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|bos|>"]
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {ch: i for i, ch in enumerate(sorted(vocab))}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|bos|>", model_max_length=_TINY_BASE["max_position_embeddings"])


def tiny_config(family: str, num_layers: int = 4, **overrides: Any) -> Any:
    """A small random-init config of a family or any causal-LM model type; token ids as `byte_tokenizer()`'s."""
    import transformers

    ids = {k: getattr(tok, k) for tok in [byte_tokenizer()] for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    spec = TINY_FAMILIES.get(family)
    if spec is None or spec.tiny_overrides is None:  # shrunk from its config class's defaults (any causal-LM type)
        model_type = spec.model_types[0] if spec else family
        return shrunk_config(model_type, ids, **({"num_hidden_layers": num_layers} if num_layers != 4 else {}), **overrides)
    kwargs = {**_TINY_BASE, **spec.tiny_overrides, "num_hidden_layers": num_layers, **ids, **overrides}
    return getattr(transformers, spec.config_class)(**kwargs)


def tiny_model(family: str, num_layers: int = 4, seed: int = 0, **overrides: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a random-init tiny `family` model, deterministic for a seed."""
    import transformers

    config = tiny_config(family, num_layers, **overrides)
    spec = TINY_FAMILIES.get(family)
    cls = getattr(transformers, spec.causal_lm_class) if spec else causal_lm_class(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval(), byte_tokenizer()
