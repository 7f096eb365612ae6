"""What `lightning-drop drop` is asked to do, and every check of that request that can run before (or right after)
the model is loaded: counts, keep, span, token-mixer kinds, device, output and dtypes.

Imports nothing heavy at module level: the command line reads `drop_main`'s signature for `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence, get_args

from ..io.output_targets import check_output
from ..errors import UserError
from ..core.options import TARGETS, CalibrationConfig

if TYPE_CHECKING:
    import torch

#: "auto" writes the dropped checkpoint in the source checkpoint's own dtype (scoring may run in float32:
#: a bf16 model must not come back twice its size).
SaveDtype = Literal["auto", "float32", "bfloat16", "float16"]
SAVE_DTYPES: tuple[str, ...] = get_args(SaveDtype)
ScoreDtype = Literal["float32", "bfloat16", "float16"]


def source_dtype(ref: str) -> torch.dtype:
    """The dtype a reference's weights are stored in, which a dropped checkpoint keeps by default.

    A local checkpoint's config.json says it (else its first floating safetensors tensor does); tiny models
    and GGUF conversions are float32, and so is anything unknown (what `load_model` loads by default).
    """
    import torch

    from ..io.dropped_checkpoint import read_config
    from ..io.model_loading import resolve, tiny_family
    from ..io.safetensors_io import read_safetensors_header

    path = Path(resolve(ref))
    if tiny_family(ref) is not None or not (path / "config.json").is_file():
        return torch.float32
    config = read_config(path)
    value = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    if isinstance(value, torch.dtype):
        return value
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for file in sorted(path.glob("*.safetensors")):
        for info in read_safetensors_header(file)[1].values():
            if isinstance(info, dict) and info.get("dtype") in names:
                return names[info["dtype"]]
    return torch.float32


def save_dtype_of(job: DropJob) -> torch.dtype:
    """dtype to write the checkpoint in: `--save-dtype`, or the source's own for auto (never the scoring
    dtype: `--dtype bfloat16` must not round a float32 model's saved weights)."""
    import torch

    return source_dtype(job.model) if job.save_dtype == "auto" else getattr(torch, job.save_dtype)


@dataclass
class DropJob:
    """Everything `lightning-drop drop` needs; validated on construction."""

    model: str
    target: str = "attn"
    num: int | None = None
    ratio: float | None = None
    metric: str = "cosine"
    schedule: str = "one-shot"
    step: int = 1
    keep: Sequence[int] = ()
    mixers: Sequence[str] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    batch_size: int = 4
    dtype: str = "float32"
    save_dtype: str = "auto"
    tokenizer: str | None = None
    output: str | None = None
    overwrite: bool = False
    stream: bool = False
    device: str = "cpu"
    offload_dir: str | None = None
    max_shard_size: str = "2GB"
    span: int | None = None

    def __post_init__(self) -> None:
        from ..scoring.metrics import resolve_metric
        from ..scoring.schedule import resolve_schedule
        from ..scoring.selection import check_span

        if self.target not in TARGETS:
            raise UserError(f"unknown target '{self.target}'; choose from {', '.join(TARGETS)}")
        measure, _ = resolve_metric(self.metric), resolve_schedule(self.schedule)
        check_span(self.span, measure.name, self.target, _layers_on_disk(self.model), self.num)
        if self.span is not None and self.num is None and self.ratio is None:
            self.num = self.span  # a span of N blocks drops N blocks
        if self.stream:
            from ..scoring.streaming import check_streamable

            check_streamable(measure, self.span)
        if (self.num is None) == (self.ratio is None):
            raise UserError("give exactly one of --num or --ratio")
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"unknown --save-dtype '{self.save_dtype}'; choose from {', '.join(SAVE_DTYPES)}")
        if self.batch_size < 1 or self.step < 1:
            raise UserError("--batch-size and --step must be at least 1")
        check_device(self.device, "--device")
        _check_mixers(self)
        if self.offload_dir is not None and not self.stream:
            raise UserError("--offload-dir keeps streamed hidden states on disk and applies only with --stream; "
                            "add --stream or leave --offload-dir out")
        if self.output is not None:
            check_output(self.output, overwrite=self.overwrite,
                         sources=[self.model, self.tokenizer, self.calibration.source, self.offload_dir])
        from ..io.text_data import check_source  # imports torch: not at the job module's import

        check_source(self.calibration.source)


def _check_mixers(job: DropJob) -> None:
    """`--mixers` names token-mixer kinds and restricts `--target attn` (what the model holds is checked once
    it is loaded, by `mixer_keep`)."""
    if not job.mixers:
        return
    from ..core.architectures import MIXER_KINDS

    bad = [k for k in job.mixers if k not in MIXER_KINDS]
    if bad:
        raise UserError(f"--mixers {','.join(bad)}: not a token-mixer kind; choose from {', '.join(MIXER_KINDS)}")
    if job.target != "attn":
        raise UserError(f"--mixers restricts --target attn (which token mixers may go), not --target {job.target}")
    if job.stream:
        raise UserError("--mixers needs the model's layers, which --stream never builds; leave one of them out")


def mixer_keep(job: DropJob, kinds: Sequence[str], dropped_attn: Sequence[int] = (), hybrid: bool = False) -> list[int]:
    """`job.keep` plus every layer whose token mixer is of a kind `--mixers` leaves alone; refuses a kind the
    model does not have and a request that would leave a hybrid no token mixer (its caches need one)."""
    if job.mixers:
        missing = [k for k in job.mixers if k not in kinds]
        if missing:
            raise UserError(f"--mixers {','.join(missing)}: this model has no such token mixer; its layers' kinds "
                            f"are {', '.join(dict.fromkeys(kinds))}")
    keep = set(job.keep) | {i for i, k in enumerate(kinds) if job.mixers and k not in job.mixers}
    live = len(kinds) - len(set(dropped_attn))
    if hybrid and job.target == "attn" and job.num is not None and job.num >= live:
        raise UserError(f"cannot drop {job.num} token mixers: the model has {live} left and would have none "
                        "(no token would see another)")
    return sorted(keep)


def _layers_on_disk(ref: str) -> int | None:
    """The layer count a local checkpoint's config.json states (None: not known before loading)."""
    from ..io.dropped_checkpoint import read_config
    from ..io.model_loading import resolve

    try:
        path = Path(resolve(ref))
    except (UserError, OSError):
        return None
    value = read_config(path).get("num_hidden_layers") if (path / "config.json").is_file() else None
    return value if isinstance(value, int) else None


def check_device(device: str, option: str) -> torch.device:
    """A device this torch build can use, or one line saying why not (before anything is loaded)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"{option} {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"{option} {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option} {device}: MPS is not available here; use --device cpu")
    return dev

def check_request(job: DropJob, n_layers: int, dropped_attn: Sequence[int] = (),
                  dropped_mlp: Sequence[int] = (), keep: Sequence[int] | None = None) -> int:
    """Number of modules to drop; errors for bad --keep/--num before the (long) calibration pass. `keep`:
    the layers never to drop (default `--keep`; `mixer_keep` adds those `--mixers` protects)."""
    from ..scoring.selection import check_span, require_droppable, resolve_num, total_modules

    check_span(job.span, job.metric, job.target, n_layers)
    bad_keep = [i for i in job.keep if not 0 <= i < n_layers]
    if bad_keep:
        raise UserError(f"--keep {bad_keep} out of range: the model has {n_layers} layers")
    total = total_modules(n_layers, job.target)
    num = resolve_num(total, job.num, job.ratio)
    require_droppable(num, n_layers, job.target, job.keep if keep is None else keep, dropped_attn, dropped_mlp)
    return num
