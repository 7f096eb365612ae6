"""SmolLM2-135M, dropped, exported as Nemotron-NAS and run by vLLM's CPU build: agreement and speed.

Run with the project venv; vLLM runs in subprocesses of `.venv-vllm/bin/python` (`make setup-vllm`) that
only load exported directories and answer in JSON, so nothing in `.venv` changes:

    .venv/bin/python benchmarks/vllm_engine.py --check-only    # base + four drops: log-probs, greedy
    .venv/bin/python benchmarks/vllm_engine.py --speed-only    # base vs attention drop: tokens/s, KV blocks

Drops come from one cosine-importance pass over C4 calibration text (the first documents of the file):
`attn` (8 attention sublayers), `mlp` (4 MLPs), `block` (4 whole blocks) and `mixed` (the 6 lowest attention
sublayers, 3 lowest MLPs and 2 lowest blocks not already chosen, so one file holds attention-only, MLP-only
and empty layers; cosine's joint ranking on SmolLM2 picks attention only until 23 modules). Each variant
and the undropped model (`base`) is saved with `save_dropped` and exported with the command a user runs,
`lightning-drop export --format nemotron-nas --dtype f32`.

(1) check: vLLM's prompt log-probabilities on held-out C4 text (the last documents of the file) against
ours in float64: max |log p_vLLM - log p_ours| at the next target token, and over the top-k tokens vLLM
ranks at each position; greedy continuations token for token (EOS ignored on both sides).
(2) speed: base and `attn` are loaded side by side in one vLLM process with the same settings, and rounds
alternate between them: generated tokens/s (wall clock of the whole `generate`, prefill included) for one
request and for 16 submitted together, 512-token prompts, 128 new tokens, prefix caching off so no round
reuses another's prefill; plus the KV-cache blocks each gets from the same VLLM_CPU_KVCACHE_SPACE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
INSTALL = "make setup-vllm"
PROMPT = "The license grants you the right to"
# What worked for SmolLM2-135M on a 2-core CPU: eager mode (no torch.compile warm-up), float32 for the check.
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "trust_remote_code": True,
               "enable_prefix_caching": False, "seed": 0}


# ----------------------------------------------------------------------------------------------- engine side
def _llm(path: str, spec: dict, **extra):
    from vllm import LLM

    return LLM(model=path, max_model_len=spec["max_model_len"], **ENGINE_ARGS, **extra)


def _close(llm) -> None:
    """Stop the engine's processes now, before the next model is loaded next to them."""
    llm.llm_engine.engine_core.shutdown()


def _kv_blocks(llm) -> dict:
    cache = llm.llm_engine.vllm_config.cache_config
    return {"kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}


def check_model(path: str, spec: dict) -> dict:
    """Prompt log-probabilities (the target's and the top-k at every position) and greedy continuations."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    k = spec["top_k"]
    llm = _llm(path, spec, max_logprobs=k)
    try:
        out: dict = _kv_blocks(llm)
        scored = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["texts"]],
                              SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k), use_tqdm=False)
        # per text, per position j >= 1: [[token, log p(token | ids[:j])], ...]; the target ids[j] is always there
        out["prompt_logprobs"] = [[[[int(t), float(lp.logprob)] for t, lp in pos.items()]
                                   for pos in o.prompt_logprobs[1:]] for o in scored]
        gen = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]],
                           SamplingParams(max_tokens=spec["greedy_tokens"], temperature=0, ignore_eos=True),
                           use_tqdm=False)
        out["greedy"] = [list(o.outputs[0].token_ids) for o in gen]
    finally:
        _close(llm)
    return out


def speed(spec: dict) -> dict:
    """Tokens/s of every model in `spec["models"]`, loaded side by side, in alternating rounds."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llms = {name: _llm(path, spec) for name, path in spec["models"].items()}
    out: dict = {name: _kv_blocks(llm) | {"batch_1": [], "concurrent": [], "load_avg": []}
                 for name, llm in llms.items()}
    n_new = spec["new_tokens"]
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    try:
        for llm in llms.values():  # first requests pay one-off setup
            llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        names = list(llms)
        for r in range(spec["rounds"]):
            for name in names if r % 2 == 0 else names[::-1]:  # ABBA: drift in the machine's load cancels
                for key, batch in (("batch_1", prompts[:1]), ("concurrent", prompts)):
                    t0 = time.perf_counter()
                    res = llms[name].generate(batch, params, use_tqdm=False)
                    dt = time.perf_counter() - t0
                    generated = sum(len(o.outputs[0].token_ids) for o in res)
                    assert generated == n_new * len(batch), (generated, n_new, len(batch))
                    out[name][key].append(generated / dt)
                    out[name]["load_avg"].append(os.getloadavg()[0])
    finally:
        for llm in llms.values():
            _close(llm)
    return out


def worker(spec_file: str) -> None:
    """Runs inside .venv-vllm: only vllm and the standard library."""
    import torch
    import vllm

    spec = json.loads(Path(spec_file).read_text())
    out: dict = {"vllm_version": vllm.__version__, "torch_version": torch.__version__,
                 "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}
    if spec["mode"] == "check":
        out["models"] = {name: check_model(path, spec) for name, path in spec["models"].items()}
    else:
        out["speed"] = speed(spec)
    Path(spec["out"]).write_text(json.dumps(out))


def alias_vllm_metadata() -> None:
    """Make the `vllm` command work in a venv holding vLLM's CPU build.

    The CPU build is installed as the distribution `vllm-cpu`, but `vllm/entrypoints/cli/main.py` (0.32.0)
    asks for `importlib.metadata.version("vllm")` before parsing any argument, so `vllm serve` exits with
    PackageNotFoundError. A metadata-only `vllm` distribution fixes that. Its version keeps the "+cpu" that
    vLLM's platform detection looks for (`vllm_version_matches_substr("cpu")`), and its RECORD lists only its
    own files, so `pip uninstall vllm` removes exactly the alias.
    """
    import importlib.metadata as md
    import sysconfig

    try:
        print(f"vllm metadata present: {md.version('vllm')}")
        return
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu")
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                   f"Summary: metadata alias of vllm-cpu {version} (for the vllm command)\n")
    (info / "INSTALLER").write_text("lightning-drop\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    print(f"wrote {info}")


# ----------------------------------------------------------------------------------------------- torch side
def engine_env() -> dict:
    """Environment for vLLM: its own venv only (no project PYTHONPATH), a fixed KV-cache budget."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("OMP_WAIT_POLICY", "passive")  # spinning OpenMP threads collapse on a shared CPU
    return env


def run_engine(spec: dict, work: Path, tag: str, timeout: float | None = None) -> dict:
    """Run `worker` in .venv-vllm on `spec`; its log goes to work/vllm-<tag>.log."""
    spec_file, log = work / f"vllm-{tag}.json", work / f"vllm-{tag}.log"
    spec["out"] = str(work / f"vllm-{tag}-out.json")
    spec_file.write_text(json.dumps(spec))
    with open(log, "w") as fh:
        proc = subprocess.run([str(VLLM_PY), str(Path(__file__).resolve()), "--worker", str(spec_file)],
                              stdout=fh, stderr=subprocess.STDOUT, env=engine_env(), cwd=work, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}, log {log}):\n{tail}")
    return json.loads(Path(spec["out"]).read_text())


def drop_sets(scores, n_attn: int, n_mlp: int, n_block: int) -> dict[str, tuple[list[int], list[int]]]:
    """{variant: (attention, MLP)} from one set of importance scores (see the module docstring)."""
    from lightning_drop.scoring.selection import select_modules

    sets = {"base": ([], []), "attn": select_modules(scores, "attn", n_attn),
            "mlp": select_modules(scores, "mlp", n_mlp), "block": select_modules(scores, "block", n_block)}
    attn = select_modules(scores, "attn", max(1, 3 * n_attn // 4))[0]
    mlp = select_modules(scores, "mlp", max(1, 3 * n_mlp // 4))[1]
    used = set(attn) | set(mlp)
    free = sorted((s, i) for i, s in enumerate(scores.block) if s is not None and i not in used)
    blocks = [i for _, i in free[: max(1, n_block // 2)]]
    sets["mixed"] = (sorted(attn + blocks), sorted(mlp + blocks))
    return sets


def export(model, tok, name: str, work: Path) -> Path:
    """Save `model` as the project does, then export it with the CLI a user runs."""
    from lightning_drop.io.dropped_checkpoint import save_dropped

    src, out = work / f"src-{name}", work / f"nas-{name}"
    save_dropped(model, src, tokenizer=tok, overwrite=True)
    cmd = [sys.executable, "-m", "lightning_drop.cli", "export", "--model", str(src), "--format", "nemotron-nas",
           "--output", str(out), "--dtype", "f32", "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return out


def compare(ref_files: list[str], texts: list[list[int]], engine: list) -> dict:
    """Max |log p_vLLM - log p_ours| at the target token and over every token vLLM returned."""
    import numpy as np

    target = overall = 0.0
    count = 0
    for ref_file, ids, positions in zip(ref_files, texts, engine):
        ref = np.load(ref_file)
        assert len(positions) == len(ids) - 1
        for j, pairs in enumerate(positions):  # pairs score ids[j + 1] given ids[: j + 1]
            for tok, lp in pairs:
                d = abs(lp - ref[j, tok])
                overall = max(overall, d)
                if tok == ids[j + 1]:
                    target = max(target, d)
                count += 1
    return {"max_target_logprob_diff": target, "max_logprob_diff": overall, "logprobs_compared": count}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from _common import add_engine_args

    add_engine_args(p)
    p.add_argument("--n-attn", type=int, default=8, help="attention sublayers dropped in `attn`")
    p.add_argument("--n-mlp", type=int, default=4, help="MLPs dropped in `mlp`")
    p.add_argument("--n-block", type=int, default=4, help="whole blocks dropped in `block`")
    p.add_argument("--variants", default="base,attn,mlp,block,mixed", help="which models the check runs")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--top-k", type=int, default=20, help="vLLM's top-k log-probs compared at each position")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrent", type=int, default=16)
    args = p.parse_args(argv)
    if not VLLM_PY.is_file():
        sys.exit(f"{VLLM_PY} not found: run `{INSTALL}` first (vLLM's CPU build in its own venv)")

    import copy

    import numpy as np
    import torch

    from _common import C4, greedy, ref_logprobs
    from lightning_drop.scoring.importance import compute_importance
    from lightning_drop.io.model_loading import load_model
    from lightning_drop.core.modeling_dropped import apply_drop
    from lightning_drop.io.text_data import load_documents, make_windows

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vllm_engine_"))
    work.mkdir(parents=True, exist_ok=True)
    base, tok = load_model(args.model, dtype=torch.float32)
    docs = load_documents(C4)
    windows = make_windows(tok, docs, args.seq_len, args.calib_windows)
    scores = compute_importance(base, list(windows.split(2)), metric="cosine")
    sets = drop_sets(scores, args.n_attn, args.n_mlp, args.n_block)
    result: dict = {"drops": {n: {"attn": a, "mlp": m} for n, (a, m) in sets.items()},
                    "load_avg_start": os.getloadavg()}
    for n, (a, m) in sets.items():
        print(f"{n:6s} drops attention {a} MLP {m}")

    def variant(name: str):
        a, m = sets[name]
        return base if name == "base" else apply_drop(copy.deepcopy(base), attn=a, mlp=m)

    if not args.speed_only:
        names = [v for v in args.variants.split(",") if v]
        models = {n: variant(n) for n in names}
        dirs = {n: str(export(m, tok, n, work)) for n, m in models.items()}
        ids = [tok(d).input_ids[: args.eval_tokens] for d in docs[-args.eval_docs:]]
        prompts = [tok(PROMPT).input_ids, tok(docs[-args.eval_docs - 1]).input_ids[:32]]
        refs: dict = {}
        for n, m in models.items():
            refs[n] = []
            for k, x in enumerate(ids):
                f = work / f"ref-{n}-{k}.npy"
                np.save(f, ref_logprobs(m, x))
                refs[n].append(str(f))
        t0 = time.time()
        out = run_engine({"mode": "check", "models": dirs, "texts": ids, "prompts": prompts, "top_k": args.top_k,
                          "greedy_tokens": args.greedy_tokens, "max_model_len": 1024}, work, "check")
        print(f"vLLM {out['vllm_version']} (torch {out['torch_version']}), {len(dirs)} models checked in "
              f"{time.time() - t0:.0f} s")
        result.update(vllm_version=out["vllm_version"], torch_version=out["torch_version"])
        for n, m in models.items():
            r = out["models"][n]
            res = compare(refs[n], ids, r["prompt_logprobs"])
            ours = [greedy(m, pr, args.greedy_tokens) for pr in prompts]
            res.update(greedy_agree=r["greedy"] == ours, greedy_text=[tok.decode(g) for g in r["greedy"]],
                       kv_blocks=r["kv_blocks"])
            print(f"[f32] {n:6s} max |logprob diff| next target token {res['max_target_logprob_diff']:.2e}, "
                  f"top-{args.top_k} tokens {res['max_logprob_diff']:.2e} ({res['logprobs_compared']} log-probs, "
                  f"{sum(len(x) - 1 for x in ids)} positions); greedy {args.greedy_tokens} tokens x {len(prompts)} "
                  f"prompts agree {res['greedy_agree']}: {res['greedy_text'][0]!r}")
            result[n] = res

    if not args.check_only:
        models = {n: variant(n) for n in ("base", "attn")}
        dirs = {n: str(export(m, tok, n, work)) for n, m in models.items()}
        stream = make_windows(tok, docs[-100:], args.prompt_tokens, args.concurrent)
        prompts = stream.tolist()
        load0 = os.getloadavg()
        out = run_engine({"mode": "speed", "models": dirs, "prompts": prompts, "new_tokens": args.new_tokens,
                          "rounds": args.rounds, "max_model_len": args.prompt_tokens + args.new_tokens + 16},
                         work, "speed")
        s = out["speed"]
        loads = [x for n in s for x in s[n]["load_avg"]]
        kept = (base.config.num_hidden_layers - len(sets["attn"][0])) / base.config.num_hidden_layers
        print(f"vLLM {out['vllm_version']}, VLLM_CPU_KVCACHE_SPACE={out['kv_cache_space_gib']} GiB, "
              f"{len(prompts[0])}-token prompts, {args.new_tokens} new tokens, {args.rounds} alternating rounds; "
              f"load average {load0[0]:.1f} before, {min(loads):.1f}-{max(loads):.1f} during "
              f"({os.cpu_count()} CPUs)")
        for n in dirs:
            r = s[n]
            print(f"{n:6s} KV-cache blocks {r['kv_blocks']} x {r['block_size']} tokens; generated tokens/s "
                  f"batch 1 {np.median(r['batch_1']):.2f} {[round(x, 2) for x in r['batch_1']]}, "
                  f"{args.concurrent} concurrent {np.median(r['concurrent']):.2f} {[round(x, 2) for x in r['concurrent']]}")
        ratios = {"kv_blocks": s["attn"]["kv_blocks"] / s["base"]["kv_blocks"],
                  "kv_blocks_expected": 1 / kept,
                  "batch_1": float(np.median(s["attn"]["batch_1"]) / np.median(s["base"]["batch_1"])),
                  "concurrent": float(np.median(s["attn"]["concurrent"]) / np.median(s["base"]["concurrent"]))}
        overlap = [k for k in ("batch_1", "concurrent")
                   if min(s["attn"][k]) <= max(s["base"][k]) and min(s["base"][k]) <= max(s["attn"][k])]
        if overlap:
            print(f"noise: the per-round tokens/s of base and attn overlap at {', '.join(overlap)}; at this load "
                  f"the speed ratio there is not a measurement of the drop")
        ratios_noise = overlap
        print(f"KV-cache blocks dropped/base {ratios['kv_blocks']:.3f} (1 / kept attention fraction "
              f"{ratios['kv_blocks_expected']:.3f}); tokens/s dropped/base: batch 1 {ratios['batch_1']:.3f}x, "
              f"{args.concurrent} concurrent {ratios['concurrent']:.3f}x")
        result["speed"] = s | {"ratios": ratios, "load_avg_before": load0, "noise": ratios_noise}
        result["vllm_version"] = out["vllm_version"]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":  # vLLM starts its engine processes with spawn, which re-imports this file
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    elif sys.argv[1:] == ["--alias-vllm-metadata"]:  # run by `make setup-vllm` with .venv-vllm's python
        alias_vllm_metadata()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        main()
