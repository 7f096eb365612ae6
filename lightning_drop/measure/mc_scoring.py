"""Multiple-choice scoring that computes each shared context once: lm-eval's `HFLM` with a faster
`loglikelihood` for requests that share their context.

lm-eval's `HFLM` runs every (context, continuation) pair in full: a HellaSwag question's context is computed
four times and the LM head is applied at every position although only the continuation's positions are read.
`SharedContextLM` groups the requests by their context tokens, runs every distinct context once (several
contexts per batch, left-padded) into a KV cache, expands that cache to one row per continuation, runs the
continuations (right-padded) on it, and applies the LM head only to the positions that are read. The numbers
are those of `HFLM` (same tokenization, same log-softmax dtype, same greedy test), computed in another order.

What keeps the plain `HFLM` path, said once per process in the log:
- requests whose context no other request shares (rolling perplexity windows, tasks with a context per
  choice), contexts of a single token, and pairs that `HFLM` would truncate;
- a hybrid with recurrent token mixers (linear attention, Mamba, convolutions), whose carried state would be
  summed in another order than lm-eval's single pass;
- a model whose cache cannot be reused: a family this project does not describe (its decoder body, `model`,
  GPT-2's `transformer`, ..., is found through the family's description), no output embeddings, a seq2seq
  model, or a first shared group that scores differently from the plain path (checked once per model: a
  family whose decoder takes no position ids or whose cache reordering differs shows it there).

`quiet_git_probe` keeps lm-eval's evaluator, which every evaluation here runs this scorer under, from printing
git's complaint where the working directory is not a repository.

A model with LoRA adapters attached (a peft wrapper, as during or after a recovery fit that does not merge)
is scored through its base model, whose layers carry the adapters: the same numbers as the merged model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import subprocess
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from ..core.architectures import get_spec
from ..errors import UserError
from ..scoring.forward_pass import decoder_body

log = logging.getLogger(__name__)

#: Distinct contexts run in one batch, and continuations run in one batch (the batch's rows sorted by length).
#: Measured with SmolLM2-135M on 64 HellaSwag questions in float32, one torch thread, CPU seconds against HFLM at
#: batch size 4 (a shared 2-core machine): contexts/rows 16/16 1.45x, 32/16 1.70x, 32/32 1.42x, 64/16 1.61x,
#: 64/32 1.57x faster; (8 contexts, all their rows in one batch: 1.62x).
CONTEXTS_PER_BATCH = 32
ROWS_PER_BATCH = 16

#: Token mixers whose cache is keys and values, reused exactly; recurrent mixers keep the plain path.
ATTENTION_KINDS = {"full_attention", "sliding_attention"}

_said: set[str] = set()
# model -> whether its cache reuse matched the plain path on its first shared group (checked once per model)
_verdicts: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()

Request = tuple[tuple[str, str], list[int], list[int]]


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)


class SharedContextLM(HFLM):
    """`HFLM` whose `loglikelihood` computes each context shared by several requests once (see the module)."""

    def __init__(self, *args: Any, contexts_per_batch: int = CONTEXTS_PER_BATCH,
                 rows_per_batch: int = ROWS_PER_BATCH, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if contexts_per_batch < 1 or rows_per_batch < 1:
            raise ValueError(f"contexts_per_batch and rows_per_batch must be >= 1, got {contexts_per_batch}, "
                             f"{rows_per_batch}")
        self.contexts_per_batch, self.rows_per_batch = contexts_per_batch, rows_per_batch
        #: requests scored on a shared context and on the plain path (what the tests and benchmark read)
        self.shared_requests = 0
        self.plain_requests = 0

    # ---- routing
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            fits = len(ctx) + len(cont) <= self.max_length + 1  # HFLM would cut it from the left otherwise
            if len(ctx) > 1 and fits:
                groups.setdefault(tuple(ctx), []).append(i)
        shared = {c: idx for c, idx in groups.items() if len(idx) > 1}
        if not shared:
            if self.backend == "causal":
                _say_once("loglikelihood requests share no context: scored on lm-eval's plain path")
            return self._plain(requests, disable_tqdm, override_bs)
        if not self._reuse_ok(requests, next(iter(shared.items()))):  # said once by the check
            return self._plain(requests, disable_tqdm, override_bs)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        on_shared = {i for idx in shared.values() for i in idx}
        rest = [i for i in range(len(requests)) if i not in on_shared]
        if rest:
            _say_once("loglikelihood requests that share no context with another are scored on lm-eval's plain "
                      "path (the others each context once)")
            for i, ans in zip(rest, self._plain([requests[i] for i in rest], disable_tqdm, override_bs)):
                out[i] = ans
        for i, ans in self._shared(requests, list(shared.items())).items():
            out[i] = ans
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
        return out  # type: ignore[return-value]

    def _plain(self, requests: list[Request], disable_tqdm: bool, override_bs: int | None) -> list[tuple[float, bool]]:
        self.plain_requests += len(requests)
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _reuse_ok(self, requests: list[Request], group: tuple[tuple[int, ...], list[int]]) -> bool:
        """Whether this model's KV cache can be reused: its first shared `group` scores as on the plain path
        (checked once per model object; see the module)."""
        model = causal_lm(self.model)
        if self.backend != "causal" or _decoder(model) is None or model.get_output_embeddings() is None:
            _say_once(f"{type(model).__name__}: no decoder whose cache can be reused; multiple-choice requests "
                      "are scored on lm-eval's plain path")
            return False
        recurrent = sorted(set(get_spec(model).mixer_kinds(model)) - ATTENTION_KINDS)
        if recurrent:
            # a scan or a chunked delta rule carried across the context's end sums in another order than one
            # pass over the whole sequence: per-request differences reached 0.09 nats on a tiny Qwen3-Next, not HFLM's
            _say_once(f"{type(model).__name__}: its {', '.join(recurrent)} mixers carry a recurrent state, which "
                      "is not reused; multiple-choice requests are scored on lm-eval's plain path")
            return False
        if model not in _verdicts:
            idx = group[1]
            try:
                mine = self._score(requests, [group])
            except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError) as err:
                mine, why = None, f"{type(err).__name__}: {err}"
            if mine is not None:
                plain = super()._loglikelihood_tokens([requests[i] for i in idx], disable_tqdm=True)
                worst = max(abs(mine[i][0] - p[0]) / max(1.0, abs(p[0])) for i, p in zip(idx, plain))
                why = "" if worst <= (1e-3 if _float32(model) else 5e-2) else \
                    f"its log-likelihoods differ from the plain path's by up to {worst:.2g} (relative)"
            _verdicts[model] = not why
            if why:
                _say_once(f"{type(model).__name__}: reusing the context's cache failed its check ({why}); "
                          "multiple-choice requests are scored on lm-eval's plain path")
        return _verdicts[model]

    # ---- the shared path
    def _shared(self, requests: list[Request], groups: list[tuple[tuple[int, ...], list[int]]]
                ) -> dict[int, tuple[float, bool]]:
        """{request index: (log-likelihood, greedy)} of the requests in `groups` (context -> request indices)."""
        # contexts of similar lengths share a batch (less left padding); the answers are keyed by request index
        order = sorted(groups, key=lambda g: len(g[0]))
        out: dict[int, tuple[float, bool]] = {}
        for s in range(0, len(order), self.contexts_per_batch):
            out.update(self._score(requests, order[s:s + self.contexts_per_batch]))
        self.shared_requests += len(out)
        return out

    @torch.inference_mode()
    def _score(self, requests: list[Request], groups: Sequence[tuple[tuple[int, ...], list[int]]]
               ) -> dict[int, tuple[float, bool]]:
        """One batch: the contexts (but their last token) once, then every continuation on the cache."""
        from transformers import DynamicCache

        model, dev = causal_lm(self.model), self.device
        pad = 0
        prefix_lens = [len(ctx) - 1 for ctx, _ in groups]
        width = max(prefix_lens)
        # contexts without their last token, left-padded: the continuation rows then follow each context
        # directly, so a position and a cache slot differ by the same padding for every token of the row
        # (sliding-window layers count slots)
        ids = torch.full((len(groups), width), pad, dtype=torch.long)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for g, (ctx, _) in enumerate(groups):
            n = prefix_lens[g]
            ids[g, width - n:] = torch.tensor(ctx[:-1])
            mask[g, width - n:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = DynamicCache(config=model.config)
        decoder = _decoder(model)
        decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                **{_cache_argument(decoder): cache, "use_cache": True})

        # one row per continuation (the context's last token, then the continuation but its last token),
        # rows of similar lengths together (less right padding), each batch of rows on its own copy of the
        # cache rows it continues
        rows = sorted(((g, i) for g, (_, idx) in enumerate(groups) for i in idx), key=lambda r: len(requests[r[1]][2]))
        out: dict[int, tuple[float, bool]] = {}
        for s in range(0, len(rows), self.rows_per_batch):
            out.update(self._continue(requests, groups, rows[s:s + self.rows_per_batch], cache, mask, prefix_lens))
        return out

    def _continue(self, requests: list[Request], groups: Sequence[tuple[tuple[int, ...], list[int]]],
                  rows: list[tuple[int, int]], prefix: Any, prefix_mask: torch.Tensor, prefix_lens: list[int]
                  ) -> dict[int, tuple[float, bool]]:
        """Rows (group, request index) run on their contexts' cache; the LM head only where a token is read."""
        model, dev = causal_lm(self.model), self.device
        conts = [requests[i][2] for _, i in rows]
        lens = [len(c) for c in conts]
        span = max(lens)
        cont_ids = torch.zeros((len(rows), span), dtype=torch.long)
        read = torch.zeros((len(rows), span), dtype=torch.bool)
        for r, ((g, _), cont) in enumerate(zip(rows, conts)):
            cont_ids[r, :len(cont)] = torch.tensor([groups[g][0][-1], *cont[:-1]])
            read[r, :len(cont)] = True
        read = read.to(dev)
        which = torch.tensor([g for g, _ in rows], device=dev)
        cache = _rows_of(prefix, which)
        full_mask = torch.cat([prefix_mask.index_select(0, which), read.long()], dim=1)
        start = torch.tensor(prefix_lens, device=dev).index_select(0, which)
        positions = start[:, None] + torch.arange(span, device=dev)[None, :]
        decoder = _decoder(model)
        hidden = decoder(input_ids=cont_ids.to(dev), attention_mask=full_mask, position_ids=positions,
                         **{_cache_argument(decoder): cache, "use_cache": True}).last_hidden_state
        logits = _head(model, hidden[read])  # only the positions that are read
        logp = torch.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        target = torch.tensor([t for c in conts for t in c], device=dev)
        token_lp = logp.gather(1, target[:, None]).squeeze(1)
        greedy = logits.argmax(dim=-1) == target
        out = {}
        for (_, i), lp, hit in zip(rows, token_lp.split(lens), greedy.split(lens)):
            out[i] = (float(lp.sum()), bool(hit.all()))
        return out


@contextlib.contextmanager
def quiet_git_probe() -> Iterator[None]:
    """lm-eval's evaluator records the git commit of the working directory by running `git describe` with the
    terminal as its stderr, so outside a repository every evaluation prints "fatal: not a git repository".
    lm-eval has no switch for it; inside this context its probe asks git with git's stderr captured (kept in
    the debug log): the commit is recorded as before, None outside a repository, and every other message of
    the evaluation still reaches the terminal."""
    import lm_eval.evaluator as evaluator

    real = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = real


def _git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash`, with git's complaint captured instead of printed."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError as err:  # no git on this machine
        log.debug("git describe: %s", err)
    else:
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
        log.debug("git describe: %s", done.stderr.strip())
    return get_commit_from_path(os.getcwd())


def causal_lm(model: torch.nn.Module) -> Any:
    """The transformers causal LM that does the computing: under a peft wrapper its base model, whose layers
    carry the (unmerged) adapters, so a context run through its decoder sees them. The wrapper's own `.model`
    is the whole causal LM, not its decoder, which would make every request take the plain path."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The causal LM's decoder body (without its head), found through its family's description; None for a
    model no family describes, or whose body is the whole model."""
    try:
        body = decoder_body(model)
    except UserError:
        return None
    return body if body is not model else None


def _rows_of(cache: Any, which: torch.Tensor) -> Any:
    """A cache holding row `which[r]` of `cache` as its row r, `cache` left as it is: each layer is a shallow
    copy reordered by transformers' own `reorder_cache` (which assigns new tensors; a layer that stores
    nothing, a dropped attention's, reorders nothing)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.reorder_cache(which)
    return out


def _cache_argument(decoder: torch.nn.Module) -> str:
    """The decoder's name for the cache it reads and extends (`cache` since transformers 5.x renamed it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _float32(model: torch.nn.Module) -> bool:
    return next(model.parameters()).dtype == torch.float32


def _head(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits from final hidden states: its output embeddings, then the family's own scaling
    (Gemma's soft cap, Cohere's scale, Granite's divisor) where its config has one."""
    logits = model.get_output_embeddings()(hidden)
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(cfg, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
