"""`lightning-drop drop`: calibrate, score, select, drop, save checkpoint + report (one-shot or iterative).

Imports nothing heavy at module level: the command line reads `drop_main`'s signature for `--help`.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..io.atomic_io import WriteFailed
from ..errors import UserError, param
from ..core.options import CalibrationConfig, Metric, Schedule, Target
from .drop_request import (DropJob, SaveDtype, ScoreDtype, check_device, check_request, mixer_keep, save_dtype_of,
                           source_dtype)

if TYPE_CHECKING:
    import torch

    from ..scoring.schedule import DropResult


def run_drop(job: DropJob, progress: bool = True) -> dict[str, Any]:
    """Run `job`; returns the report (also written to OUTPUT/importance.json with a PNG beside it)."""
    if job.stream:
        return run_drop_streamed(job, progress)
    from ..io.dropped_checkpoint import save_dropped
    from ..io.model_loading import load_model
    from ..core.modeling_dropped import dropped_layers
    from ..scoring.loss_metric import require_lm_head
    from ..scoring.metrics import resolve_metric
    from ..scoring.schedule import drop_by_importance
    from ..io.text_data import calibration_windows

    model, tok = load_model(job.model, dtype=job.dtype, tokenizer=job.tokenizer)  # checks the tokenizer
    model.to(check_device(job.device, "--device"))
    from ..core.architectures import get_spec

    spec = get_spec(model)
    kinds = spec.mixer_kinds(model)
    keep = mixer_keep(job, kinds, dropped_layers(model)[0], hybrid=spec.hybrid)
    num = check_request(job, model.config.num_hidden_layers, *dropped_layers(model), keep=keep)
    if resolve_metric(job.metric).model is not None:
        require_lm_head(model, f"--metric {job.metric}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    windows = calibration_windows(tok, job.calibration, max_positions=max_pos)
    batches = [windows[i:i + job.batch_size] for i in range(0, len(windows), job.batch_size)]
    result = drop_by_importance(model, batches, job.target, num, metric=job.metric, schedule=job.schedule,
                                step=job.step, keep=keep, seed=job.calibration.seed, progress=progress,
                                span=job.span)
    report = build_report(job, result, windows, kinds)
    if job.output is not None:
        if not _holds_source_weights(job):
            attn, mlp = dropped_layers(model)
            del model  # one model in memory at a time
            model = _reload_dropped(job, attn, mlp)
        with _result_kept(report):
            save_dropped(model.to("cpu", save_dtype_of(job)), job.output, tok, max_shard_size=job.max_shard_size,
                         extra=lambda tmp: write_report(tmp, report, result), overwrite=True)
    return report


@contextmanager
def _result_kept(report: dict[str, Any]) -> Iterator[None]:
    """When the checkpoint cannot be stored (disk full), the drop lists that took the scoring to find are
    still printed before the one-line error."""
    try:
        yield
    except WriteFailed:
        print(f"{summary(report)}; not written")
        raise


def summary(report: dict[str, Any]) -> str:
    cost = report["cost"]
    return (f"dropped attention {report['drop_attn_list']} MLP {report['drop_mlp_list']} "
            f"({report['metric']}, {report['schedule']}; selection cost {cost['forward_passes']:g} forward passes, "
            + (f"{cost['layer_loads']} layer loads, " if "layer_loads" in cost else "")
            + f"{cost['seconds']:.1f} s)")


def _holds_source_weights(job: DropJob) -> bool:
    """Whether the model scored in `--dtype` still holds the source's weights exactly (same dtype, or float32
    for a 16-bit source); if not, scoring rounded them and the checkpoint must not be written from it."""
    import torch

    scored, source = getattr(torch, job.dtype), source_dtype(job.model)
    return scored == source or scored == torch.float32 and source in (torch.bfloat16, torch.float16)


def _reload_dropped(job: DropJob, attn: Sequence[int], mlp: Sequence[int]) -> Any:
    """The source model loaded again in the save dtype with the same drops, so the saved tensors are the
    source's bit for bit (or cast once, as `--save-dtype` asks)."""
    from ..io.model_loading import load_model
    from ..core.modeling_dropped import apply_drop, dropped_layers

    model, _ = load_model(job.model, dtype=save_dtype_of(job), tokenizer=job.tokenizer)
    had_attn, had_mlp = dropped_layers(model)
    apply_drop(model, attn=[i for i in attn if i not in had_attn], mlp=[i for i in mlp if i not in had_mlp])
    return model



def run_drop_streamed(job: DropJob, progress: bool = True) -> dict[str, Any]:
    """`run_drop` for models larger than memory: layer-streamed scoring, shard-by-shard checkpoint.

    Same selection, report and checkpoint as the in-memory path; the model is never built (see
    `lightning_drop.scoring.streaming`). The model must be a local safetensors checkpoint (or `smollm2-135m`).
    """
    from ..io.dropped_checkpoint import read_config
    from ..scoring.importance import ImportanceScores
    from ..io.model_loading import check_tokenizer, load_tokenizer, resolve
    from ..scoring.schedule import drop_rounds
    from ..scoring.schedule import DropResult
    from ..scoring.streamed_writer import write_dropped_streaming
    from ..scoring.streaming import stream_importance
    from ..scoring.selection import target_kinds
    from ..io.text_data import calibration_windows

    path = Path(resolve(job.model))
    if not (path / "config.json").is_file():
        raise UserError(f"--stream needs a local checkpoint directory with config.json and safetensors files, "
                         f"got '{job.model}'")
    config = read_config(path)
    from ..core.modeling_dropped import normalize_drop_list
    from ..scoring.checkpoint_meta import load_config

    n_layers = int(load_config(path).num_hidden_layers)  # some configs derive it (Nemotron-H: from its pattern)

    base_attn = normalize_drop_list(config.get("drop_attn_list"), n_layers)
    base_mlp = normalize_drop_list(config.get("drop_mlp_list"), n_layers)
    num = check_request(job, n_layers, base_attn, base_mlp)
    if job.tokenizer:
        tok = load_tokenizer(job.tokenizer)
    else:
        try:
            tok = load_tokenizer(str(path))
        except (OSError, ValueError):
            raise UserError(f"no tokenizer found with {job.model}: pass {param('tokenizer', '...', 'REF')} "
                            "(a path or catalogue name)") from None
    if isinstance(config.get("vocab_size"), int):
        check_tokenizer(tok, config["vocab_size"], job.model, job.tokenizer)
    windows = calibration_windows(tok, job.calibration, max_positions=config.get("max_position_embeddings"))

    def score(attn: list[int], mlp: list[int], index: int) -> ImportanceScores:
        return stream_importance(path, windows, metric=job.metric, batch_size=job.batch_size, device=job.device,
                                 offload_dir=job.offload_dir, dtype=job.dtype, drop_attn=attn, drop_mlp=mlp,
                                 seed=job.calibration.seed + index, progress=progress,
                                 kinds=target_kinds(job.target))

    result, start = DropResult([], []), time.perf_counter()
    attn, mlp = list(base_attn), list(base_mlp)
    for rnd in drop_rounds(score, job.target, num, n_layers, job.schedule, job.step, list(job.keep), base_attn,
                           base_mlp):
        result.record(rnd.scores, rnd.attn, rnd.mlp)
        attn, mlp = sorted(set(attn) | set(rnd.attn)), sorted(set(mlp) | set(rnd.mlp))
    result.attn, result.mlp, result.seconds = attn, mlp, time.perf_counter() - start
    report = build_report(job, result, windows)
    report["streamed"] = True
    # every round reads each decoder layer once (the loss metric runs all its candidates in that one sweep)
    report["cost"]["layer_loads"] = sum(r.extra.get("layer_loads", 0) for r in result.rounds)
    if job.output is not None:
        with _result_kept(report):
            write_dropped_streaming(path, job.output, result.attn, result.mlp, tokenizer=tok,
                                    dtype=save_dtype_of(job), max_shard_size=job.max_shard_size,
                                    extra=lambda tmp: write_report(tmp, report, result))
    return report


def build_report(job: DropJob, result: DropResult, windows: torch.Tensor,
                 kinds: Sequence[str] = ()) -> dict[str, Any]:
    first = result.rounds[0]
    # the windows per forward pass were the job's --batch-size, not the calibration settings' study default
    calib = {**job.calibration.to_dict(), "batch_size": job.batch_size, "num_samples": int(windows.shape[0]),
             "seq_len": int(windows.shape[1]), "num_tokens": int(windows.numel())}
    report: dict[str, Any] = {
        "model": job.model, "metric": job.metric, "target": job.target, "schedule": job.schedule,
        **({"span": job.span} if job.span is not None else {}),
        "num": len(result.attn) + len(result.mlp) if job.target != "block" else len(result.attn),
        "attn": first.attn, "mlp": first.mlp, "block": first.block,
        "drop_attn_list": result.attn, "drop_mlp_list": result.mlp, "keep": list(job.keep),
        "calibration": calib, "cost": result.cost(),
    }
    if job.mixers:
        report["mixers"] = list(job.mixers)
    if set(kinds) - {"full_attention"}:  # hybrids and sliding windows: each layer's token-mixer kind
        from ..scoring.importance import importance_by_kind

        report["mixer_kinds"] = list(kinds)
        report["importance_by_kind"] = importance_by_kind(first, result.attn)
    from ..scoring.schedule import resolve_schedule

    if resolve_schedule(job.schedule).rescores:
        report["rounds"] = result.to_dict()["rounds"]
    return report


def write_report(directory: str | os.PathLike, report: dict[str, Any], result: DropResult) -> None:
    """importance.json and importance.png into `directory`."""
    from ..measure.plots import plot_importance

    directory = Path(directory)
    (directory / "importance.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_importance(result.rounds[0], directory / "importance.png", result.attn, result.mlp,
                    title=f"{report['model']}: {report['metric']} importance, dropped {report['target']} "
                          f"({report['schedule']}) in red")


def drop_main(model: str, output: str, target: Target = "attn", num: int | None = None, ratio: float | None = None,
              metric: Metric = "cosine", schedule: Schedule = "one-shot", step: int = 1,
              keep: list[int] | None = None, mixers: list[str] | None = None,
              calibration: str = CalibrationConfig.source,
              text_field: str = CalibrationConfig.text_field, num_samples: int = CalibrationConfig.num_samples,
              seq_len: int = CalibrationConfig.seq_len, shuffle: bool = False, seed: int = CalibrationConfig.seed,
              batch_size: int = 4, dtype: ScoreDtype = "float32", save_dtype: SaveDtype = "auto",
              tokenizer: str | None = None, stream: bool = False, device: str = "cpu",
              offload_dir: str | None = None, max_shard_size: str = "2GB", overwrite: bool = False,
              span: int | None = None) -> dict[str, Any]:
    """Score every block, attention and MLP sublayer (S = 1 - cos(X, Y) by default) on calibration text, drop
    the lowest-scoring modules, and write the dropped checkpoint with importance.json and importance.png.

    Args:
        model: local checkpoint dir, .gguf file, hub id, or catalogue name (smollm2-135m, tiny-llama, ...)
        output: directory for the dropped checkpoint and the report
        target: what to drop: whole blocks, attention or MLP sublayers, or attention+MLP ranked jointly
        num: number of modules to drop (joint: attention and MLP counted together)
        ratio: fraction of modules to drop, in (0, 1)
        metric: importance metric (default: the paper's)
        schedule: one-shot: score once; iterative: re-score after every --step drops
        step: modules dropped per round with --schedule iterative
        keep: comma-separated layer indices never to drop
        mixers: --target attn: drop only token mixers of these kinds (comma-separated: full_attention,
            sliding_attention, linear_attention, mamba, conv); the others are kept
        calibration: calibration text: .txt file or dir, .json/.jsonl, .parquet, a HF dataset
            name[:config][@split], or c4-sample / wiki-sample / tinystories-sample (offline)
        text_field: text field of json/jsonl/parquet/HF sources
        num_samples: calibration windows (paper: 256)
        seq_len: tokens per window (paper: 2048; capped by the model's context)
        shuffle: sample windows at random instead of the first N
        seed: seed for --shuffle and the random metric
        batch_size: windows per forward pass
        dtype: weights dtype while scoring (scores accumulate in float64 regardless)
        save_dtype: dtype of the written checkpoint (auto: the source checkpoint's own dtype)
        tokenizer: tokenizer (directory, hub id or catalogue name) when the model dir has none
        stream: models larger than memory: score one decoder layer at a time from the safetensors shards and
            write the dropped checkpoint shard by shard (needs a local checkpoint dir)
        device: device the scoring runs on (cpu, cuda, cuda:1); with --stream, each layer in turn
        offload_dir: --stream: keep the calibration hidden states memory-mapped in this directory, not in RAM
        max_shard_size: largest output shard (e.g. 2GB, 500MB)
        overwrite: replace a non-empty --output directory
        span: block target, angular metric: drop the SPAN consecutive blocks whose first input and last output
            are closest (Gromov et al.); --num may be left out

    Returns the report that OUTPUT/importance.json holds.
    """
    job = DropJob(model=model, target=target, num=num, ratio=ratio, metric=metric, schedule=schedule, step=step,
                  keep=list(keep or []), mixers=list(mixers or []), batch_size=batch_size, dtype=dtype,
                  save_dtype=save_dtype,
                  tokenizer=tokenizer, output=output, overwrite=overwrite, stream=stream, device=device,
                  offload_dir=offload_dir, max_shard_size=max_shard_size, span=span,
                  calibration=CalibrationConfig(source=calibration, text_field=text_field, num_samples=num_samples,
                                                seq_len=seq_len, shuffle=shuffle, seed=seed))
    report = run_drop(job)
    print(f"{summary(report)}; wrote {output} (importance.json, importance.png)")
    for line in kind_lines(report.get("importance_by_kind") or {}):
        print(line)
    return report


def kind_lines(by_kind: dict[str, dict[str, Any]]) -> list[str]:
    """One line per token-mixer kind of a hybrid (`importance_by_kind`): its layers, mean and lowest score, and
    the layers of that kind the drop chose."""
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    return [f"  {kind}: layers {entry['layers']}, mean {f(entry['mean'])}, lowest {f(entry['min'])}, dropped "
            f"{entry['dropped']}" for kind, entry in by_kind.items()]
