"""Every shipped LightningCLI config runs (as litgpt's test_config_hub does: the real file, shrunk).

The fast tests swap the model for a tiny random-init one of the same family (enough layers for the
config's drop), shrink data and steps and send every output to tmp; the slow test runs the real model.
configs/study/ and configs/vision_digits.yaml are tested by their owners.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_drop.lightning.cli import run_lightning_cli

REPO = Path(__file__).resolve().parents[1]
# configs/study/, configs/vision_digits.yaml and the configs/sharded/ overlays are tested by their owners' test files.
OTHERS = {"study", "vision_digits.yaml", "sharded"}
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                 if not OTHERS & set(p.relative_to(REPO / "configs").parts))


def shrink(config: dict, tmp_path: Path, c4_path: Path, tiny: bool = True) -> dict:
    model = config["model"]["init_args"]
    if tiny and not str(model.get("model", "")).startswith("tiny-") and model.get("model") != "tiny-llama":
        if "model" in model and model.get("init_config") is None:
            model["model"] = "tiny-llama"
            model["init_config"] = {"num_hidden_layers": 10}  # room to drop 8 attention layers
            config["data"]["init_args"]["tokenizer"] = "tiny-llama"
    if tiny and str(model.get("model", "")).startswith("tiny-") and model.get("init_config"):
        model["init_config"] = {**model["init_config"], "hidden_size": 32, "intermediate_size": 64}
    if model.get("save_dir") and "{log_dir}" not in model["save_dir"]:  # {log_dir} is under tmp already
        model["save_dir"] = str(tmp_path / "saved")
    data = config["data"]["init_args"]
    if "source" in data:
        data.update(source=str(c4_path), seq_len=32, batch_size=2, limit_documents=20, calibration_samples=2)
    trainer = config.setdefault("trainer", {})
    trainer.update(max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                   accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path))
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})["save_dir"] = str(tmp_path / "logs")
    for cb in trainer.get("callbacks") or []:
        args = cb.setdefault("init_args", {})
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "ImportanceTracker":
            args["every_n_steps"] = 2
        if name == "LayerDrop" and args.get("every_n_steps"):
            args.update(every_n_steps=1, num=3)  # 3 rounds: fit start, after steps 1 and 2
        for key in ("output", "output_dir"):
            if args.get(key):
                args[key] = str(tmp_path / Path(args[key]).name)
    return config


def run_config(path: Path, tmp_path: Path, c4_path: Path, tiny: bool = True):
    config = shrink(yaml.safe_load(path.read_text()), tmp_path, c4_path, tiny)
    small = tmp_path / path.name
    small.write_text(yaml.safe_dump(config))
    return run_lightning_cli(["fit", "--config", str(small)])


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_runs(path, tmp_path, c4_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_config(path, tmp_path, c4_path)
    trainer = cli.trainer
    assert trainer.global_step == 4
    names = {type(cb).__name__: cb for cb in trainer.callbacks}
    if "LayerDrop" in names:
        assert names["LayerDrop"].finished
        assert any(cli.model.drop_plan())
    if "Distillation" in names:  # recovered from a copy of the undropped model, from the first step
        from lightning_drop.core.modeling_dropped import dropped_layers

        distill = names["Distillation"]
        assert distill.started_at == 0 and distill.merged and dropped_layers(distill.teacher) == ([], [])
    if "ImportanceTracker" in names:
        assert [e["step"] for e in names["ImportanceTracker"].history][:3] == [0, 2, 4]
    if cli.model.hparams.get("save_dir"):  # the shipped configs save into the run's own log folder
        assert Path(cli.model.save_path).parent == Path(trainer.log_dir)
        assert (Path(cli.model.save_path) / "config.json").is_file()


def test_print_config_and_cli_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(REPO / "configs" / "drop_and_recover.yaml"),
                           "--model.lr", "1e-3", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lr"] == 1e-3
    assert printed["trainer"]["callbacks"][0]["class_path"] == "lightning_drop.callbacks.LayerDrop"
    assert printed["trainer"]["callbacks"][0]["init_args"]["num"] == 8


def test_unknown_subcommand():
    with pytest.raises(SystemExit, match="unknown subcommand"):
        run_lightning_cli(["train"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["drop_and_recover.yaml", "iterative_vs_oneshot/iterative.yaml"])
def test_real_model_configs(name, tmp_path, c4_path, monkeypatch):
    """SmolLM2-135M as shipped, a few steps."""
    monkeypatch.chdir(tmp_path)
    cli = run_config(REPO / "configs" / name, tmp_path, c4_path, tiny=False)
    attn, mlp = cli.model.drop_plan()
    # drop_and_recover drops 8 at fit start; the shrunk iterative config drops 3 (see `shrink`)
    assert len(attn) == (3 if "iterative" in name else 8) and mlp == []
    assert cli.model.hf_model.config.num_hidden_layers == 30


def test_cli_resume_knows_the_checkpoint_at_setup(tmp_path, c4_path, monkeypatch, scoring_passes):
    """`fit --ckpt_path` reaches `Callback.setup` (as trainer.ckpt_path): the fit-start drop is not scored again."""
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_drop.lightning.module.DropModule", "init_args": {"model": "tiny-llama"}},
        "data": {"class_path": "lightning_drop.lightning.datamodule.TextDataModule",
                 "init_args": {"tokenizer": "tiny-llama", "source": str(c4_path), "seq_len": 32, "batch_size": 2,
                               "limit_documents": 20, "calibration_samples": 2}},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "logger": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning_drop.callbacks.LayerDrop",
                                   "init_args": {"target": "attn", "num": 1, "calibration_batch_size": 2}},
                                  {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2}}]},
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    first = run_lightning_cli(["fit", "--config", str(path)])
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.is_file()
    before = scoring_passes()
    assert before > 0  # the first fit scored its drop
    again = run_lightning_cli(["fit", "--config", str(path), "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)])
    assert again.trainer.global_step == 3 and again.trainer.ckpt_path == str(ckpt)
    assert again.model.drop_plan() == first.model.drop_plan() and len(first.model.drop_plan()[0]) == 1
    assert scoring_passes() == before  # not scored again on resume


def test_sharded_overlay_composes_with_drop_and_recover(capsys):
    """The FSDP2 overlay the config's comment names keeps the recipe (drop, LoRA merge, save) and sets the strategy."""
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(REPO / "configs" / "drop_and_recover.yaml"),
                           "--config", str(REPO / "configs" / "sharded" / "recover_fsdp2.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    lora = [cb for cb in printed["trainer"]["callbacks"] if cb["class_path"].endswith("LoRARecovery")]
    assert lora[0]["init_args"]["merge"] is True and printed["model"]["init_args"]["save_dir"]
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_drop.lightning.distributed.FSDP2Strategy"
    assert strategy["init_args"]["tensor_parallel_size"] == 1 and printed["trainer"]["devices"] == 2
