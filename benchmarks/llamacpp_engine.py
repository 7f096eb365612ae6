"""SmolLM2-135M with 8 attention layers dropped, served by llama.cpp: agreement and speed.

Run with the project venv (torch side); llama.cpp runs in a subprocess of `.venv-engines/bin/python`
(llama-cpp-python built from PyPI, kept apart so nothing in `.venv` changes):

    .venv/bin/python benchmarks/llamacpp_engine.py                 # check (f32) + speed (f16)
    .venv/bin/python benchmarks/llamacpp_engine.py --check-only --dtype f32

Steps: score attention sublayers of SmolLM2-135M by `1 - cos(x, x + attn(ln(x)))` on C4 calibration text,
drop the 8 most redundant, export the undropped and the dropped model to `deci` GGUF files, then
(1) compare llama.cpp's next-token log-probabilities on held-out C4 text with ours, and greedy
continuations: two maxima over all positions of |log p_llama.cpp - log p_ours|, one over the full vocabulary
and one over the next target token only (the token that actually follows); the KV cache is kept in the
check's dtype (`type_k`/`type_v` = f32 for the f32 check: llama.cpp's default f16 cache would round keys and
values and blur an f32 comparison); (2) time llama.cpp prefill and decode for both models in one process,
alternating between them, and print the tokens/s ratio.
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
# ggml.h `enum ggml_type` values (stable across ggml/llama.cpp versions), for Llama(type_k=..., type_v=...)
GGML_TYPES = {"f32": 0, "f16": 1}
ENGINE_PY = ROOT / ".venv-engines" / "bin" / "python"
C4 = ROOT.parent / "shared" / "data" / "c4_demo.jsonl"


# ----------------------------------------------------------------------------------------------- engine side
def worker(spec_file: str) -> None:
    """Runs inside .venv-engines: only numpy and llama_cpp."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    spec = json.loads(Path(spec_file).read_text())
    threads = spec["threads"]
    out: dict = {"llama_cpp_version": __import__("llama_cpp").__version__}

    def load(path: str, logits_all: bool, kv_type: str | None = None) -> "Llama":
        # type_k / type_v: llama-cpp-python's Llama() arguments for the KV cache's ggml_type (default f16)
        kv = {} if kv_type is None else {"type_k": GGML_TYPES[kv_type], "type_v": GGML_TYPES[kv_type]}
        return Llama(model_path=path, n_ctx=spec["n_ctx"], n_batch=512, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False, **kv)

    if spec.get("check"):
        for name, path in spec["models"].items():
            llm = load(path, logits_all=True, kv_type=spec["kv_type"])
            res: dict = {"max_logprob_diff": 0.0, "max_target_logprob_diff": 0.0, "kv_cache_type": spec["kv_type"],
                         "n_vocab": llm.n_vocab()}
            for i, (ids, ref_file) in enumerate(zip(spec["texts"], spec["ref_logprobs"][name])):
                ref = np.load(ref_file)
                llm.reset()
                llm.eval(ids)
                logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
                lp = logits - logits.max(-1, keepdims=True)
                lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
                res["max_logprob_diff"] = max(res["max_logprob_diff"], float(np.abs(lp - ref).max()))
                tgt = np.arange(len(ids) - 1)
                diff_t = np.abs(lp[tgt, ids[1:]] - ref[tgt, ids[1:]]).max()
                res["max_target_logprob_diff"] = max(res["max_target_logprob_diff"], float(diff_t))
            # tokenizer agreement on the raw text
            res["tokenizer_agree"] = all(
                llm.tokenize(t.encode(), add_bos=False, special=False) == ids
                for t, ids in zip(spec["raw_texts"], spec["texts"]))
            # greedy continuation
            gen = []
            llm.reset()
            llm.eval(spec["prompt"])
            for _ in range(spec["greedy_tokens"]):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                gen.append(nxt)
                llm.eval([nxt])
            res["greedy"] = gen
            out[name] = res
            del llm

    if spec.get("speed"):
        llms = {name: load(path, logits_all=False) for name, path in spec["speed_models"].items()}
        prompt, n_new = spec["speed_prompt"], spec["decode_tokens"]
        times: dict = {name: {"prefill": [], "decode": []} for name in llms}
        def last(llm: "Llama") -> int:
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))

        for name, llm in llms.items():  # warm up each model itself
            llm.reset()
            llm.eval(prompt[:64])
            llm.eval([last(llm)])
        for _ in range(spec["rounds"]):
            for name, llm in llms.items():
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                t1 = time.perf_counter()
                for _ in range(n_new):
                    llm.eval([last(llm)])
                t2 = time.perf_counter()
                times[name]["prefill"].append(len(prompt) / (t1 - t0))
                times[name]["decode"].append(n_new / (t2 - t1))
        out["speed"] = {name: {k: float(np.median(v)) for k, v in t.items()} | {"all": t}
                        for name, t in times.items()}
    Path(spec["out"]).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------- torch side
def c4_texts() -> list[str]:
    return [json.loads(line)["text"] for line in C4.read_text().splitlines() if line.strip()]


def attention_scores(model, tok, texts: list[str], seq_len: int) -> list[float]:
    """Per layer 1 - cos(x, h): x = attention input (residual), h = x + attn(ln(x)) (the MLP entry)."""
    import torch

    layers = model.model.layers
    acc = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    store: dict = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.input_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: store.__setitem__(("x", i), a[0].detach())))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: store.__setitem__(("h", i), a[0].detach())))
    try:
        eos = tok.eos_token or ""
        ids = tok("".join(t + eos for t in texts), return_tensors="pt").input_ids[0]
        blocks = ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)
        with torch.no_grad():
            for block in blocks:
                model(block[None])
                for i in range(len(layers)):
                    x, h = store[("x", i)].double(), store[("h", i)].double()
                    acc[i] += (1 - torch.nn.functional.cosine_similarity(x, h, dim=-1)).sum()
                count += block.numel()
    finally:
        for h in hooks:
            h.remove()
    return (acc / count).tolist()


def run_engine(spec: dict, work: Path) -> dict:
    spec_file = work / "engine_spec.json"
    spec["out"] = str(work / "engine_out.json")
    spec_file.write_text(json.dumps(spec))
    # passive OpenMP waiting: spinning threads collapse on a shared, oversubscribed CPU
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
    proc = subprocess.run([str(ENGINE_PY), str(Path(__file__).resolve()), "--worker", str(spec_file)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["out"]).read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from _common import add_engine_args

    add_engine_args(p)
    p.add_argument("--n-drop", type=int, default=8, help="attention layers to drop")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"], help="GGUF dtype for the agreement check")
    p.add_argument("--speed-dtype", default="f16", choices=["f32", "f16", "q8_0"])
    p.add_argument("--calib-docs", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not ENGINE_PY.is_file():
        sys.exit(f"{ENGINE_PY} not found: python3 -m venv .venv-engines && "
                 f".venv-engines/bin/pip install numpy llama-cpp-python")
    import copy

    import numpy as np
    import torch

    from _common import greedy, ref_logprobs
    from lightning_drop.export import export_gguf
    from lightning_drop.core.modeling_dropped import apply_drop
    from lightning_drop.io.model_loading import load_model

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="llamacpp_engine_"))
    work.mkdir(parents=True, exist_ok=True)
    base, tok = load_model(args.model, dtype=torch.float32)
    texts = c4_texts()
    scores = attention_scores(base, tok, texts[: args.calib_docs], args.seq_len)
    drop = sorted(sorted(range(len(scores)), key=lambda i: scores[i])[: args.n_drop])
    dropped = apply_drop(copy.deepcopy(base), attn=drop)
    print(f"attention scores (1 - cos): {[round(s, 4) for s in scores]}")
    print(f"dropping attention layers {drop}")
    models = {"base": base, "dropped": dropped}
    result: dict = {"drop_attn": drop, "scores": scores}

    if not args.speed_only:
        files = {n: str(export_gguf(m, work / f"{n}-{args.dtype}.gguf", dtype=args.dtype, tokenizer=tok))
                 for n, m in models.items()}
        raw = [t for t in texts[-args.eval_docs:]]
        ids = [tok(t).input_ids[: args.eval_tokens] for t in raw]
        raw = [tok.decode(x) for x in ids]  # the text those tokens spell, for the tokenizer check
        ids = [tok(t).input_ids for t in raw]
        refs: dict = {}
        for n, m in models.items():
            refs[n] = []
            for k, x in enumerate(ids):
                f = work / f"ref-{n}-{k}.npy"
                np.save(f, ref_logprobs(m, x))
                refs[n].append(str(f))
        prompt = tok("The capital of France is").input_ids
        out = run_engine({"check": True, "models": files, "texts": ids, "raw_texts": raw, "ref_logprobs": refs,
                          "prompt": prompt, "greedy_tokens": args.greedy_tokens, "n_ctx": 1024,
                          "threads": args.threads, "kv_type": args.dtype}, work)
        for n, m in models.items():
            ours = greedy(m, prompt, args.greedy_tokens)
            r = out[n]
            r["greedy_agree"] = r["greedy"] == ours
            r["greedy_text"] = tok.decode(r["greedy"])
            positions, targets = sum(len(x) for x in ids), sum(len(x) - 1 for x in ids)
            print(f"[{args.dtype} weights, {r['kv_cache_type']} KV cache] {n:8s} "
                  f"max |logprob diff| of the next target token {r['max_target_logprob_diff']:.2e} ({targets} targets); "
                  f"over the full vocabulary {r['max_logprob_diff']:.2e} ({positions} positions x {r['n_vocab']} tokens); "
                  f"tokenizer agrees {r['tokenizer_agree']}; greedy {args.greedy_tokens} tokens agree "
                  f"{r['greedy_agree']}: {r['greedy_text']!r}")
            result[n] = r
        result["llama_cpp_version"] = out["llama_cpp_version"]

    if not args.check_only:
        files = {n: str(export_gguf(m, work / f"{n}-{args.speed_dtype}.gguf", dtype=args.speed_dtype, tokenizer=tok))
                 for n, m in models.items()}
        body = tok(" ".join(texts[-20:])).input_ids[: args.prompt_tokens]
        out = run_engine({"speed": True, "speed_models": files, "speed_prompt": body,
                          "decode_tokens": args.decode_tokens, "rounds": args.rounds,
                          "n_ctx": args.prompt_tokens + args.decode_tokens + 8, "threads": args.threads}, work)
        s = out["speed"]
        for n in models:
            print(f"[{args.speed_dtype} weights, f16 KV cache] {n:8s} prefill {s[n]['prefill']:8.1f} tok/s   decode {s[n]['decode']:7.1f} tok/s "
                  f"(median of {args.rounds} alternating rounds, {args.threads} threads, "
                  f"{len(body)}-token prompt + {args.decode_tokens} new)")
        for phase in ("prefill", "decode"):
            ratio = s["dropped"][phase] / s["base"][phase]
            print(f"{phase} speedup dropped/base: {ratio:.3f}x")
            result[f"{phase}_speedup"] = ratio
        result["speed"] = s
        result["llama_cpp_version"] = out["llama_cpp_version"]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
