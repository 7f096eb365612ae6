"""`SharedContextLM` scores every request as lm-eval's `HFLM` does, computing each shared context once.

Request by request against `HFLM` on the shipped HellaSwag sample (4 endings per context, contexts of
different lengths: left padding of contexts, right padding of endings) and on PIQA (2 solutions per goal), on
tiny random models of several families, dropped ones included (first attention layer dropped: its cache
slot only counts tokens; Gemma-2's sliding window shorter than the contexts; an MoE), and on SmolLM2-135M.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_drop.measure.mc_scoring import SharedContextLM
from lightning_drop.io.tiny_models import tiny_model
from lightning_drop.core.modeling_dropped import apply_drop

TOL = 1e-4  # float32; relative 1e-6 where a byte-level tiny model sums hundreds of tokens (|log-likelihood| > 100)


def _requests(task: str, limit: int, shared_dir: Path, tmp_path: Path) -> list[Any]:
    from lm_eval.tasks import TaskManager

    from lightning_drop.measure.lm_eval_tasks import local_task_dir, prepare_paper_tasks

    if task == "piqa":
        try:
            include = prepare_paper_tasks()
        except (ConnectionError, FileNotFoundError) as err:
            pytest.skip(f"PIQA is not available offline: {err}")
    else:
        data = shared_dir / "data" / "hellaswag_val_first1000.jsonl"
        if not data.is_file():
            pytest.skip(f"{data} not present")
        include = local_task_dir({task: data}, tmp_path / "tasks")
    built = TaskManager(include_path=[str(include)], include_defaults=False).load([task])["tasks"][task]
    built.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(built.instances)


def _compare(model: torch.nn.Module, tok: Any, requests: list[Any], **kwargs: Any) -> SharedContextLM:
    """Both scorers on `requests`; asserts equal log-likelihoods (within TOL) and greedy flags, one by one."""
    from lm_eval.models.huggingface import HFLM

    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu").loglikelihood(requests, disable_tqdm=True)
    lm = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", **kwargs)
    mine = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(mine) == len(plain) == len(requests)
    for i, ((a, ga), (b, gb)) in enumerate(zip(plain, mine)):
        assert abs(a - b) <= max(TOL, 1e-6 * abs(a)), f"request {i}: {a} (HFLM) vs {b}"
        assert ga == gb, f"request {i}: greedy {ga} (HFLM) vs {gb}"
    return lm


@pytest.mark.parametrize("family,attn,mlp", [
    ("llama", [], []),
    ("llama", [0, 2], [1]),          # first layer's attention dropped: its slot only counts tokens
    ("gemma2", [], []),              # sliding window 8 against contexts of hundreds of byte tokens
    ("gemma2", [0], [3]),
    ("deepseek_v3", [0, 1], [2]),    # MoE
    ("qwen3", [0, 1, 2, 3], []),     # no attention left at all
    ("gpt2", [0], [1]),              # decoder body at `transformer`, learned absolute positions
    ("gpt_neox", [0], []),           # parallel residual
    ("falcon", [], [1]),
    ("gptj", [1], [0]),
])
def test_hellaswag_matches_hflm_request_by_request(family, attn, mlp, shared_dir, tmp_path):
    model, tok = tiny_model(family)
    if attn or mlp:
        apply_drop(model, attn=attn, mlp=mlp)
    requests = _requests("hellaswag_sample", 10, shared_dir, tmp_path)
    assert len({r.args[0] for r in requests}) == 10  # 4 endings share each context
    # batches of contexts of different lengths; batches of rows of several contexts, sorted by length
    lm = _compare(model, tok, requests, contexts_per_batch=4, rows_per_batch=6)
    assert lm.shared_requests == len(requests) and lm.plain_requests == 0


def test_piqa_matches_hflm_request_by_request(shared_dir, tmp_path):
    model, tok = tiny_model("llama")
    apply_drop(model, attn=[0], mlp=[])
    requests = _requests("piqa", 12, shared_dir, tmp_path)
    lm = _compare(model, tok, requests)
    assert lm.shared_requests == len(requests) == 24 and lm.plain_requests == 0


@pytest.fixture(autouse=True)
def nothing_said_yet(monkeypatch):
    """The scorer says each fallback once per process: a test that counts what is said starts from silence,
    whatever ran before it in this process."""
    from lightning_drop.measure import mc_scoring

    monkeypatch.setattr(mc_scoring, "_said", set())


def plain_twice_said_once(model, tok, requests, caplog, reason: str) -> None:
    """Scored twice, every request takes the plain path, and `reason` is logged once (not per call)."""
    with caplog.at_level(logging.INFO, logger="lightning_drop.measure.mc_scoring"):
        lm = _compare(model, tok, requests)
        _compare(model, tok, requests)
    assert lm.shared_requests == 0 and lm.plain_requests == len(requests)
    said = [r.message for r in caplog.records if reason in r.message]
    assert len(said) == 1, said


def test_requests_sharing_no_context_take_the_plain_path_said_once(shared_dir, tmp_path, caplog):
    model, tok = tiny_model("llama")
    requests = _requests("hellaswag_sample", 6, shared_dir, tmp_path)
    firsts = [r for r in requests if r.idx == 0]  # one ending per context: no context is shared
    plain_twice_said_once(model, tok, firsts, caplog, "share no context")
    mixed = _compare(model, tok, firsts[:2] + requests[8:])  # two alone, the rest in groups of four
    assert mixed.plain_requests == 2 and mixed.shared_requests == len(requests) - 8


def test_rolling_loglikelihood_is_unchanged(byte_tokenizer):
    """Perplexity-style requests (one window each, no shared context) give HFLM's numbers."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model("llama")
    docs = ["The cat sat on the mat and looked at the door.", "A second, longer document about the weather today."]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu").loglikelihood_rolling(reqs, disable_tqdm=True)
    lm = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    mine = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert mine == pytest.approx(plain, abs=TOL) and lm.shared_requests == 0 and lm.plain_requests > 0


def test_a_model_without_a_reusable_decoder_falls_back_said_once(shared_dir, tmp_path, caplog):
    """RWKV is a family this project does not describe (a pure recurrent model): no decoder body is known, so
    every request takes the plain path, with HFLM's numbers."""
    from transformers import RwkvConfig, RwkvForCausalLM

    _, tok = tiny_model("llama")
    torch.manual_seed(0)
    model = RwkvForCausalLM(RwkvConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                       attention_hidden_size=32, intermediate_size=64, context_length=1024)).eval()
    requests = _requests("hellaswag_sample", 4, shared_dir, tmp_path)
    plain_twice_said_once(model, tok, requests, caplog, "no decoder whose cache can be reused")


@pytest.mark.parametrize("family,kinds", [("jamba", "mamba"), ("qwen3_next", "linear_attention")])
def test_a_hybrid_with_recurrent_mixers_takes_the_plain_path_said_once(family, kinds, shared_dir, tmp_path, caplog):
    """A recurrent state carried across the context would be summed in another order than HFLM's single pass
    (0.001 nats off on tiny Jamba, 0.09 on tiny Qwen3-Next): HFLM's numbers exactly, on the plain path."""
    model, tok = tiny_model(family)
    requests = _requests("hellaswag_sample", 3, shared_dir, tmp_path)
    plain_twice_said_once(model, tok, requests, caplog, f"its {kinds} mixers carry a recurrent state")


def test_run_lm_eval_uses_the_shared_scorer_with_hflms_accuracy(shared_dir, tmp_path, monkeypatch):
    from lightning_drop.measure.evaluation import run_lm_eval
    from lightning_drop.measure.lm_eval_tasks import local_task_dir

    data = shared_dir / "data" / "hellaswag_val_first1000.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} not present")
    include = local_task_dir({"hellaswag_sample": data}, tmp_path / "tasks")
    model, tok = tiny_model("llama")
    shared = run_lm_eval(model, tok, ["hellaswag_sample"], limit=12, include_path=include)
    counted: list[int] = []
    real = SharedContextLM._shared
    monkeypatch.setattr(SharedContextLM, "_shared", lambda self, *a: counted.append(1) or real(self, *a))
    run_lm_eval(model, tok, ["hellaswag_sample"], limit=12, include_path=include)
    assert counted  # the shared path ran
    monkeypatch.setattr(SharedContextLM, "_shared", lambda self, requests, groups: pytest.fail("shared path"))
    monkeypatch.setattr(SharedContextLM, "_reuse_ok", lambda self, *a: False)  # HFLM's own path
    plain = run_lm_eval(model, tok, ["hellaswag_sample"], limit=12, include_path=include)
    assert shared["results"]["hellaswag_sample"] == plain["results"]["hellaswag_sample"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["hellaswag_sample", "piqa"])
def test_smollm2_matches_hflm_request_by_request(task, shared_dir, tmp_path):
    from lightning_drop.io.model_loading import load_model

    model, tok = load_model("smollm2-135m")
    requests = _requests(task, 16, shared_dir, tmp_path)
    lm = _compare(model.eval(), tok, requests)
    assert lm.shared_requests == len(requests)


def test_a_study_times_its_phases_in_log_results_and_report(tmp_path, c4_path, shared_dir, capsys):
    """Seconds per phase, each second counted once; a re-run computes nothing, so it times no phase."""
    from lightning_drop.jobs.study import Study, StudyConfig
    from test_study import tiny_config

    out = tmp_path / "out"
    mc = {"task": "hellaswag_sample", "data": str(shared_dir / "data" / "hellaswag_val_first1000.jsonl"),
          "limit": 3, "batch_size": 4}
    cfg = tiny_config(out, c4_path, eval={"perplexity": {"num_windows": 1, "seq_len": 32}, "mc": [mc]})
    doc = Study(StudyConfig.from_dict(cfg), verbose=True).run()
    phases = doc["phase_seconds"]
    assert {"scoring", "perplexity", "mc"} <= set(phases) and all(s > 0 for s in phases.values()), phases
    assert sum(phases.values()) <= doc["seconds_this_run"]
    log = capsys.readouterr().out
    summary = next(line for line in log.splitlines() if "time by phase: " in line)
    assert "hellaswag_sample (3 examples): " in log and all(f"{p} " in summary for p in phases), summary
    assert "time this run:" in (out / "report.md").read_text() and "by phase: " in (out / "report.md").read_text()
    again = Study(StudyConfig.from_dict(cfg), verbose=False).run()
    assert again["phase_seconds"] == {} and sum(again["computed_this_run"].values()) == 0


def test_a_lora_wrapped_model_is_scored_on_shared_contexts_as_the_merged_model(shared_dir, tmp_path):
    """Adapters attached and not merged (a peft wrapper): the shared path, through the base model whose layers
    carry the adapters, with the merged model's log-likelihoods request by request."""
    import copy

    from lm_eval.models.huggingface import HFLM

    from lightning_drop.lightning.module import DropModule

    module = DropModule(model="tiny-llama")
    module.apply_drop(attn=[1], mlp=[])
    module.add_lora(r=4)
    with torch.no_grad():  # adapters that change the model (peft starts them at zero)
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    wrapped = module.model
    assert type(wrapped).__name__.startswith("Peft")
    requests = _requests("hellaswag_sample", 6, shared_dir, tmp_path)
    lm = SharedContextLM(pretrained=wrapped, tokenizer=module.tokenizer, batch_size=4, device="cpu")
    mine = lm.loglikelihood(requests, disable_tqdm=True)
    assert lm.shared_requests == len(requests) and lm.plain_requests == 0
    merged = copy.deepcopy(wrapped).merge_and_unload().eval()
    plain = HFLM(pretrained=merged, tokenizer=module.tokenizer, batch_size=4, device="cpu").loglikelihood(
        requests, disable_tqdm=True)
    for i, ((a, ga), (b, gb)) in enumerate(zip(plain, mine)):
        assert abs(a - b) <= max(TOL, 1e-6 * abs(a)), f"request {i}: {a} (merged, HFLM) vs {b} (wrapped, shared)"
        assert ga == gb
    with wrapped.disable_adapter():  # the adapters are in what was scored: without them the numbers differ
        bare = HFLM(pretrained=wrapped, tokenizer=module.tokenizer, batch_size=4, device="cpu").loglikelihood(
            requests, disable_tqdm=True)
    assert max(abs(a - b) for (a, _), (b, _) in zip(bare, mine)) > 1e-2


def test_a_studys_recovered_point_is_scored_on_shared_contexts_and_git_stays_quiet(tmp_path, c4_path, shared_dir,
                                                                                    monkeypatch, capfd):
    """Every point of a study with recovery, the recovered model included, takes the shared path; run where
    the working directory is no git repository, lm-eval's git probe prints nothing."""
    from lightning_drop.jobs.study import Study, StudyConfig
    from test_study_recovery import config

    monkeypatch.setattr(SharedContextLM, "_plain", lambda self, requests, *a: pytest.fail(
        f"{len(requests)} requests on the plain path"))
    seen: list[int] = []
    real = SharedContextLM._shared
    monkeypatch.setattr(SharedContextLM, "_shared", lambda self, *a: seen.append(id(self.model)) or real(self, *a))
    mc = {"task": "hellaswag_sample", "data": str(shared_dir / "data" / "hellaswag_val_first1000.jsonl"),
          "limit": 3, "batch_size": 4, "at": "largest"}
    cfg = config(tmp_path / "out", c4_path, eval={"perplexity": {"num_windows": 1, "seq_len": 32}, "mc": [mc],
                                                  "domains": []},
                 sweeps=[{"name": "main", "targets": ["attn"], "nums": [0, 2]}])
    cfg["recovery"] = {"points": [{"target": "attn", "num": 2}], "train": {"seq_len": 32, "batch_size": 2, "steps": 2},
                       "recipes": [{"name": "lora-kd", "lr": 1e-2,
                                    "distillation": {"alpha": 1.0, "trainable": "lora", "r": 2}}]}
    monkeypatch.chdir(tmp_path)  # not a git repository
    doc = Study(StudyConfig.from_dict(cfg), verbose=False).run()
    recovered = next(r for r in doc["recovery"] if r["recipe"] == "lora-kd")
    assert recovered["mc_n"] == 3 and recovered["drop_attn"]
    assert len(seen) == 3  # base, attn-2 and the recovered model: each on the shared path
    out, err = capfd.readouterr()
    assert "not a git repository" not in out + err and "fatal:" not in out + err


def test_the_git_probe_is_quiet_and_still_records_a_commit(tmp_path, monkeypatch, capfd):
    """Inside `quiet_git_probe` lm-eval's probe captures git's complaint (None outside a repository) and still
    finds the commit inside one; git run by anyone else, and the probe outside the context, still speak."""
    import subprocess

    import lm_eval.evaluator as evaluator

    from lightning_drop.measure.mc_scoring import quiet_git_probe

    real = evaluator.get_git_commit_hash
    monkeypatch.chdir(tmp_path)
    with quiet_git_probe():
        assert evaluator.get_git_commit_hash() is None
        subprocess.run(["git", "describe", "--always"], check=False)  # not lm-eval's probe: its output stays
    assert evaluator.get_git_commit_hash is real
    err = capfd.readouterr().err
    assert err.count("not a git repository") == 1, err
    real()  # lm-eval's own probe, outside the context, complains as before
    assert "not a git repository" in capfd.readouterr().err
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    monkeypatch.chdir(repo)
    with quiet_git_probe():
        assert evaluator.get_git_commit_hash() == head
    assert capfd.readouterr().err == ""
