"""Choices and defaults that the CLI parser shares with the library, in a module that imports no torch.

`lightning-drop --help` and argument errors build the parser from these alone, so they come back without
loading torch or transformers; `importance`, `selection` and `data` re-export them under their old names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from ..errors import UserError

# The Literal types are what the command line reads choices from; the tuples are the same values.
Metric = Literal["cosine", "cosine_no_residual", "angular", "relative_magnitude", "reverse", "random", "loss"]
Target = Literal["block", "attn", "mlp", "joint"]
Schedule = Literal["one-shot", "iterative"]
METRICS: tuple[str, ...] = get_args(Metric)
TARGETS: tuple[str, ...] = get_args(Target)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
#: Speed measurement: which clock times a run, and how two models' runs alternate (see `speed.compare_speed`).
Clock = Literal["wall", "process"]
Interleave = Literal["step", "run"]


@dataclasses.dataclass
class CalibrationConfig:
    """What text scores are computed on; defaults are the paper's (256 x 2048 tokens of C4)."""

    source: str = "c4-sample"
    text_field: str = "text"
    num_samples: int = dataclasses.field(default=256, metadata={"min": 1})
    seq_len: int = dataclasses.field(default=2048, metadata={"min": 1})
    shuffle: bool = False
    seed: int = 0
    #: windows per scoring forward pass; the study reads it here (the drop job has its own --batch-size)
    batch_size: int = dataclasses.field(default=4, metadata={"min": 1})

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seq_len < 1:
            raise UserError(f"num_samples and seq_len must be >= 1, got {self.num_samples}, {self.seq_len}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
