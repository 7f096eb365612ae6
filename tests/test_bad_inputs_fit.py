"""`lightning-drop fit` mistakes through the command line: one `error:` line that names the file, the key and
what was expected, exit 2, checked before training, nothing on disk changed; and a shipped config run twice.

Every case runs the real entry point (`lightning_drop.cli.main`) in process, as tests/test_bad_inputs.py does
(its `world` of inputs and its checks are reused).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from test_bad_inputs import FIT, _fingerprint
from test_configs import REPO, shrink

from lightning_drop.cli import main
from lightning_drop.errors import UserError
from lightning_drop.lightning.cli import run_lightning_cli


def _yaml(tmp: Path, text: str, name: str = "bad.yaml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _fit(w: Path, *extra: str) -> list[str]:
    return [*FIT, "--data.source", str(w / "c4.jsonl"), *extra]


MODEL = "model:\n  init_args:\n    model: tiny-llama\n"
CALLBACKS = ("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
             "    - class_path: lightning_drop.callbacks.LayerDrop\n      init_args:\n")
# (id, argv from (world, tmp), substrings the error line must contain)
CONFIG_CASES: list[tuple[str, Callable[[Path, Path], list[str]], tuple[str, ...]]] = [
    ("unknown-key", lambda w, t: ["fit", "--config", _yaml(t, MODEL + "    lrr: 1.0e-3\n")],
     ("bad.yaml: model.init_args.lrr: unknown option of DropModule", "did you mean 'lr'")),
    ("unknown-key-without-init-args", lambda w, t: ["fit", "--config", _yaml(t, "model:\n  lrr: 1.0e-3\n")],
     ("bad.yaml: model.lrr: unknown option of DropModule",)),
    ("wrong-type", lambda w, t: ["fit", "--config", _yaml(t, MODEL + "    lr: fast\n")],
     ("bad.yaml: model.init_args.lr: expected float, got fast",)),
    ("not-a-choice", lambda w, t: ["fit", "--config", _yaml(t, MODEL + "    optimizer: lion\n")],
     ("bad.yaml: model.init_args.optimizer: expected one of 'adamw', 'adam', 'sgd', got lion",)),
    ("unknown-top-level-key", lambda w, t: ["fit", "--config", _yaml(t, "modle:\n  model: tiny-llama\n")],
     ("bad.yaml: modle: unknown option", "did you mean 'model'")),
    ("unknown-trainer-key", lambda w, t: ["fit", "--config", _yaml(t, "trainer:\n  max_step: 3\n")],
     ("bad.yaml: trainer.max_step: unknown option", "did you mean 'max_steps'")),
    ("callback-unknown-key", lambda w, t: ["fit", "--config", _yaml(t, CALLBACKS + "        nmu: 3\n")],
     ("bad.yaml: trainer.callbacks[1].init_args.nmu: unknown option of LayerDrop", "did you mean 'num'")),
    ("callback-wrong-type", lambda w, t: ["fit", "--config", _yaml(t, CALLBACKS + "        num: three\n")],
     ("bad.yaml: trainer.callbacks[1].init_args.num: expected int or null, got three",)),
    ("misspelt-class-path", lambda w, t: ["fit", "--config", _yaml(
        t, "trainer:\n  callbacks:\n    - class_path: lightning_drop.callbacks.LayerDorp\n")],
     ("bad.yaml: trainer.callbacks[0].class_path: cannot use lightning_drop.callbacks.LayerDorp",
      "did you mean lightning_drop.callbacks.LayerDrop?")),
    ("yaml-syntax", lambda w, t: ["fit", "--config", _yaml(t, MODEL + "    betas: [0.9, 0.95\n")],
     ("bad.yaml, line 5, column 1: YAML syntax error", "flow sequence at line 4")),
    ("yaml-tab", lambda w, t: ["fit", "--config", _yaml(t, "model:\n\tinit_args: {}\n")],
     ("bad.yaml, line 2, column 1: YAML syntax error",)),
    ("yaml-not-a-mapping", lambda w, t: ["fit", "--config", _yaml(t, "- model\n- data\n")],
     ("bad.yaml: expected a mapping of options", "not a list")),
    ("missing-config", lambda w, t: ["fit", "--config", str(t / "nope.yaml")], ("nope.yaml: no such file",)),
    ("config-is-a-folder", lambda w, t: ["fit", "--config", str(w / "user")], ("user is not a file",)),
    # the file's value is fine; the command line's overrides it and is the one to blame
    ("override-wrong-type", lambda w, t: ["fit", "--config", _yaml(t, MODEL + "    lr: 1.0e-3\n"), "--model.lr",
                                          "fast"], ("--model.lr: expected float, got fast",)),
    ("override-unknown-key", lambda w, t: [*FIT, "--model.init_args.lrr", "3"],
     ("--model.init_args.lrr: unknown option of DropModule",)),
    ("init-config-sizes", lambda w, t: _fit(w, "--model.init_config.hidden_size", "30"),
     ("init_config {'hidden_size': 30}", "not a multiple of the number of attention heads")),
    ("save-dir-unknown-placeholder", lambda w, t: _fit(w, "--model.save_dir", "{logdir}/out"),
     ("unknown placeholder {logdir}", "{log_dir}")),
    ("save-dir-not-empty", lambda w, t: _fit(w, "--model.save_dir", str(w / "user")),
     ("DropModule save_dir", "user already exists and is not empty", "model.init_args.overwrite: true")),
    ("save-dir-is-the-input", lambda w, t: [*FIT[:1], "--model.model", str(w / "model"), *FIT[3:], "--data.source",
                                            str(w / "c4.jsonl"), "--model.save_dir", str(w / "model"),
                                            "--model.overwrite", "true"], ("is the input",)),
    ("save-dir-below-a-file", lambda w, t: _fit(w, "--model.save_dir", str(w / "results.json" / "out")),
     ("not a directory",)),
]


@pytest.mark.parametrize("name,argv,expect", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_fit_mistake_is_one_line(world, tmp_path, capsys, monkeypatch, name, argv, expect):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # anything the run would write lands where the fingerprint sees it
    _fit_fails(world, tmp_path, capsys, monkeypatch, argv(world, tmp_path), expect)


def _fit_fails(world: Path, tmp_path: Path, capsys, monkeypatch, args: list[str], expect: tuple[str, ...]) -> str:
    """Exit 2, one error line (after the one-line usage) holding every `expect`, no jsonargparse report, no
    traceback, no training step, nothing changed on disk; returns the error line."""
    from lightning_drop.lightning.module import DropModule

    def step(*args, **kwargs):
        raise AssertionError("training started before the mistake was found")

    monkeypatch.setattr(DropModule, "training_step", step)
    capsys.readouterr()
    before_world, before_tmp = _fingerprint(world), _fingerprint(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert code == 2, err
    assert "Traceback" not in err and "Given value" not in err and "<unicode string>" not in err, err
    assert len(errors) == 1 and errors[0].startswith("lightning-drop fit: error: "), err
    assert [line for line in err.splitlines() if "usage:" in line or "[--" in line] == [
        "usage: lightning-drop fit [-h] [-c CONFIG] [--print_config] ..."], err  # not the 50-line usage
    for part in expect:
        assert part in errors[0], errors[0]
    assert _fingerprint(world) == before_world
    assert _fingerprint(tmp_path) == before_tmp
    return errors[0]


@pytest.fixture(scope="module")
def dropped_ckpt(tmp_path_factory, world) -> Path:  # noqa: F811
    """A Lightning checkpoint of a tiny-llama fit that dropped one attention layer."""
    root = tmp_path_factory.mktemp("ckpt")
    callbacks = ["--trainer.callbacks+=lightning_drop.callbacks.LayerDrop", "--trainer.callbacks.num", "1",
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.dirpath", str(root), "--trainer.default_root_dir", str(root)]  # config.yaml too
    checkpointing = FIT.index("--trainer.enable_checkpointing")  # FIT turns it off: this fit writes one
    cli = run_lightning_cli([*FIT[:checkpointing], *FIT[checkpointing + 2:], "--data.source", str(world / "c4.jsonl"),
                             *callbacks])
    assert cli.model.drop_plan.attn and cli.trainer.global_step == 1
    (path,) = root.glob("*.ckpt")
    return path


def _retarget(ckpt: Path, tmp: Path) -> Path:
    """Make `ckpt` say it was trained from a folder that holds a tiny Qwen3 model (it was a tiny Llama)."""
    import lightning_drop as ld
    from lightning_drop.io.tiny_models import tiny_model

    model, tok = tiny_model("qwen3")
    ld.save_dropped(model, tmp / "qwen3", tok)
    _edit_hparams(ckpt, model=str(tmp / "qwen3"))
    return tmp / "qwen3"


def _edit_hparams(ckpt: Path, **hparams) -> Path:
    data = torch.load(ckpt, weights_only=True)
    data["hyper_parameters"].update(hparams)
    torch.save(data, ckpt)
    return ckpt


def _other_ckpt(tmp: Path) -> Path:
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 1}, tmp / "plain.ckpt")
    return tmp / "plain.ckpt"


RESUME_CASES: list[tuple[str, Callable[[Path, Path, Path], list[str]], tuple[str, ...]]] = [
    ("other-family", lambda w, t, c: [*FIT[:1], "--model.model", "tiny-qwen3", *FIT[3:], "--data.source",
                                      str(w / "c4.jsonl"), "--ckpt_path", str(c)],
     ("was trained with model: tiny-llama, not the configured model: tiny-qwen3", "without --ckpt_path")),
    ("other-size", lambda w, t, c: _fit(w, "--model.init_config.num_hidden_layers", "6", "--ckpt_path", str(c)),
     ("was trained with model: tiny-llama, init_config: None, not the configured model: tiny-llama, "
      "init_config: {'num_hidden_layers': 6}",)),
    # the arguments agree, but the folder they name now holds another model than the one trained
    ("model-folder-changed", lambda w, t, c: [*FIT[:1], "--model.model", str(_retarget(c, t)), *FIT[3:],
                                              "--data.source", str(w / "c4.jsonl"), "--ckpt_path", str(c)],
     ("run.ckpt holds another model than the configured one (model_type llama vs qwen3",)),
    ("saved-hyperparameters-do-not-fit", lambda w, t, c: _fit(w, "--ckpt_path", str(_edit_hparams(c, bogus=1))),
     ("run.ckpt: the model hyperparameters saved in it do not fit: bogus: unknown option of DropModule",)),
    ("not-a-dropmodule-checkpoint", lambda w, t, c: _fit(w, "--ckpt_path", str(_other_ckpt(t))),
     ("plain.ckpt was not written by DropModule",)),
]


@pytest.mark.parametrize("name,argv,expect", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_of_another_model_is_refused(world, dropped_ckpt, tmp_path, capsys, monkeypatch,  # noqa: F811
                                            name, argv, expect):
    """Lightning would rebuild the checkpoint's model and train it instead of the configured one."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "run.ckpt"
    shutil.copyfile(dropped_ckpt, ckpt)  # under the fingerprint
    _fit_fails(world, tmp_path, capsys, monkeypatch, argv(world, tmp_path, ckpt), expect)


def test_resume_of_another_model_through_the_trainer(world, dropped_ckpt, tmp_path):  # noqa: F811
    """`Trainer.fit(ckpt_path=...)` (no command line): refused when the checkpoint is read, before its weights
    load into the configured model."""
    import lightning.pytorch as pl

    from lightning_drop.lightning.datamodule import TextDataModule
    from lightning_drop.lightning.module import DropModule

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=str(tmp_path))
    data = TextDataModule(tokenizer="tiny-llama", source=str(world / "c4.jsonl"), seq_len=32, batch_size=2)
    with pytest.raises(UserError, match="the checkpoint to resume holds another model .*model_type llama vs qwen3"):
        trainer.fit(DropModule("tiny-qwen3"), datamodule=data, ckpt_path=str(dropped_ckpt))


@pytest.mark.timeout(900)
def test_shipped_config_runs_twice(world, tmp_path, c4_path, capsys, monkeypatch):  # noqa: F811
    """configs/drop_and_recover.yaml (shrunk) run twice from the same folder: the second run saves into its own
    run folder and leaves the first's intact; naming the first's model as save_dir is refused before the fit,
    and replaces it with `overwrite: true`."""
    monkeypatch.chdir(tmp_path)
    config = shrink(yaml.safe_load((REPO / "configs" / "drop_and_recover.yaml").read_text()), tmp_path, c4_path)
    assert config["model"]["init_args"]["save_dir"].startswith("{log_dir}/")  # as shipped
    path = tmp_path / "drop_and_recover.yaml"
    path.write_text(yaml.safe_dump(config))
    logs, name = tmp_path / "logs" / "drop_and_recover", Path(config["model"]["init_args"]["save_dir"]).name
    assert main(["fit", "--config", str(path)]) == 0
    first = logs / "version_0" / name
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    before = _fingerprint(logs / "version_0")

    assert main(["fit", "--config", str(path)]) == 0
    assert (logs / "version_1" / name / "config.json").is_file()
    assert _fingerprint(logs / "version_0") == before

    _fit_fails(world, tmp_path, capsys, monkeypatch, ["fit", "--config", str(path), "--model.init_args.save_dir",
                                                      str(first)],
               (f"DropModule save_dir {first} already exists and is not empty", "overwrite: true"))
    monkeypatch.undo()
    (first / "mine.txt").write_text("replaced with the model")
    assert main(["fit", "--config", str(path), "--model.init_args.save_dir", str(first),
                 "--model.init_args.overwrite", "true"]) == 0
    assert (first / "config.json").is_file() and not (first / "mine.txt").exists()
