"""What only a GPU can show, in one run of at most about 8 minutes on one H100, written to one JSON file.

Steps, each through the real command line and with its own time limit:
1. the CUDA-marked tests (`pytest -m cuda`);
2. SmolLM2-135M with 8 attention layers dropped (`lightning-drop drop`), then `lightning-drop speed --preset
   paper` (prompt 2048 + 2048 generated tokens, bf16, timed with CUDA events) against the base model;
3. lm-eval (`lightning-drop eval --device cuda`) of the base and the dropped model on the HellaSwag sample;
4. a sharded fit on one GPU in bf16 of each config in `configs/sharded/` (skipped, said in the JSON, where
   that folder is absent).
The JSON holds the card's name, the versions, each step's command, exit status, seconds and output tail, and
the speed and eval results. A step that fails is recorded and the next one runs; the exit status is 1 when
any step failed. Without a CUDA device the script stops at once with one line and exit status 2.

    make gpu-check                                     # installs from the repository (make setup), then runs
    .venv/bin/python scripts/gpu_check.py --output gpu-check.json [--work DIR] [--skip tests,eval]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STEPS = ("tests", "drop", "speed", "eval", "sharded")
HELLASWAG = REPO.parent / "shared" / "data" / "hellaswag_val_first1000.jsonl"
MODEL = "smollm2-135m"
#: seconds each step may take (the whole run stays under 8 minutes on one H100)
LIMITS = {"tests": 90, "drop": 60, "speed": 180, "eval": 90, "sharded": 60}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="gpu-check.json", help="the JSON file written (default gpu-check.json)")
    ap.add_argument("--work", default=None, help="folder for the dropped model and step outputs (default: a "
                    "temporary folder)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to leave out, from {','.join(STEPS)}")
    ap.add_argument("--data", default=str(HELLASWAG), help="the HellaSwag sample (JSONL) for the eval step")
    ap.add_argument("--limit", type=int, default=400, help="HellaSwag questions the eval step scores")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = ap.parse_args(argv)
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    unknown = sorted(set(skip) - set(STEPS))
    if unknown:
        ap.error(f"--skip: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    if Path(args.output).exists() and not args.overwrite:
        ap.error(f"--output {args.output} already exists (pass --overwrite to replace it)")
    if Path(args.output).is_dir():
        ap.error(f"--output {args.output} is a directory; give a file path")
    args.skip = skip
    return args


def cuda_device() -> str | None:
    """The name of CUDA device 0, or None where there is none (this torch build or this machine)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def plan(args: argparse.Namespace, work: Path) -> dict[str, list[list[str]]]:
    """Every step's commands, in order (`lightning-drop` commands as `python -m lightning_drop.cli`)."""
    cli = [sys.executable, "-m", "lightning_drop.cli"]
    dropped = str(work / "attn8")
    steps: dict[str, list[list[str]]] = {
        "tests": [[sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]],
        "drop": [[*cli, "drop", "--model", MODEL, "--target", "attn", "--num", "8", "--device", "cuda",
                  "--output", dropped, "--overwrite"]],
        "speed": [[*cli, "speed", "--model", dropped, "--baseline", MODEL, "--preset", "paper", "--device",
                   "cuda", "--dtype", "bf16", "--repeats", "3", "--warmup", "1", "--output",
                   str(work / "speed.json"), "--overwrite"]],
        "eval": [[*cli, "eval", "--model", ref, "--data", f"hellaswag_sample={args.data}", "--limit",
                  str(args.limit), "--device", "cuda", "--output", str(work / f"eval-{name}.json"), "--overwrite"]
                 for name, ref in (("base", MODEL), ("attn8", dropped))],
        "sharded": [[*cli, "fit", "--config", str(cfg), "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                     "--trainer.precision", "bf16-true", "--trainer.max_steps", "5"]
                    for cfg in sorted((REPO / "configs" / "sharded").glob("*.yaml"))],
    }
    return {name: cmds for name, cmds in steps.items() if name not in args.skip}


def run_step(cmds: list[list[str]], limit: int) -> dict[str, Any]:
    """Run one step's commands in turn (stopping at the first failure) within `limit` seconds in all."""
    runs, start = [], time.perf_counter()
    for cmd in cmds:
        left = max(1.0, limit - (time.perf_counter() - start))
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=left)
            rc, out = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            rc, out = 124, f"timed out after {left:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
        runs.append({"command": shlex.join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
                     "output_tail": out[-3000:]})
        if rc != 0:
            break
    return {"ok": all(r["returncode"] == 0 for r in runs), "seconds": round(time.perf_counter() - start, 1),
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    card = cuda_device()
    if card is None:
        print("error: no CUDA device: this check measures what only a GPU shows; run it on a machine with CUDA "
              "(torch.cuda.is_available() is False here)", file=sys.stderr)
        return 2
    import torch

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env_note = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"), "cwd": str(REPO)}
    doc: dict[str, Any] = {"card": card, "cards": torch.cuda.device_count(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "environment": env_note, "work": str(work), "skipped": list(args.skip), "steps": {}}
    t0 = time.perf_counter()
    for name, cmds in plan(args, work).items():
        if name == "sharded" and not cmds:
            doc["steps"][name] = {"ok": None, "skipped": "configs/sharded/ is absent: no sharded config to fit"}
            print(f"gpu-check: {name}: skipped (configs/sharded/ is absent)", flush=True)
            continue
        if name == "eval" and not Path(args.data).is_file():
            doc["steps"][name] = {"ok": False, "error": f"HellaSwag data not found: {args.data} (pass --data)"}
            print(f"gpu-check: {name}: HellaSwag data not found: {args.data}", flush=True)
            continue
        print(f"gpu-check: {name} ...", flush=True)
        doc["steps"][name] = step = run_step(cmds, LIMITS[name])
        print(f"gpu-check: {name}: {'ok' if step['ok'] else 'FAILED'} in {step['seconds']} s", flush=True)
    for name, path in (("speed", "speed.json"), ("eval_base", "eval-base.json"), ("eval_attn8", "eval-attn8.json")):
        if (work / path).is_file():
            doc.setdefault("results", {})[name] = json.loads((work / path).read_text())
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [n for n, s in doc["steps"].items() if s.get("ok") is False]
    doc["ok"] = not failed
    Path(args.output).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"gpu-check: {card}: {'all steps ok' if not failed else 'failed: ' + ', '.join(failed)} in "
          f"{doc['seconds']} s; results in {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
