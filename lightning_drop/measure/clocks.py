"""The clocks generation is timed with: one stopwatch per timed region, chosen from the clock's name and the
device the model runs on.

On a CPU a region is read from a host clock: "wall" (elapsed time, what the paper reports) or "process"
(CPU time of this process, which other processes on a shared machine barely disturb; it equals wall time for
a single-threaded run, `torch.set_num_threads(1)`). On a CUDA device the host returns as soon as kernels are
queued, so a host clock would time the queueing; there "wall" becomes CUDA events recorded on the device's
stream around the region ("cuda-events"), and "process" is refused: the CPU time of the host says nothing
about the GPU's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import UserError

#: The host clocks a user chooses from; on CUDA "wall" is timed by events (see `resolve_clock`).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
CUDA_EVENTS = "cuda-events"


def check_clock(name: str) -> Callable[[], float]:
    """The host clock called `name`, or one line naming the choices."""
    if name not in CLOCKS:
        raise UserError(f"clock must be one of {sorted(CLOCKS)}, got {name!r}")
    return CLOCKS[name]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_clock(name: str, device: torch.device) -> str:
    """The clock that really times a model on `device`: `name` on a CPU, CUDA events for "wall" on CUDA."""
    check_clock(name)
    if device.type != "cuda":
        return name
    if name == "process":
        raise UserError("clock 'process' is the host's CPU time, which does not time work on a CUDA device; "
                        "use clock 'wall' (timed with CUDA events there)")
    return CUDA_EVENTS


class Stopwatch(Protocol):
    """Times one region at a time: `start()`, the work, then `stop()` returns its seconds."""

    def start(self) -> None: ...

    def stop(self) -> float: ...


class HostStopwatch:
    """A host clock read around the region (after waiting for the device, should it queue work)."""

    def __init__(self, now: Callable[[], float], device: torch.device) -> None:
        self.now, self.device, self.t0 = now, device, 0.0

    def start(self) -> None:
        sync(self.device)
        self.t0 = self.now()

    def stop(self) -> float:
        sync(self.device)
        return self.now() - self.t0


class CudaEventStopwatch:
    """Two CUDA events recorded on the device's current stream; `stop` waits for the end event only, so the
    time is the device's, from the start event to the end event, without the host's queueing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self.begin.record(torch.cuda.current_stream(self.device))

    def stop(self) -> float:
        self.end.record(torch.cuda.current_stream(self.device))
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3  # elapsed_time is in milliseconds


def stopwatch(clock: str, device: torch.device) -> Stopwatch:
    """A stopwatch for regions run on `device` under the user's `clock` (see `resolve_clock`)."""
    if resolve_clock(clock, device) == CUDA_EVENTS:
        return CudaEventStopwatch(device)
    return HostStopwatch(CLOCKS[clock], device)
