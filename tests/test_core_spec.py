"""One spec type for decoders and vision encoders: behaviours the two stacks used to disagree on."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lightning_drop import apply_drop, dropped_layers, get_spec, load_dropped, save_dropped
from lightning_drop.scoring.importance import compute_importance
from lightning_drop.io.tiny_models import tiny_model
from lightning_drop.io.vision_loading import tiny_vision_model

PIXELS = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _model(family: str) -> torch.nn.Module:
    try:
        return tiny_model(family)[0]
    except ValueError:
        return tiny_vision_model(family)


@pytest.mark.parametrize("family", ["llama", "vit", "swinv2"])
@pytest.mark.parametrize("field,value,message", [
    ("drop_attn_list", [-1], "out of range"),
    ("drop_attn_list", [4], "out of range"),
    ("drop_mlp_list", [True, False], "needs 4 entries"),
    ("drop_mlp_list", [1, True], "not a mix"),
])
def test_bad_drop_lists_in_a_config_are_refused(tmp_path, family, field, value, message):
    """A config naming layer -1 must not silently drop the last layer (Python indexing) or crash later."""
    model = _model(family)
    apply_drop(model, attn=[1])
    save_dropped(model, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_dropped(tmp_path / "ckpt")


@pytest.mark.parametrize("family", ["llama", "vit", "swinv2"])
def test_numpy_and_torch_integer_indices_are_accepted(family):
    np = pytest.importorskip("numpy")
    model = _model(family)
    apply_drop(model, attn=[np.int64(1), torch.tensor(2)], mlp=[np.int32(3)])
    assert dropped_layers(model) == ([1, 2], [3])


def test_one_spec_type_and_decoder_only_code_points_to_vision():
    from lightning_drop.core.architectures import decoder_spec, vision_spec

    assert get_spec("vit") is vision_spec("vit") and get_spec("vit").inputs == "image"
    with pytest.raises(ValueError, match="'vit' is a vision transformer: use lightning_drop.vision"):
        decoder_spec("vit")
    with pytest.raises(ValueError, match="unsupported vision architecture 'llama'"):
        vision_spec("llama")


def test_compute_importance_takes_text_and_image_batches():
    vit = tiny_vision_model("vit")
    for batch in (PIXELS, (PIXELS, torch.zeros(4)), {"pixel_values": PIXELS}):
        s = compute_importance(vit, [batch])
        assert s.num_tokens == 4 * (16 + 1) and all(v > 0 for v in s.attn + s.mlp + s.block)
    llama, _ = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert compute_importance(llama, [{"input_ids": ids, "attention_mask": mask}]).num_tokens == 13
    swin = tiny_vision_model("swinv2")
    assert compute_importance(swin, [PIXELS]).extra["block_names"] == ["0.0", "0.1", "1.0", "1.1"]


def test_drop_plan_is_a_property_of_the_module_for_text_and_images():
    from lightning_drop.lightning.module import DropModule

    for module in (DropModule(model="tiny-llama"), DropModule(family="vit")):
        module.apply_drop([1], [2])
        assert module.drop_plan == ([1], [2]) and module.drop_plan.attn == [1]
        assert module.drop_plan() == ([1], [2])  # code written against the earlier method still works


def test_the_model_chooses_the_task_and_mixed_arguments_are_refused(tmp_path):
    from lightning_drop.errors import UserError
    from lightning_drop.lightning.module import DropModule
    from lightning_drop.lightning.task import CausalLM, ImageClassification

    image = DropModule(family="dinov3_vit", num_labels=3)
    assert isinstance(image.task, ImageClassification) and image(PIXELS).shape == (4, 3)
    assert isinstance(image.task.head, torch.nn.Linear)  # DINOv3 has no classification class: the task's head
    assert isinstance(DropModule(family="llama").task, CausalLM)
    save_dropped(apply_drop(tiny_vision_model("vit"), attn=[1]), tmp_path / "vit")
    reloaded = DropModule(model=str(tmp_path / "vit"))
    assert isinstance(reloaded.task, ImageClassification) and reloaded.drop_plan == ([1], [])
    for kwargs, message in [({"model": "tiny-llama", "family": "vit"}, "not both"),
                            ({"model": "tiny-llama", "num_labels": 3}, "num_labels is for image classification"),
                            ({"family": "vit", "num_labels": 1}, "num_labels must be an integer >= 2"),
                            ({"family": "nope"}, "unknown family 'nope'"),
                            ({"family": "vit", "tokenizer_name": "tiny-llama"}, "takes no tokenizer")]:
        with pytest.raises(UserError, match=message):
            DropModule(**kwargs)


def test_image_drop_report_refuses_a_language_model():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_drop.lightning.module import DropModule
    from lightning_drop.vision.drop_report import ImageDropReport

    trainer = SimpleNamespace(strategy=SimpleNamespace(), datamodule=SimpleNamespace(test_dataloader=list))
    with pytest.raises(MisconfigurationException, match="needs a DropModule training an image classifier"):
        ImageDropReport().setup(trainer, DropModule(model="tiny-llama"), "fit")


def test_layer_drop_on_an_image_model_ranks_rank_zeros_scores_on_every_rank():
    """Rank zero's scores are what every rank ranks, even where this rank's own scores chose otherwise."""
    from lightning_drop.callbacks import LayerDrop
    from lightning_drop.lightning.module import DropModule
    from lightning_drop.scoring.importance import ImportanceScores

    module = DropModule(family="vit")
    datamodule = SimpleNamespace(calibration_batch=lambda: {"pixel_values": PIXELS})
    seen = []

    def broadcast(obj, src=0):
        seen.append(obj)
        # rank zero's lowest attention score is at another layer than this rank's
        theirs = 3 if obj.attn.index(min(obj.attn)) != 3 else 0
        attn = [0.0 if i == theirs else 1.0 for i in range(len(obj.attn))]
        return ImportanceScores(obj.metric, attn, obj.mlp, obj.block, obj.num_tokens)

    trainer = SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(broadcast=broadcast), loggers=[],
                              global_step=0, is_global_zero=True, callbacks=[], global_rank=0, world_size=1)
    callback = LayerDrop(target="attn", num=1, when="fit_end", verbose=False)
    callback.drop_round(trainer, module)
    own = seen[0].attn.index(min(seen[0].attn))
    chosen = 3 if own != 3 else 0
    assert len(seen) == 1 and own != chosen
    assert module.drop_plan == ([chosen], []) and module.model.config.drop_attn_list == [chosen]
    assert callback.rounds[0]["attn"] == [chosen]


def _ddp_worker(rank, world, init_file, pixels, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    scores = compute_importance(tiny_vision_model("vit"), [pixels[rank::world]])
    torch.save(scores.to_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.xdist_group("processes")  # two processes: one such test at a time
def test_vision_scores_are_synced_across_ddp_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), PIXELS, str(tmp_path / "scores")), nprocs=2, join=True)
    r0, r1 = torch.load(f"{tmp_path}/scores.0"), torch.load(f"{tmp_path}/scores.1")
    single = compute_importance(tiny_vision_model("vit"), [PIXELS])
    assert r0["num_tokens"] == r1["num_tokens"] == single.num_tokens
    for kind in ("attn", "mlp", "block"):
        assert r0[kind] == r1[kind]  # identical on every rank
        assert r0[kind] == pytest.approx(single.row(kind), abs=1e-6)


def test_vision_drop_by_importance_is_the_core_selection(monkeypatch):
    import lightning_drop.scoring.schedule as schedule

    calls = []
    real = schedule.compute_importance
    monkeypatch.setattr(schedule, "compute_importance", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_vision_model("swinv2")
    result = schedule.drop_by_importance(model, [PIXELS], target="block", num=2, schedule="iterative")
    assert len(calls) == 2 and len(result.attn) == 2 and result.attn == result.mlp == dropped_layers(model)[0]
