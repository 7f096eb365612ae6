"""The `loss` metric (SLEB / BlockPruner) and Gromov's `--span` rule against brute force on tiny models, and
their refusals through the command line (one line, exit 2, nothing on disk changed)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from test_bad_inputs import COMMON, D, _fails_in_one_line
from test_bad_inputs_fit import _yaml
from lightning_drop.callbacks import LayerDrop
from lightning_drop.core.modeling_dropped import apply_drop
from lightning_drop.errors import UserError
from lightning_drop.io.model_loading import tiny_model
from lightning_drop.io.vision_loading import tiny_vision_model
from lightning_drop.scoring.importance import compute_importance
from lightning_drop.scoring.schedule import drop_by_importance

LAYERS = 5


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 300, (2, 24), generator=g) for _ in range(2)]
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0  # padding: its tokens are neither predicted nor predict
    return [{"input_ids": ids[0], "attention_mask": mask}, {"input_ids": ids[1]}]


def _mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """The calibration loss by full forwards, as transformers computes it (labels -100 at padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            labels = b["input_ids"].clone()
            if "attention_mask" in b:
                labels[b["attention_mask"] == 0] = -100
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(**b, labels=labels, use_cache=False).loss) * n
            count += n
    return total / count


def _without(model: torch.nn.Module, attn: list[int], mlp: list[int]) -> torch.nn.Module:
    out = copy.deepcopy(model)
    apply_drop(out, attn=attn, mlp=mlp)
    return out


def _drops(kind: str, i: int, model: torch.nn.Module) -> tuple[list[int], list[int]]:
    from lightning_drop.core.modeling_dropped import dropped_layers

    gone_attn, gone_mlp = dropped_layers(model)
    attn = [i] if kind in ("attn", "block") and i not in gone_attn else []
    mlp = [i] if kind in ("mlp", "block") and i not in gone_mlp else []
    return attn, mlp


@pytest.mark.parametrize("pre", [((), ()), ((1,), (3,))], ids=["whole", "half-dropped"])
def test_loss_scores_are_the_brute_force_loss_increase(pre):
    model, _ = tiny_model("llama", num_layers=LAYERS)
    apply_drop(model, attn=list(pre[0]), mlp=list(pre[1]))
    batches = _batches()
    scores = compute_importance(model, batches, metric="loss")
    base = _mean_loss(model, batches)
    assert scores.extra["base_loss"] == pytest.approx(base, abs=1e-5)
    for kind in ("attn", "mlp", "block"):
        for i, got in enumerate(scores.row(kind)):
            attn, mlp = _drops(kind, i, model)
            if not attn and not mlp:
                assert got is None
                continue
            want = _mean_loss(_without(model, attn, mlp), batches) - base
            assert got == pytest.approx(want, abs=1e-5), (kind, i)
    cost = scores.extra["cost"]
    assert cost["head_passes"] == 1 + cost["candidates"] and 1 < cost["forward_passes"] < cost["head_passes"]
    # only the rows asked for are scored, and the model is left as it was
    only = compute_importance(model, batches, metric="loss", kinds=("mlp",))
    assert only.mlp == scores.mlp and all(v is None for v in only.attn + only.block)
    assert compute_importance(model, batches, metric="loss").block == scores.block


def _brute_greedy(model: torch.nn.Module, batches, target: str, num: int) -> tuple[list[int], list[int]]:
    model = copy.deepcopy(model)
    kinds = {"block": ["block"], "attn": ["attn"], "joint": ["attn", "mlp"]}[target]
    for _ in range(num):
        options = []
        for order, kind in enumerate(kinds):
            for i in range(LAYERS):
                attn, mlp = _drops(kind, i, model)
                if attn or mlp:
                    options.append((_mean_loss(_without(model, attn, mlp), batches), order, i, attn, mlp))
        _, _, _, attn, mlp = min(options)
        apply_drop(model, attn=attn, mlp=mlp)
    from lightning_drop.core.modeling_dropped import dropped_layers

    return dropped_layers(model)


@pytest.mark.parametrize("target", ["block", "joint"])
def test_greedy_step_one_picks_what_brute_force_greedy_picks(target):
    model, _ = tiny_model("llama", num_layers=LAYERS, seed=3)
    batches = _batches()
    want = _brute_greedy(model, batches, target, 3)
    got = drop_by_importance(copy.deepcopy(model), batches, target, 3, metric="loss", schedule="iterative", step=1)
    assert (got.attn, got.mlp) == want
    assert got.cost()["forward_passes"] == pytest.approx(sum(r.extra["cost"]["forward_passes"] for r in got.rounds))


def _angular(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> float:
    a = torch.arccos(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1, 1)) / math.pi
    return a[mask.bool()].sum().item() if mask is not None else a.sum().item()


def test_span_picks_the_brute_force_best_span():
    model, _ = tiny_model("llama", num_layers=LAYERS, seed=2)
    batches = _batches()
    layers = model.model.layers
    for span in (1, 2, 3):
        # the input of every layer and the output of the last, read by hooks of our own
        totals, tokens = [0.0] * (LAYERS - span + 1), 0
        for b in batches:
            seen: dict[int, torch.Tensor] = {}
            hooks = [layer.register_forward_pre_hook(
                lambda m, a, k, i=i: seen.__setitem__(i, (a or (k["hidden_states"],))[0]), with_kwargs=True)
                for i, layer in enumerate(layers)]
            hooks.append(layers[-1].register_forward_hook(lambda m, a, out: seen.__setitem__(LAYERS, out)))
            with torch.no_grad():
                model(**b, use_cache=False)
            for h in hooks:
                h.remove()
            mask = b.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else b["input_ids"].numel()
            for s in range(LAYERS - span + 1):
                totals[s] += _angular(seen[s], seen[s + span], mask)
        best = min(range(len(totals)), key=lambda s: totals[s])
        scores = compute_importance(model, batches, metric="angular", span=span)
        assert scores.block[:len(totals)] == pytest.approx([t / tokens for t in totals], abs=1e-6)
        assert scores.block[len(totals):] == [None] * (span - 1)
        got = drop_by_importance(copy.deepcopy(model), batches, "block", span, metric="angular", span=span)
        assert got.attn == got.mlp == list(range(best, best + span))


def test_loss_needs_an_lm_head_and_span_the_angular_block_rule():
    with pytest.raises(UserError, match="needs a causal language model with an LM head: ViTForImageClassification"):
        compute_importance(tiny_vision_model("vit"), [torch.zeros(2, 3, 32, 32)], metric="loss")
    with pytest.raises(MisconfigurationException, match="LayerDrop: span scores spans by angular distance"):
        LayerDrop(target="block", metric="cosine", span=2)
    with pytest.raises(MisconfigurationException, match="needs the block target, not 'attn'"):
        LayerDrop(target="attn", metric="angular", span=2)
    assert LayerDrop(target="block", metric="angular", span=2).num == 2


def _calib(w: Path) -> list[str]:
    return ["--calibration", str(w / "c4.jsonl"), "--num-samples", "2", "--seq-len", "32"]


SPAN_CASES = [
    ("span-with-cosine", lambda w, t: [D, "--model", str(w / "model"), "--target", "block", "--span", "2",
                                       *_calib(w), "--output", str(t / "o")],
     "--span scores spans by angular distance: it needs the angular metric, not 'cosine'"),
    ("span-with-attn", lambda w, t: [D, "--model", str(w / "model"), "--metric", "angular", "--span", "2",
                                     *_calib(w), "--output", str(t / "o")],
     "--span drops consecutive blocks: it needs the block target, not 'attn'"),
    ("span-past-the-layers", lambda w, t: [D, "--model", str(w / "model"), "--metric", "angular", "--target",
                                           "block", "--span", "9", *_calib(w), "--output", str(t / "o")],
     "--span 9 is not smaller than the model's 4 layers"),
    ("span-streamed", lambda w, t: [D, "--model", str(w / "model"), "--metric", "angular", "--target", "block",
                                    "--span", "2", "--stream", *_calib(w), "--output", str(t / "o")],
     "--span needs the whole model for every candidate, which --stream never holds"),
    ("loss-without-text", lambda w, t: [D, "--model", str(w / "model"), "--metric", "loss", "--calibration",
                                        str(w / "empty.jsonl"), *COMMON, "--output", str(t / "o")], "empty.jsonl"),
]


@pytest.mark.parametrize("name,argv,expect", SPAN_CASES, ids=[c[0] for c in SPAN_CASES])
def test_refusals_are_one_line_and_change_nothing(world, tmp_path, capsys, name, argv, expect):  # noqa: F811
    _fails_in_one_line(world, tmp_path, capsys, argv(world, tmp_path), expect)


VISION_LOSS = """\
trainer: {accelerator: cpu, max_steps: 1, logger: false, enable_checkpointing: false, enable_progress_bar: false,
  callbacks: [{class_path: lightning_drop.callbacks.LayerDrop, init_args: {target: attn, num: 1, metric: loss}}]}
model:
  class_path: lightning_drop.lightning.module.DropModule
  init_args: {family: vit, num_labels: 10, init_config: {image_size: 32, patch_size: 8, hidden_size: 32,
    intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2}}
data:
  class_path: lightning_drop.vision.image_data.ImageDataModule
  init_args: {source: digits, image_size: 32, batch_size: 16, calibration_size: 16}
"""


def test_loss_on_a_model_without_lm_head_is_one_line_before_training(world, tmp_path, capsys):  # noqa: F811
    _fails_in_one_line(world, tmp_path, capsys, ["fit", "--config", _yaml(tmp_path, VISION_LOSS)],
                       "LayerDrop: metric 'loss' needs a causal language model with an LM head")


def test_drop_command_prints_the_selection_cost(world, tmp_path, capsys):  # noqa: F811
    from lightning_drop.cli import main

    out = tmp_path / "o"
    assert main([D, "--model", str(world / "model"), "--metric", "loss", "--target", "block", "--num", "2",
                 "--schedule", "iterative", *_calib(world), "--output", str(out)]) == 0
    import json

    report = json.loads((out / "importance.json").read_text())
    assert report["cost"]["forward_passes"] > 1 and report["cost"]["seconds"] > 0
    assert len(report["rounds"]) == 2 and len(report["drop_attn_list"]) == 2
    assert "selection cost" in capsys.readouterr().out


def test_study_sweeps_loss_greedy_and_spans(tmp_path, c4_path):
    from test_study import run, tiny_config

    cfg = tiny_config(tmp_path, c4_path, speed={"enabled": False})
    cfg["sweeps"] = [{"name": "main", "targets": ["block"], "nums": [0, 2], "metric": "loss",
                      "schedule": "iterative"},
                     {"name": "gromov", "targets": ["block"], "nums": [2], "metric": "angular", "span": True}]
    _, doc = run(cfg)
    rows = {r["sweep"]: r for r in doc["rows"] if r.get("drop_attn")}
    span = rows["gromov"]["drop_attn"]
    assert span == rows["gromov"]["drop_mlp"] and span == list(range(span[0], span[0] + 2))
    assert len(rows["main"]["drop_attn"]) == 2
    bad = tiny_config(tmp_path, c4_path, sweeps=[{"targets": ["attn"], "metric": "angular", "span": True}])
    with pytest.raises(UserError, match=r"span drops consecutive blocks: it needs the block target, not 'attn'"):
        run(bad)


def test_loss_streams_through_the_command_line(world, tmp_path, capsys):  # noqa: F811
    """`--metric loss --stream` was refused; it now runs every candidate's tail layer by layer."""
    from lightning_drop.cli import main

    out = tmp_path / "o"
    assert main([D, "--model", str(world / "model"), "--metric", "loss", "--stream", *_calib(world), "--num", "1",
                 "--output", str(out)]) == 0
    import json

    report = json.loads((out / "importance.json").read_text())
    assert report["streamed"] is True and report["cost"]["layer_loads"] == 4 and len(report["drop_attn_list"]) == 1
    assert "4 layer loads" in capsys.readouterr().out
