"""`lightning-drop --help`, `drop --help` and an argument error, timed side by side with `import torch`.

Help and usage errors must come back in about the time of `python -c "import torch"` (target ratio ~1x);
the script exits 1 when any command's median exceeds `--bound` times the `import torch` median. Commands
run in interleaved rounds (one of each per round) so load on a shared machine hits them alike.

    python benchmarks/cli_startup.py [--rounds 7] [--bound 1.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "lightning_drop.cli"]
COMMANDS = {
    "python -c 'import torch'": ([sys.executable, "-c", "import torch"], 0),
    "lightning-drop --help": ([*CLI, "--help"], 0),
    "lightning-drop drop --help": ([*CLI, "drop", "--help"], 0),
    "lightning-drop drop --model x (argument error)": ([*CLI, "drop", "--model", "x"], 2),
}
BASELINE = "python -c 'import torch'"


def _run(cmd: list[str], expected_rc: int, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          env=env, cwd=ROOT, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != expected_rc:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}, expected {expected_rc}:\n{proc.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="runs of each command (interleaved); medians reported")
    ap.add_argument("--bound", type=float, default=1.5, help="largest allowed ratio to `import torch`")
    a = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for cmd, rc in COMMANDS.values():  # warm the file cache once, untimed
        _run(cmd, rc, env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(a.rounds):
        for name, (cmd, rc) in COMMANDS.items():
            times[name].append(_run(cmd, rc, env))
    base = statistics.median(times[BASELINE])
    print(f"median of {a.rounds} interleaved runs ({sys.executable})")
    worst = 0.0
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        if name != BASELINE:
            worst = max(worst, ratio)
        print(f"  {name:<48} {med:6.3f} s   {ratio:5.2f}x import torch")
    verdict = "ok" if worst <= a.bound else "FAIL"
    print(f"worst ratio {worst:.2f}x (bound {a.bound}x): {verdict}")
    return 0 if worst <= a.bound else 1


if __name__ == "__main__":
    raise SystemExit(main())
