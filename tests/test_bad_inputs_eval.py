"""Bad inputs to evaluation, speed and export, and their messages, through the command line.

Each refusal runs the real entry point (`lightning_drop.cli.main`) in process and must exit 2 with one
`error:` line naming what is wrong, with nothing on disk changed (the inputs and the would-be outputs are
fingerprinted as in `test_bad_inputs`). Where the issue is found before the model loads, loading it fails the
test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_bad_inputs import ERROR_LINE, _fingerprint

from lightning_drop.cli import main


def _refused(world: Path, tmp_path: Path, capsys, argv: list[str], *expect: str) -> str:
    """Run `argv`; it must exit 2 with one error line holding every `expect`, changing nothing. Returns it."""
    before_world, before_tmp = _fingerprint(world), _fingerprint(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ERROR_LINE in line]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    assert errors[0].startswith(f"lightning-drop {argv[0]}: error: "), errors[0]
    for text in expect:
        assert text in errors[0], errors[0]
    assert _fingerprint(world) == before_world
    assert _fingerprint(tmp_path) == before_tmp
    return errors[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: the mistake must be found before."""
    import lightning_drop.io.model_loading as model_loading

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(model_loading, "load_model", load_model)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"ctx": "A man sits on a roof. He", "endings": ["jumps.", "sings.", "rests.", "works."], "label": 3}
# (id, the bad second record, what the message says)
BAD_RECORDS = [
    ("label-out-of-range", {**GOOD, "label": 7}, "'label' is 7, outside the 4 choices (0-3)"),
    ("label-negative", {**GOOD, "label": -1}, "'label' is -1, outside the 4 choices"),
    ("label-not-a-number", {**GOOD, "label": "three"}, "'label' must be the index of the right choice"),
    ("label-a-bool", {**GOOD, "label": True}, "'label' must be the index of the right choice"),
    ("endings-empty", {**GOOD, "endings": []}, "'endings' must be a list of at least two non-blank strings"),
    ("endings-not-a-list", {**GOOD, "endings": "jumps."}, "'endings' must be a list"),
    ("endings-blank-choice", {**GOOD, "endings": ["jumps.", " ", "rests.", "works."]}, "non-blank strings"),
    ("endings-number-choice", {**GOOD, "endings": ["jumps.", 4, "rests.", "works."]}, "non-blank strings"),
    ("ctx-not-text", {**GOOD, "ctx": 12}, "'ctx' must be non-blank text"),
    ("ctx-blank", {**GOOD, "ctx": ""}, "'ctx' must be non-blank text"),
    ("record-not-an-object", [GOOD["ctx"], GOOD["endings"]], "expected a JSON object, got list"),
]


@pytest.mark.parametrize("name,record,expect", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_task_record_values_are_checked_with_their_line(world, tmp_path, capsys, no_model_loading, name, record,
                                                        expect):
    data = _jsonl(tmp_path / "hs.jsonl", [GOOD, record, GOOD])
    argv = ["eval", "--model", str(world / "model"), "--data", f"hellaswag_sample={data}",
            "--output", str(tmp_path / "res.json")]
    _refused(world, tmp_path, capsys, argv, f"{data} line 2: ", expect)


def test_task_records_stored_as_digit_strings_pass(tmp_path):
    """HellaSwag on the Hub stores its label as a string of digits: that is a valid index."""
    from lightning_drop.measure.lm_eval_tasks import _shipped_tasks, check_task_records

    data = _jsonl(tmp_path / "hs.jsonl", [GOOD, {**GOOD, "label": "0"}])
    assert check_task_records("hellaswag_sample", _shipped_tasks()["hellaswag_sample"], data) == 2
    bad = _jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "label": "4"}])
    with pytest.raises(ValueError, match="line 2: .*outside the 4 choices"):
        check_task_records("hellaswag_sample", _shipped_tasks()["hellaswag_sample"], bad)


@pytest.mark.parametrize("value,kind", [(5, "int"), (None, "null"), (["a"], "list")])
def test_calibration_text_values_are_checked_with_their_line(world, tmp_path, capsys, no_model_loading, value,
                                                             kind):
    data = _jsonl(tmp_path / "held.jsonl", [{"text": "one"}, {"text": "two"}, {"text": value}])
    _refused(world, tmp_path, capsys, ["perplexity", "--model", str(world / "model"), "--data", str(data)],
             f"{data} line 3: field 'text' is {kind}, not a string")


def test_calibration_text_values_are_checked_by_drop(world, tmp_path, capsys):
    """`drop` reads its calibration text once the model is loaded (it cuts windows with its tokenizer)."""
    data = _jsonl(tmp_path / "cal.jsonl", [{"text": "one"}, {"text": 7}])
    _refused(world, tmp_path, capsys, ["drop", "--model", str(world / "model"), "--calibration", str(data),
                                       "--num", "1", "--num-samples", "2", "--seq-len", "16",
                                       "--output", str(tmp_path / "out")], f"{data} line 2: field 'text' is int")


# ----------------------------------------------------------------------------------------- messages
def test_no_tasks_names_the_options(world, tmp_path, capsys, no_model_loading):
    line = _refused(world, tmp_path, capsys, ["eval", "--model", str(world / "model")],
                    "pass --tasks NAME,... or --preset paper")
    assert "tasks=" not in line and "preset=" not in line


def test_no_tasks_from_python_names_the_parameters():
    """The same mistake from Python is spelled as Python."""
    from lightning_drop.measure.lm_eval_tasks import resolve_tasks

    with pytest.raises(ValueError, match=r"pass tasks=\[\.\.\.\] or preset='paper'"):
        resolve_tasks([])


def test_unknown_task_names_include_path_option(world, tmp_path, capsys, no_model_loading):
    line = _refused(world, tmp_path, capsys, ["eval", "--model", str(world / "model"), "--tasks",
                                              "definitely_not_a_task"], "definitely_not_a_task", "--include-path DIR")
    assert "include_path=" not in line


def test_existing_output_names_overwrite_as_the_user_sets_it(world, tmp_path, capsys):
    from lightning_drop.io.output_targets import check_output

    _refused(world, tmp_path, capsys, ["perplexity", "--model", str(world / "model"), "--data",
                                       str(world / "c4.jsonl"), "--output", str(world / "results.json")],
             "already exists (pass --overwrite to replace it)")
    with pytest.raises(ValueError, match=r"pass overwrite=True to replace it"):
        check_output(world / "results.json", kind="file")


# ----------------------------------------------------------------------------------------- --tokenizer
@pytest.fixture(scope="module")
def bare_model(world, tmp_path_factory) -> Path:
    """The world's model with its tokenizer files removed."""
    dst = tmp_path_factory.mktemp("bare") / "model"
    shutil.copytree(world / "model", dst)
    for f in dst.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt", "chat_template.jinja"):
            f.unlink()
    return dst


@pytest.mark.parametrize("command", ["perplexity", "speed", "export"])
def test_a_model_without_tokenizer_names_the_tokenizer_option(world, bare_model, tmp_path, capsys, command):
    extra = {"perplexity": ["--data", str(world / "c4.jsonl")], "speed": ["--repeats", "1"],
             "export": ["--format", "gguf", "--output", str(tmp_path / "m.gguf")]}[command]
    line = _refused(world, tmp_path, capsys, [command, "--model", str(bare_model), *extra], "pass --tokenizer REF")
    assert "tokenizer reference" not in line and "tokenizer=" not in line


def test_tokenizer_option_is_honoured(world, bare_model, tmp_path, capsys):
    """Given `--tokenizer`, a model without one of its own is measured and exported."""
    ppl = tmp_path / "ppl.json"
    assert main(["perplexity", "--model", str(bare_model), "--tokenizer", "tiny-llama", "--data",
                 str(world / "c4.jsonl"), "--seq-len", "32", "--num-windows", "2", "--output", str(ppl)]) == 0
    assert json.loads(ppl.read_text())["perplexity"] > 1
    assert main(["speed", "--model", str(bare_model), "--tokenizer", "tiny-llama", "--repeats", "1",
                 "--warmup", "0", "--prompt-len", "8", "--gen-len", "4"]) == 0
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(bare_model), "--tokenizer", "tiny-llama", "--format", "gguf",
                 "--output", str(out)]) == 0
    own = tmp_path / "own.gguf"  # the same model exported with the tokenizer saved beside it
    assert main(["export", "--model", str(world / "model"), "--format", "gguf", "--output", str(own)]) == 0
    from gguf import GGUFReader

    def tokens(path: Path) -> list[bytes]:
        field = GGUFReader(path).fields["tokenizer.ggml.tokens"]
        return [bytes(field.parts[i]) for i in field.data]

    assert tokens(out) == tokens(own) and len(tokens(out)) > 256


# ----------------------------------------------------------------------------------------- network-only tasks
@pytest.mark.parametrize("task,alternative", [("hellaswag", "--preset paper"),
                                              ("arc_easy", "--data hellaswag_sample=FILE.jsonl")])
def test_a_task_only_the_hub_has_is_named_before_the_model_loads(world, tmp_path, capsys, no_model_loading, task,
                                                                 alternative):
    _refused(world, tmp_path, capsys, ["eval", "--model", str(world / "model"), "--tasks", task,
                                       "--output", str(tmp_path / "res.json")],
             f"task {task} needs the network", "Hugging Face Hub", alternative)


# ----------------------------------------------------------------------------------------- FIFOs
@pytest.fixture
def fifo(tmp_path_factory) -> Path:
    """A named pipe nobody writes to (outside the fingerprinted folders: reading it would block)."""
    path = tmp_path_factory.mktemp("pipes") / "data.jsonl"
    os.mkfifo(path)
    return path


@pytest.fixture
def no_hang():
    """A read that blocks fails the test after 60 s instead of hanging the run."""
    def timeout(*_):
        raise AssertionError("blocked reading a FIFO")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("command", ["perplexity", "drop", "eval", "speed"])
def test_a_fifo_as_input_is_refused(world, tmp_path, capsys, fifo, no_hang, no_model_loading, command):
    model = ["--model", str(world / "model")]
    argv = {"perplexity": ["perplexity", *model, "--data", str(fifo)],
            "drop": ["drop", *model, "--calibration", str(fifo), "--num", "1", "--output", str(tmp_path / "o")],
            "eval": ["eval", *model, "--data", f"hellaswag_sample={fifo}"],
            "speed": ["speed", *model, "--baseline", str(world / "model"), "--eval-results", str(fifo),
                      "--baseline-eval-results", str(world / "results.json")]}[command]
    _refused(world, tmp_path, capsys, argv, str(fifo), "is a FIFO")


@pytest.mark.parametrize("content,expect", [("{not json", "is not valid JSON"), ("[1, 2]", "not an object"),
                                            ('{"average": "high"}', "has a str as 'average'"),
                                            ('{"average": NaN}', "'average' must be a score >= 0")])
def test_speed_eval_results_are_checked_before_timing(world, tmp_path, capsys, no_model_loading, content, expect):
    results = tmp_path / "eval.json"
    results.write_text(content)
    _refused(world, tmp_path, capsys, ["speed", "--model", str(world / "model"), "--baseline", str(world / "model"),
                                       "--eval-results", str(results), "--baseline-eval-results", str(results)],
             f"--eval-results {results}", expect)


# ----------------------------------------------------------------------------------------- speed warnings
def _scripted_timings(monkeypatch, decode: dict[str, list[float]], ideal: dict[str, float]) -> None:
    """Replace the clock: each timed generation takes the scripted seconds (repeat by repeat), and profiling the
    base gives `ideal`; the models still generate, so shapes, caches and sizes are real."""
    import lightning_drop.measure.ideal_speedup as ideal_speedup
    import lightning_drop.measure.speed as speed

    real = speed.generate_lockstep
    calls = {"n": 0}

    def lockstep(models, ids, gen_len, flip=False, phase=None, clock="wall", kv_bytes=None):
        out = real(models, ids, gen_len, flip=flip, phase=phase, clock=clock, kv_bytes=kv_bytes)
        if set(out) != set(decode):  # a warm-up or one model alone: not timed
            return out
        r = calls["n"]
        calls["n"] += 1
        return {name: (0.1, decode[name][r], toks) for name, (_, _, toks) in out.items()}

    def profile_drops(base_model, drops, *args, **kwargs):
        return {name: {phase: {"ideal_speedup": x} for phase, x in ideal.items()} for name in drops}

    monkeypatch.setattr(speed, "generate_lockstep", lockstep)
    monkeypatch.setattr(ideal_speedup, "profile_drops", profile_drops)


SPEED = ["speed", "--baseline", "tiny-llama", "--ideal", "--repeats", "3", "--warmup", "0", "--prompt-len", "8",
         "--gen-len", "4"]


def test_speed_far_above_the_ideal_is_flagged(world, tmp_path, capsys, monkeypatch):
    """The busy machine's case: 16.9x decode against an ideal of 2.8x, steady over the repeats."""
    _scripted_timings(monkeypatch, {"base": [1.69, 1.69, 1.69], "dropped": [0.1, 0.1, 0.1]},
                      {"prefill": 1.0001, "decode": 2.8, "total": 2.5})
    out = tmp_path / "speed.json"
    assert main([*SPEED, "--model", str(world / "model"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["speedup"]["decode"] == pytest.approx(16.9)
    decode = [w for w in res["warnings"] if "decode speedup" in w]
    assert len(decode) == 1 and "16.90x is far above the ideal 2.80x" in decode[0], res["warnings"]
    assert not any("repeats range" in w for w in res["warnings"])  # steady: the spread is not the problem
    assert f"warning: {decode[0]}" in printed.splitlines()


def test_speed_repeats_that_disagree_are_flagged(world, tmp_path, capsys, monkeypatch):
    _scripted_timings(monkeypatch, {"base": [1.0, 1.0, 1.0], "dropped": [0.9, 0.5, 0.8]},
                      {"prefill": 1.0001, "decode": 2.8, "total": 2.5})
    out = tmp_path / "speed.json"
    assert main([*SPEED, "--model", str(world / "model"), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    spread = [w for w in res["warnings"] if "decode speedups of the 3 repeats" in w]
    assert len(spread) == 1 and "from 1.11x to 2.00x" in spread[0] and "noise" in spread[0], res["warnings"]
    assert not any("far above" in w for w in res["warnings"])
    assert f"warning: {spread[0]}" in capsys.readouterr().out.splitlines()


def test_speed_within_the_ideal_and_steady_has_no_warning(world, tmp_path, capsys, monkeypatch):
    _scripted_timings(monkeypatch, {"base": [1.0, 1.0, 1.0], "dropped": [0.5, 0.52, 0.48]},
                      {"prefill": 1.0001, "decode": 2.8, "total": 2.5})
    out = tmp_path / "speed.json"
    assert main([*SPEED, "--model", str(world / "model"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["warnings"] == []
    assert "warning:" not in capsys.readouterr().out


def test_speedup_warnings_thresholds():
    from lightning_drop.measure.ideal_speedup import speedup_warnings

    def vs(decode_runs, ideal=None):
        runs = {"prefill": [1.0, 1.0], "decode": decode_runs, "total": [1.0, 1.0]}
        v = {"speedup_runs": runs, "speedup": {k: sorted(r)[len(r) // 2] for k, r in runs.items()}}
        if ideal is not None:
            v["ideal_speedup"] = {"prefill": 1.0, "decode": ideal, "total": 1.0}
        return v

    assert speedup_warnings(vs([1.2, 1.2], ideal=1.5), "p") == []
    assert speedup_warnings(vs([1.9, 1.9], ideal=1.5), "p")[0].startswith("p: decode speedup 1.90x is far above")
    assert "slower than the base" in speedup_warnings(vs([0.7, 0.7]), "p")[0]  # no ideal needed
    assert "repeats range" in speedup_warnings(vs([1.0, 1.4]), "p")[0]


# ----------------------------------------------------------------------------------------- eval's terminal
def test_eval_keeps_dependency_output_in_a_log(world, tmp_path, capfd):
    """lm-eval's progress bars and warnings go to the log whose path is printed once; `git`'s complaint about a
    working directory that is no repository is not printed at all."""
    data = _jsonl(tmp_path / "hs.jsonl", [GOOD] * 3)
    res = tmp_path / "res.json"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` complains here
    try:
        code = main(["eval", "--model", str(world / "model"), "--data", f"hellaswag_sample={data}", "--limit", "2",
                     "--output", str(res)])
    finally:
        os.chdir(cwd)
    out, err = capfd.readouterr()
    assert code == 0, err
    assert json.loads(res.read_text())["n_samples"]["hellaswag_sample"] == 2
    assert "hellaswag_sample" in out and "average" in out
    logs = [line.rsplit(" ", 1)[-1] for line in err.splitlines() if line.startswith("lm-eval's progress and messages")]
    assert len(logs) == 1, err
    assert [line for line in err.splitlines() if line.strip()] == [f"lm-eval's progress and messages: {logs[0]}"]
    log = Path(logs[0]).read_text()
    assert "Generating test split" in log and "not a git repository" not in log  # datasets' output; git quiet
    Path(logs[0]).unlink()
