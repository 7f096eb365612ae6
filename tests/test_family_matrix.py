"""The proof matrix: every supported text family, each on its tiny model, through the same checks.

Dropped == zeroed (attention, MLP and a whole block), cached == uncached greedy generation on a left-padded
batch, a dropped checkpoint that reloads with the same logits (in process, and with `trust_remote_code=True`
where lightning_drop is not importable), a block-only drop written as a plain checkpoint of the original
architecture (or, where renumbered layers would not rebuild the same modules, the dropped format), importance
of every sublayer kind in one pass, and LoRA adapters on the family's linear layers. A family added to
`decoder_families.py` joins the matrix by being there. In a family whose layers hold one sublayer each
(Nemotron-H) a drop index names its layer's one sublayer (`layer_drops`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from lightning_drop import apply_drop, dropped_layers, get_spec, load_dropped, save_dropped
from lightning_drop.core.architectures import SPECS
from lightning_drop.io.dropped_checkpoint import checkpoint_kind
from lightning_drop.io.family_inference import proof_drops, zeroed_outputs
from lightning_drop.io.model_loading import TINY_FAMILIES, tiny_model
from lightning_drop.scoring.importance import compute_importance

TEXT_SPECS = {s.family: s for s in SPECS if s.inputs == "text" and s.family != "baichuan"}  # baichuan: remote code
FAMILIES = list(TEXT_SPECS)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
_BUILT: dict[str, tuple[torch.nn.Module, object]] = {}


def built(family: str) -> tuple[torch.nn.Module, object]:
    """A fresh copy of the family's tiny model (built once per run) and its tokenizer."""
    if family not in _BUILT:
        _BUILT[family] = tiny_model(family if family in TINY_FAMILIES else TEXT_SPECS[family].model_types[0])
    model, tok = _BUILT[family]
    return copy.deepcopy(model), tok


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_the_matrix_covers_dense_and_moe_families():
    assert len(FAMILIES) >= 60
    moe = [f for f in FAMILIES if any("expert" in n for n, _ in built(f)[0].named_modules())]
    assert len(moe) >= 6, moe


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_equals_zeroed(family, layer_drops):
    model, _ = built(family)
    spec = get_spec(model)
    attn, mlp, gone = layer_drops(model, *proof_drops(len(spec.get_layers(model))))  # first attention, a middle block, last MLP
    full = logits(model)
    with zeroed_outputs(model, spec, attn, mlp):
        ref = logits(model)
    assert not torch.allclose(ref, full)  # the zeroed sublayers really matter
    n_params = sum(p.numel() for p in model.parameters())
    apply_drop(model, attn=attn, mlp=mlp)
    torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < n_params
    assert dropped_layers(model) == gone


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached_left_padded(family, layer_drops):
    model, tok = built(family)
    attn, mlp, _ = layer_drops(model, [0, 2], [3])
    apply_drop(model, attn=attn, mlp=mlp)
    tok.padding_side = "left"
    batch = tok(["The quick brown fox jumps over the lazy dog", "Hi"], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()

    def greedy(use_cache: bool) -> torch.Tensor:
        return model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=use_cache,
                              pad_token_id=tok.pad_token_id)

    with torch.no_grad():
        assert torch.equal(greedy(True), greedy(False))


SAVED_DROP = ([1, 3], [0])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, layer_drops):
    """Every family dropped (attention 1, 3; MLP 0) and saved: {family: (directory, expected logits)}."""
    root = tmp_path_factory.mktemp("matrix")
    out = {}
    for family in FAMILIES:
        model, tok = built(family)
        attn, mlp, _ = layer_drops(model, *SAVED_DROP)
        apply_drop(model, attn=attn, mlp=mlp)
        out[family] = (save_dropped(model, root / family, tok), logits(model))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_checkpoint_reloads_in_process(saved, family, layer_drops):
    directory, expected = saved[family]
    config = json.loads((directory / "config.json").read_text())
    # Nemotron-H: every drop is a whole layer, but this cut would start with an MLP layer (no cache slot for the
    # length), so it keeps the dropped format too
    attn, mlp, gone = layer_drops(built(family)[0], *SAVED_DROP)
    assert config["model_type"] == f"dropped_{TEXT_SPECS[family].model_types[0]}"
    assert (config["drop_attn_list"], config["drop_mlp_list"]) == (attn, mlp)  # the drops, not what never was
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(directory), load_dropped(directory)):
        assert dropped_layers(loaded) == gone
        torch.testing.assert_close(logits(loaded.eval()), expected, atol=1e-5, rtol=1e-5)


CLEAN_ENV = """
import sys
class _Hide:  # an environment without lightning_drop: only torch and transformers
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'lightning_drop':
            raise ImportError('hidden')
sys.meta_path.insert(0, _Hide())
import json, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[2])
out = {}
for directory in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        out[directory] = model(input_ids=ids, use_cache=False).logits
torch.save(out, sys.argv[3])
"""


def test_every_dropped_checkpoint_loads_with_remote_code_alone(saved, tmp_path):
    """One child process without lightning_drop loads every family's checkpoint through its remote code."""
    script, ids_file, result = tmp_path / "clean.py", tmp_path / "ids.pt", tmp_path / "logits.pt"
    script.write_text(CLEAN_ENV)
    torch.save(IDS, ids_file)
    dirs = [str(d) for d, _ in saved.values()]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, str(script), json.dumps(dirs), str(ids_file), str(result)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(result)
    for family, (directory, expected) in saved.items():
        torch.testing.assert_close(got[str(directory)], expected, atol=1e-5, rtol=1e-5, msg=family)


# MoE families whose first layers are dense by index (or whose layer kinds follow the index): renumbered
# layers would change kind, so a block drop keeps the dropped format. Jamba's config gives attention and
# expert layers by period and offset only (no per-layer list it accepts), which a cut does not keep. A post-norm
# family's dropped block keeps its norms (`ArchSpec.residual_norms`), so there is no layer to cut. MiniCPM3 scales
# each residual branch by 1 / sqrt(number of layers), which a cut would change.
NOT_PLAIN = {"flint", "jamba", "minicpm3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_block_only_drop_writes_the_original_architecture(tmp_path, family):
    model, _ = built(family)
    spec = get_spec(model)
    apply_drop(model, attn=[1], mlp=[1])
    assert checkpoint_kind(model) == "blocks"
    expected = logits(model)
    out = save_dropped(model, tmp_path / "blocks")
    config = json.loads((out / "config.json").read_text())
    if family in NOT_PLAIN or spec.residual_norms:
        assert config["model_type"] == f"dropped_{spec.model_types[0]}"
        loaded = load_dropped(out)
    else:
        assert config["model_type"] == spec.model_types[0] and "auto_map" not in config
        assert spec.num_layers(config) == len(spec.get_layers(model)) - 1
        assert config["lightning_drop"]["dropped_blocks"] == [1]
        loaded = getattr(transformers, config["architectures"][0]).from_pretrained(out)
        assert type(loaded).__module__.startswith("transformers.models.")
    torch.testing.assert_close(logits(loaded.eval()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_in_one_pass_covers_every_sublayer(family, scoring_passes, layer_drops):
    model, _ = built(family)
    attn, mlp, (gone_attn, gone_mlp) = layer_drops(model, [1], [2])
    apply_drop(model, attn=attn, mlp=mlp)
    scores = compute_importance(model, [IDS])
    n = len(get_spec(model).get_layers(model))
    assert scoring_passes() == 1
    assert [s is None for s in scores.attn] == [i in gone_attn for i in range(n)]
    assert [s is None for s in scores.mlp] == [i in gone_mlp for i in range(n)]
    assert [s is None for s in scores.block] == [i in gone_attn and i in gone_mlp for i in range(n)]
    live = [s for s in scores.attn + scores.mlp + scores.block if s is not None]
    assert len(live) == 3 * n - len(gone_attn) - len(gone_mlp) - len(set(gone_attn) & set(gone_mlp))
    assert all(torch.isfinite(torch.tensor(live)))


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_metric_scores_the_drop_and_leaves_the_model(family, layer_drops):
    """The `loss` metric swaps stand-ins in and out of the model itself: a sublayer's score is the loss rise of
    really dropping it (a hybrid's mixer, a parallel layer's shared norm going with the block only), and the
    model computes what it did before."""
    from lightning_drop.scoring.loss_metric import token_loss_sum

    model, _ = built(family)
    before = logits(model)
    scores = compute_importance(model, [IDS], metric="loss")
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)

    def loss(m: torch.nn.Module) -> float:
        total, count = token_loss_sum(logits(m), IDS, None)
        return float(total) / count

    for row, attn, mlp in ((scores.attn, [0], []), (scores.mlp, [], [1]), (scores.block, [2], [2])):
        attn, mlp, _ = layer_drops(model, attn, mlp)
        dropped = copy.deepcopy(model)
        apply_drop(dropped, attn=attn, mlp=mlp)
        assert row[(attn or mlp)[0]] == pytest.approx(loss(dropped) - loss(model), abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_finds_the_family_linear_layers(family, layer_drops):
    """LoRA's default targets are the family's own linear layers (GPT-2's Conv1D too): every one in a live
    token mixer (attention, linear attention, Mamba, convolution) or MLP gets an adapter (every live mixer has
    some), none is left in a dropped one."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from lightning_drop.io.family_inference import lora_excluded, lora_targets

    model, _ = built(family)
    spec = get_spec(model)
    attn, mlp, _ = layer_drops(model, [1], [2])
    apply_drop(model, attn=attn, mlp=mlp)
    targets = lora_targets(model)
    config = LoraConfig(r=2, target_modules=targets, exclude_modules=lora_excluded(model, targets) or None,
                        task_type="CAUSAL_LM")  # as DropModule.add_lora builds it
    peft_model = get_peft_model(model, config)
    for i, layer in enumerate(spec.get_layers(peft_model.base_model.model)):
        mixer = (spec.mixer_name(layer),) if spec.holds(layer, "attn") else ()  # Nemotron-H: a layer may have none
        for kind, names, gone in (("mixer", mixer, i in attn), ("mlp", spec.mlp_modules(layer), i in mlp)):
            modules = {n: m for name in names for n, m in getattr(layer, name).named_modules(prefix=name)}
            adapted = {n.rsplit(".lora_A", 1)[0] for n in modules if n.endswith(".lora_A")}
            linear = {n for n, m in modules.items() if type(m) in (torch.nn.Linear, Conv1D) and "lora_" not in n
                      and not any(n.startswith(a + ".") for a in adapted)}
            assert not linear, (i, kind, linear)  # no linear layer of a live sublayer left without an adapter
            assert not (gone and adapted), (i, kind, adapted)
            assert gone or kind == "mlp" or not names or adapted, (i, kind)  # every live token mixer has linear layers
    assert torch.isfinite(logits(peft_model)).all()


def test_lora_default_targets_of_llama_are_the_named_defaults():
    """For Llama's layout (SmolLM2) the family's linear layers are exactly the documented default names."""
    from lightning_drop.callbacks.trainable import DEFAULT_TARGETS
    from lightning_drop.io.family_inference import lora_targets

    assert lora_targets(built("llama")[0]) == list(DEFAULT_TARGETS)


def test_add_lora_leaves_a_dropped_mlp_that_is_a_target_name():
    """BioGPT's MLP is its `fc1` and `fc2` themselves: after an MLP drop the stand-ins carry those names, and
    `DropModule.add_lora` adapts the live ones only."""
    from lightning_drop.core.standins import is_standin
    from lightning_drop.lightning.module import DropModule

    module = DropModule(model="tiny-biogpt")
    module.apply_drop(mlp=[2])
    module.add_lora(r=2)
    assert {"fc1", "fc2"} <= set(module.lora_config["target_modules"])
    layers = get_spec(module.hf_model).get_layers(module.hf_model)
    for i, layer in enumerate(layers):
        assert is_standin(layer.fc1) == (i == 2) and hasattr(layer.fc1, "lora_A") == (i != 2)
    module.merge_lora()
    assert dropped_layers(module.hf_model) == ([], [2])
