"""Shared fixtures. Tests run offline: no hub access, data from the shared folder next to the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_DROP_SHARED") or REPO_ROOT.parent / "shared")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`$LIGHTNING_DROP_SHARED` or `../shared` next to the repo (test data lives in its `data/`)."""
    path = _shared_dir()
    if not (path / "data").is_dir():
        pytest.skip(f"shared data folder not found at {path} (set LIGHTNING_DROP_SHARED)")
    return path


@pytest.fixture(scope="session")
def c4_path(shared_dir: Path) -> Path:
    """300 real C4 documents, one `{"text": ...}` per line."""
    path = shared_dir / "data" / "c4_demo.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def byte_tokenizer():
    """Offline byte-level tokenizer (256 bytes + `<|endoftext|>` EOS) from the model catalogue."""
    from lightning_drop.io.model_loading import load_tokenizer

    return load_tokenizer("tiny-llama")


@pytest.fixture
def scoring_passes():
    """A callable returning the calibration forward passes (batches) run so far in the test.

    Importance scoring runs a model's decoder stack (`model.model`, GPT-2's `transformer`, ...) on its own,
    while training, validation and generation reach it through the causal LM (a model with an output head):
    a decoder call outside any causal-LM call is one scoring batch. Counting passes proves "not scored again"
    without depending on how scoring is imported.
    """
    from torch import nn
    from torch.nn.modules import module as torch_module
    from transformers import PreTrainedModel

    from lightning_drop.core.architectures import get_spec
    from lightning_drop.errors import UserError

    state = {"lm": 0, "passes": 0}

    def is_lm(mod: nn.Module) -> bool:
        return isinstance(mod, PreTrainedModel) and mod.get_output_embeddings() is not None

    def is_decoder(mod: nn.Module) -> bool:
        """A text family's base model: the module that holds the family's layer list itself."""
        if not isinstance(mod, PreTrainedModel):
            return False
        try:
            spec = get_spec(mod)
        except UserError:
            return False
        return spec.inputs == "text" and isinstance(getattr(mod, spec.layers.rsplit(".", 1)[-1], None), nn.ModuleList)

    def pre(mod: nn.Module, args: tuple) -> None:
        if is_lm(mod):
            state["lm"] += 1
        elif state["lm"] == 0 and is_decoder(mod):
            state["passes"] += 1

    def post(mod: nn.Module, args: tuple, output: object) -> None:
        if is_lm(mod):
            state["lm"] -= 1

    handles = [torch_module.register_module_forward_pre_hook(pre), torch_module.register_module_forward_hook(post)]
    yield lambda: state["passes"]
    for h in handles:
        h.remove()


@pytest.fixture(scope="session")
def layer_drops():
    """`fit(model, attn, mlp) -> (attn, mlp, gone)`: a test's drop as the model's layers hold it, and what
    `dropped_layers` reports after it. In a family whose layers hold one sublayer each (Nemotron-H) an index in
    either list names its layer's one sublayer, and the sublayer a layer never had counts as gone; in every
    other family the lists are the drop and `gone` equals them."""
    from lightning_drop import get_spec

    def fit(model, attn, mlp):
        spec = get_spec(model)
        layers = spec.get_layers(model)
        both = sorted(set(attn) | set(mlp)) if spec.layer_roles else None
        lists = [sorted(wanted) if both is None else [i for i in both if spec.holds(layers[i], kind)]
                 for kind, wanted in (("attn", attn), ("mlp", mlp))]
        gone = tuple(sorted(set(drop) | {i for i, layer in enumerate(layers) if not spec.holds(layer, kind)})
                     for kind, drop in zip(("attn", "mlp"), lists))
        return lists[0], lists[1], gone

    return fit


@pytest.fixture(scope="session")
def world(tmp_path_factory, c4_path: Path) -> Path:
    """Inputs every case can point at: a saved tiny model, data files, a user's folder with a file in it."""
    import json

    import torch

    import lightning_drop as ld
    from lightning_drop.io.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("world")
    model, tok = tiny_model("llama")
    ld.save_dropped(model, root / "model", tok)
    nan_model, _ = tiny_model("llama")
    with torch.no_grad():
        for p in nan_model.parameters():
            p.fill_(float("nan"))
    ld.save_dropped(nan_model, root / "nan-model", tok)
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("mine")
    (root / "results.json").write_text('{"mine": true}\n')
    lines = c4_path.read_text().splitlines()[:40]
    (root / "c4.jsonl").write_text("\n".join(lines) + "\n")
    (root / "notext.jsonl").write_text("\n".join(json.dumps({"body": json.loads(x)["text"]}) for x in lines) + "\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 200)
    (root / "empty.jsonl").write_text("\n")
    hs = [{"ctx": "a b", "endings": ["c", "d", "e", "f"]}] * 3  # no "label"
    (root / "hs_nolabel.jsonl").write_text("\n".join(json.dumps(r) for r in hs) + "\n")
    (root / "hs.jsonl").write_text("\n".join(json.dumps({**r, "label": 1}) for r in hs) + "\n")
    return root
