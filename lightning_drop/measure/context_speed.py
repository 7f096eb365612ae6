"""Speed at several context lengths: where a drop's gain shows depends on the length.

With a short prompt a small model's time is almost all MLP and embedding; at the lengths people run (the
paper times 2048 prompt + 2048 generated tokens) the KV cache and attention take a growing share, and that
is where dropping attention is expected to pay. `speed_by_context` times the base and its dropped models in
lock step (`speed.compare_speed`) at each prompt length, keeps the KV cache each leaves at that length, and
with `ideal` profiles the base (`ideal_speedup.profile_drops`, once for all drops) for the share of the
ideal gain each drop realizes there. Checks on lengths (`parse_lengths`, `check_context`) are here so that
the command, the study and the benchmark refuse the same inputs with the same line, before anything is timed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import UserError

#: Named workloads: "paper" = the paper's measurement, 2048 prompt tokens then 2048 generated, batch 1.
PRESETS: dict[str, dict[str, Any]] = {"paper": {"prompt_lens": [2048], "gen_len": 2048, "batch_size": 1}}


def preset(name: str) -> dict[str, Any]:
    """The workload of a named preset, or one line naming the presets."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def parse_lengths(text: str | Sequence[int], option: str = "--prompt-lens") -> list[int]:
    """Prompt lengths from "128,512,2048" (or a sequence of ints): each an integer >= 1, at least one."""
    items = [x.strip() for x in text.split(",") if x.strip()] if isinstance(text, str) else list(text)
    if not items:
        raise UserError(f"{option}: give at least one length (e.g. 128,512,2048)")
    out = []
    for x in items:
        try:
            n = int(x)
        except (TypeError, ValueError):
            raise UserError(f"{option}: {x!r} is not an integer (expected comma-separated lengths, "
                            f"e.g. 128,512,2048)") from None
        if isinstance(x, bool) or n < 1 or (isinstance(x, float) and x != n):
            raise UserError(f"{option}: lengths must be integers >= 1, got {x!r}")
        out.append(n)
    return out


def max_positions(config: Any) -> int | None:
    """`max_position_embeddings` of a transformers config or a config.json mapping (a multimodal model's text
    config too); None when the config has none."""
    for cfg in (config, _get(config, "text_config")):
        n = _get(cfg, "max_position_embeddings")
        if isinstance(n, int) and n > 0:
            return n
    return None


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def positions_before_loading(ref: str) -> int | None:
    """A model reference's max_position_embeddings read from its config alone (a catalogue tiny model or a
    directory with a config.json), so that a context too long is refused before any weights load; None for
    other references (check those once loaded)."""
    from pathlib import Path

    from ..io.dropped_checkpoint import read_config
    from ..io.model_loading import resolve, tiny_family
    from ..io.tiny_models import tiny_config

    if tiny_family(ref) is not None:
        return max_positions(tiny_config(tiny_family(ref)))
    path = Path(resolve(ref))
    return max_positions(read_config(path)) if (path / "config.json").is_file() else None


def check_context(prompt_lens: Sequence[int], gen_len: int, limit: int | None, model: str,
                  option: str = "--prompt-lens") -> None:
    """A context (prompt + generated tokens) longer than the model's positions: one line, before any timing."""
    if limit is None:
        return
    too_long = [p for p in prompt_lens if p + gen_len > limit]
    if too_long:
        raise UserError(f"{option}: prompt {max(too_long)} + {gen_len} generated tokens = {max(too_long) + gen_len} "
                        f"exceeds {model}'s max_position_embeddings ({limit})")


def speed_by_context(models: Mapping[str, nn.Module], prompt_lens: Sequence[int], gen_len: int = 128,
                     batch_size: int = 1, repeats: int = 3, warmup: int = 1, seed: int = 0, clock: str = "wall",
                     interleave: str = "step", ideal: bool = False) -> list[dict[str, Any]]:
    """One `compare_speed` result per prompt length, in the order given (`models` holds a "base").

    Each result also has `context_len` (prompt + generated tokens), `warnings` (`ideal_speedup.speedup_warnings`:
    speedups not to be trusted) and, with `ideal`, per dropped model `vs_base[name]["ideal_speedup"]` and
    `["realized_gain"]`, {prefill, decode, total} each, profiled on the base at that length (a realized gain is
    None where a drop removes nothing). Weights are placed alike once.
    """
    from .ideal_speedup import profile_drops, realized_gain, speedup_warnings
    from ..core.modeling_dropped import dropped_layers
    from .speed import compare_speed

    if "base" not in models or len(models) < 2:
        raise UserError(f"speed_by_context needs a 'base' and at least one dropped model, got {sorted(models)}")
    lengths = parse_lengths(prompt_lens, "prompt_lens")
    for name, m in models.items():
        check_context(lengths, gen_len, max_positions(m.config), name, "prompt_lens")
    out = []
    for i, prompt_len in enumerate(lengths):
        res = compare_speed(models, batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats,
                            warmup=warmup, seed=seed, clock=clock, interleave=interleave, place_alike=i == 0)
        res["context_len"] = prompt_len + gen_len
        if ideal:
            # one profiling of the base serves every drop; no warm-up: the base has just run in compare_speed
            profs = profile_drops(models["base"], {name: dropped_layers(models[name]) for name in res["vs_base"]},
                                  batch_size, prompt_len, gen_len, repeats, warmup=0, seed=seed, clock=clock)
            for name, vs in res["vs_base"].items():
                vs["ideal_speedup"] = {ph: profs[name][ph]["ideal_speedup"] for ph in ("prefill", "decode", "total")}
                vs["realized_gain"] = {ph: realized_gain(vs["speedup"][ph], x) if x != 1 else None
                                       for ph, x in vs["ideal_speedup"].items()}
        res["warnings"] = [w for name, vs in res["vs_base"].items() for w in
                           speedup_warnings(vs, f"prompt {prompt_len}" + (f", {name}" if len(models) > 2 else ""))]
        out.append(res)
    return out


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _x(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_context_table(per_length: Sequence[Mapping[str, Any]], labels: Mapping[str, str] | None = None,
                         kv_detail: bool = True) -> str:
    """One row per prompt length: the base's times (prefill seconds, milliseconds per decode step) and KV cache,
    then per dropped model its speedups (prefill, decode, total), its KV cache (bytes per token and MiB at that
    length with `kv_detail`; always its ratio to the base's) and, when profiled, the ideal total speedup and
    the realized share of it."""
    first = per_length[0]
    names = list(first["vs_base"])
    labels = {n: (labels or {}).get(n, n) for n in names}
    ideal = "ideal_speedup" in first["vs_base"][names[0]]
    cuda = "peak_cuda_bytes" in first["base"]
    base_cols = ["prompt", "context", "prefill s", "decode ms/tok", "KV B/tok", "KV MiB"] + (["peak MiB"] if cuda else [])
    drop_cols = ["prefill x", "decode x", "total x"] + (["KV B/tok", "KV MiB"] if kv_detail else []) + ["KV ratio"] \
        + (["ideal x", "realized"] if ideal else []) + (["peak MiB"] if cuda else [])
    rows = []
    for r in per_length:
        b = r["base"]
        row = [str(r["setup"]["prompt_len"]), str(r["context_len"]), f"{b['prefill_s']:.3f}",
               f"{1e3 * b['decode_s'] / (r['setup']['gen_len'] - 1):.1f}", f"{b['kv_bytes_per_token']:.0f}",
               _mib(b["kv_cache_bytes"])] + ([_mib(b["peak_cuda_bytes"])] if cuda else [])
        for n in names:
            vs, d = r["vs_base"][n], r[n]
            row += [_x(vs["speedup"][k]) for k in ("prefill", "decode", "total")]
            if kv_detail:
                row += [f"{d['kv_bytes_per_token']:.0f}", _mib(d["kv_cache_bytes"])]
            row.append(_x(vs["kv_cache_ratio"]))
            if ideal:
                row += [_x(vs["ideal_speedup"]["total"]), _x(vs["realized_gain"]["total"], ".2f")]
            if cuda:
                row.append(_mib(d["peak_cuda_bytes"]))
        rows.append(row)
    header = base_cols + drop_cols * len(names)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    groups = ["base".ljust(sum(widths[:len(base_cols)]) + 2 * (len(base_cols) - 1))]
    for j, n in enumerate(names):
        lo = len(base_cols) + j * len(drop_cols)
        span = sum(widths[lo:lo + len(drop_cols)]) + 2 * (len(drop_cols) - 1)
        groups.append(f"{labels[n]} vs base"[:span].center(span, "-"))
    lines = ["  ".join(groups)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [header] + rows]
    return "\n".join(lines)
