"""One drop schedule: in-memory, layer-streamed and the study's cached walk drop the same sets."""

from __future__ import annotations

import pytest
import torch

from lightning_drop.io.text_data import CalibrationConfig
from lightning_drop.jobs.drop import DropJob, run_drop
from lightning_drop.scoring.importance import ImportanceScores, compute_importance
from lightning_drop.io.tiny_models import tiny_model
from lightning_drop.scoring.schedule import drop_rounds
from lightning_drop.scoring.selection import select_modules
from lightning_drop.jobs.study import Study, StudyConfig

NUMS = (1, 2, 3)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    model, tok = tiny_model("llama")
    out = tmp_path_factory.mktemp("schedule") / "tiny"
    model.save_pretrained(out, max_shard_size="150KB")
    tok.save_pretrained(out)
    return out


def _calibration(c4_path) -> CalibrationConfig:
    return CalibrationConfig(source=str(c4_path), num_samples=4, seq_len=32)


def _study(src, c4_path, out, schedule: str, step: int) -> tuple[Study, object]:
    cfg = {"name": "sched", "model": str(src), "output": str(out),
           "calibration": {"source": str(c4_path), "num_samples": 4, "seq_len": 32, "batch_size": 2},
           "eval": {"perplexity": {"num_windows": 1, "seq_len": 32}, "mc": None}, "speed": {"enabled": False},
           "sweeps": [{"name": "main", "targets": ["joint"], "nums": [0, *NUMS], "schedule": schedule,
                       "step": step}]}
    study = Study(StudyConfig.from_dict(cfg), verbose=False)
    return study, study.cfg.sweeps[0]


@pytest.mark.parametrize("schedule, step", [("one-shot", 1), ("iterative", 1), ("iterative", 2)])
def test_in_memory_streamed_and_study_drop_the_same_sets(tmp_path, c4_path, src, schedule, step):
    study, sweep = _study(src, c4_path, tmp_path / "study", schedule, step)
    reports = {}
    for num in NUMS:
        job = {"model": str(src), "target": "joint", "num": num, "schedule": schedule, "step": step,
               "batch_size": 2, "calibration": _calibration(c4_path)}
        mem = run_drop(DropJob(**job), progress=False)
        streamed = run_drop(DropJob(**job, stream=True), progress=False)
        walked = study.drops.drop_set(sweep, "joint", num)
        assert (mem["drop_attn_list"], mem["drop_mlp_list"]) == walked, num
        assert (streamed["drop_attn_list"], streamed["drop_mlp_list"]) == walked, num
        assert len(walked[0]) + len(walked[1]) == num
        reports[num] = mem
    sets = {n: set(r["drop_attn_list"]) | {100 + i for i in r["drop_mlp_list"]} for n, r in reports.items()}
    assert sets[1] < sets[2] < sets[3]  # every schedule is a walk: a larger count extends a smaller one
    if schedule == "iterative" and step == 2:
        # 3 lies between the walk's steps: the set at 2 plus the lowest of the round scored after dropping 2
        second = ImportanceScores.from_dict(reports[3]["rounds"][1]["scores"])
        assert len(reports[3]["rounds"]) == 2
        attn, mlp = select_modules(second, "joint", 1)
        assert set(reports[3]["drop_attn_list"]) == set(reports[2]["drop_attn_list"]) | set(attn)
        assert set(reports[3]["drop_mlp_list"]) == set(reports[2]["drop_mlp_list"]) | set(mlp)


def test_a_walk_continued_from_its_middle_makes_the_same_rounds():
    """A resumed walk (LayerDrop after a checkpoint, a study extending a cached walk) scores what the
    uninterrupted walk scored, with the same round indices."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = []

    def score(attn, mlp, index):
        from lightning_drop.core.modeling_dropped import apply_drop, dropped_layers

        m, _ = tiny_model("llama")
        apply_drop(m, attn=attn, mlp=mlp)
        seen.append((attn, mlp, index))
        assert dropped_layers(m) == (attn, mlp)
        return compute_importance(m, [ids], metric="random", seed=index)

    full = list(drop_rounds(score, "joint", 5, 4, "iterative", step=2))
    assert [(r.at, r.size) for r in full] == [(0, 2), (2, 2), (4, 1)]
    rest = list(drop_rounds(score, "joint", 5, 4, "iterative", step=2, start=2,
                            walked=(full[0].dropped_attn, full[0].dropped_mlp)))
    assert [(r.at, r.attn, r.mlp) for r in rest] == [(r.at, r.attn, r.mlp) for r in full[1:]]
    assert seen[3:] == seen[1:3]
    # a partial last round is the prefix of the round the walk would take whole
    assert full[2].set_at(5) == (full[2].dropped_attn, full[2].dropped_mlp)


def test_refused_before_the_first_round_is_scored():
    def score(attn, mlp, index):
        raise AssertionError("scored a request that cannot succeed")

    with pytest.raises(ValueError, match="without removing every sublayer"):
        drop_rounds(score, "joint", 8, 4, "iterative")
    with pytest.raises(ValueError, match="unknown schedule"):
        drop_rounds(score, "joint", 1, 4, "greedy")
    with pytest.raises(ValueError, match="step must be at least 1"):
        drop_rounds(score, "attn", 1, 4, "iterative", step=0)


def test_scoring_pass_counter_sees_scoring_and_not_training(scoring_passes):
    """The counter the no-re-scoring tests rely on: one per calibration batch, none for a training forward."""
    model, _ = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert scoring_passes() == 0
    compute_importance(model, [ids, ids])
    assert scoring_passes() == 2


def thirds(remaining: int, step: int) -> int:
    """A user's schedule, reached by its importable name below."""
    return max(1, remaining // 3)


def _fixed_scores(attn, mlp, index):
    """Scores that rank attention 3, 2, 1, 0 (lowest first), whatever is already gone."""
    row = [None if i in attn else float(4 - i) for i in range(4)]
    return ImportanceScores("fixed", row, [1.0] * 4, [1.0] * 4)


def test_a_users_schedule_by_name_callable_or_importable_name():
    from lightning_drop.scoring.schedule import register_schedule, resolve_schedule

    by_path = [(r.at, r.size) for r in drop_rounds(_fixed_scores, "attn", 3, 4, "test_schedule.thirds")]
    by_callable = [(r.at, r.size) for r in drop_rounds(_fixed_scores, "attn", 3, 4, thirds)]
    register_schedule("thirds", thirds)
    by_name = [(r.at, r.size, r.attn) for r in drop_rounds(_fixed_scores, "attn", 3, 4, "thirds")]
    assert by_path == by_callable == [(0, 1), (1, 1), (2, 1)]
    assert by_name == [(0, 1, [3]), (1, 1, [2]), (2, 1, [1])]
    assert resolve_schedule("one-shot").sizes(5, 2) == [5] and resolve_schedule("iterative").sizes(5, 2) == [2, 2, 1]
    # a walk continues only where one of its rounds starts
    with pytest.raises(ValueError, match="no round of the iterative schedule starts at 1"):
        drop_rounds(_fixed_scores, "attn", 4, 4, "iterative", step=2, start=1)
    with pytest.raises(ValueError, match="no round of the one-shot schedule starts at 2"):
        drop_rounds(_fixed_scores, "attn", 3, 4, "one-shot", start=2)


def test_a_bad_schedule_rule_or_metric_is_refused_where_it_is_given():
    from lightning_drop.callbacks import LayerDrop
    from lightning_drop.scoring.metrics import register_metric
    from lightning_drop.scoring.schedule import register_schedule
    from lightning_drop.scoring.selection import register_rule

    with pytest.raises(ValueError, match=r"schedule 'two' <lambda>\(a, b, c\) must take 2 positional arguments"):
        register_schedule("two", lambda a, b, c: 1)
    with pytest.raises(ValueError, match="selection rule 'r' .* must take 4 positional arguments"):
        register_rule("r", lambda scores: ([], []))
    with pytest.raises(ValueError, match="metric 'm' .* must take 2 positional arguments"):
        register_metric("m", lambda x, y, z: x)
    with pytest.raises(ValueError, match="schedule 'test_schedule.no_such' does not import"):
        drop_rounds(_fixed_scores, "attn", 1, 4, "test_schedule.no_such")
    with pytest.raises(ValueError, match="must drop between 1 and 2 modules in a round, got 0"):
        list(drop_rounds(_fixed_scores, "attn", 2, 4, lambda remaining, step: 0))
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="LayerDrop: unknown schedule 'greedy'"):
        LayerDrop(num=1, schedule="greedy")
    with pytest.raises(MisconfigurationException, match="LayerDrop: unknown selection rule 'highest'"):
        LayerDrop(num=1, rule="highest")
    assert LayerDrop(num=1, schedule="test_schedule.thirds", metric="angular")._schedule.round_size is thirds
