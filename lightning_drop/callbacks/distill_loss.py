"""The losses of `Distillation`: KL to the teacher and the LM loss from one pass over the logits.

Over a vocabulary of 50k tokens the logits of one batch are hundreds of MB, and every elementwise pass over
them costs about as much as a decoder layer on a CPU. `kd_and_lm_loss` therefore computes both losses with
one log-normalizer of the student's logits and its own backward (the gradient of `a * KL + b * CE` with
respect to the logits is `softmax(s) * (a' + b') - a' * p_teacher - b' * onehot(label)`, built in place), where
autograd through `log_softmax` twice would make about ten passes. `kd_loss` is the plain definition, kept
for measurements and as the reference the fused one is tested against. `topk_kd_loss` / `topk_kd_and_lm_loss`
are the same pair for a teacher stored as its top-k log-probabilities (`lightning_drop.io.teacher_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, real: torch.Tensor | None,
            temperature: float = 1.0) -> torch.Tensor:
    """`T^2 * KL(teacher || student)` of softmax(logits / T), averaged over the real tokens (`real` [B, L]
    bool, None for all); the T^2 keeps its gradients on the LM loss's scale whatever T."""
    vocab = student_logits.shape[-1]
    s, t = student_logits, teacher_logits.to(student_logits.device)
    if real is not None:
        s, t = s[real], t[real]
    s, t = _wide(s.reshape(-1, vocab)) / temperature, _wide(t.reshape(-1, vocab)) / temperature
    if s.shape[0] == 0:
        return s.sum()  # no real token: zero, still part of the graph
    log_p_t = F.log_softmax(t, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum(-1)
    return per_token.mean() * temperature ** 2


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product over the last dimension without a full-size temporary (a batched matmul)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1))[..., 0, 0]


def _lm_loss(s: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The next-token LM loss from logits `s` and their log-normalizer `lse`: position l predicts
    labels[l + 1] (-100: not a target), as transformers does; also what its backward needs."""
    target = labels[:, 1:]
    valid = (target != -100).to(s.dtype)
    n_valid = valid.sum().clamp_min(1.0)
    picked = s[:, :-1].gather(-1, target.clamp_min(0).unsqueeze(-1))[..., 0]
    return ((lse[:, :-1] - picked) * valid).sum() / n_valid, target, valid, n_valid


def _softmax_terms(s: torch.Tensor, temp: float, lse_t: torch.Tensor, lse: torch.Tensor, g_kd: torch.Tensor,
                   g_lm: torch.Tensor, w: torch.Tensor, n_real: torch.Tensor, valid: torch.Tensor,
                   n_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's side of both gradients, `c_kd * softmax(s / T) + c_lm * softmax(s)` (one new buffer), with
    the per-position weights [B, L]: `c_kd` of the KL (`T * w / n`) and `c_lm` of the LM loss (`valid / m`)."""
    c_kd = g_kd * temp * w / n_real
    c_lm = torch.zeros_like(w)
    c_lm[:, :-1] = g_lm * valid / n_valid
    scaled = s if temp == 1.0 else s / temp
    grad = (scaled - lse_t.unsqueeze(-1)).exp_()
    if temp == 1.0:
        grad.mul_((c_kd + c_lm).unsqueeze(-1))
    else:
        grad.mul_(c_kd.unsqueeze(-1)).add_((s - lse.unsqueeze(-1)).exp_().mul_(c_lm.unsqueeze(-1)))
    return grad, c_kd, c_lm


class _KDAndLM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                real: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = _wide(logits)
        t = teacher_logits.to(device=s.device, dtype=s.dtype)
        scaled = s if temperature == 1.0 else s / temperature
        log_p_t = F.log_softmax(t if temperature == 1.0 else t / temperature, dim=-1)
        p_t = log_p_t.exp()
        neg_entropy = _dot(p_t, log_p_t)
        del log_p_t, t
        lse_t = torch.logsumexp(scaled, dim=-1)
        w = real.to(s.dtype)
        n_real = w.sum().clamp_min(1.0)
        kl = neg_entropy - _dot(p_t, scaled) + lse_t  # KL(p_t || softmax(s / T)) per position
        kd = (kl * w).sum() / n_real * temperature ** 2
        lse = lse_t if temperature == 1.0 else torch.logsumexp(s, dim=-1)
        lm, target, valid, n_valid = _lm_loss(s, lse, labels)
        ctx.save_for_backward(s, p_t, lse_t, lse, w, n_real, target, valid, n_valid)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return kd, lm

    @staticmethod
    def backward(ctx: Any, g_kd: torch.Tensor, g_lm: torch.Tensor) -> tuple[Any, ...]:
        s, p_t, lse_t, lse, w, n_real, target, valid, n_valid = ctx.saved_tensors
        temp = ctx.temperature
        # d kd / d s = T * w / n * (softmax(s / T) - p_t); d lm / d s = valid / m * (softmax(s) - onehot)
        grad, c_kd, c_lm = _softmax_terms(s, temp, lse_t, lse, g_kd, g_lm, w, n_real, valid, n_valid)
        grad.addcmul_(p_t, c_kd.unsqueeze(-1), value=-1.0)
        grad[:, :-1].scatter_add_(-1, target.clamp_min(0).unsqueeze(-1), -c_lm[:, :-1].unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


def kd_and_lm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   real: torch.Tensor | None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(`kd_loss`, the causal LM loss as transformers computes it from `labels`) with one fused backward.

    `real` [B, L] marks the positions whose next-token distributions are compared (None: all); `labels`
    [B, L] uses -100 for positions that are not targets. Padding positions cost a pass but weigh nothing.
    """
    real = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device) \
        if real is None else real.to(student_logits.device)
    return _KDAndLM.apply(student_logits, teacher_logits, labels.to(student_logits.device), real, float(temperature))


# ------------------------------------------------------------------------------- stored top-k teacher
def teacher_buckets(logprobs: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [..., k], tail mass [...]) of a stored top-k: the teacher's distribution coarsened to
    its k tokens plus one bucket for all others. The tail is 1 - the top-k mass (none when k spans the
    vocabulary); when rounding of the stored values makes the top-k mass exceed 1, the buckets are
    rescaled to sum to 1."""
    lp = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
    q = lp.exp()
    mass = q.sum(-1)
    tail = torch.zeros_like(mass) if logprobs.shape[-1] >= vocab else (1.0 - mass).clamp_min(0.0)
    total = mass + tail
    return q / total.unsqueeze(-1), tail / total


def topk_kd_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                 real: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """`T^2 * KL(teacher || student)` over the teacher's stored top-k tokens and one tail bucket, averaged
    over the real tokens: the plain definition (autograd), the reference of `topk_kd_and_lm_loss`.

    `teacher_logprobs` / `teacher_ids` [B, L, k]: the k largest log-probabilities of the teacher's
    softmax(logits / T) and their token ids (`teacher_logits.TeacherLogitStore`). Both distributions are
    coarsened to the k tokens plus "any other token": this is the KL of those (k+1)-way distributions, so it
    is >= 0, zero when the student matches the teacher's top-k probabilities and its total tail mass, never
    above the full KL (coarsening loses information), and equal to it when k is the vocabulary size. The
    alternative, renormalizing the teacher over its top-k, would teach the student to put the teacher's
    tail mass on the top-k tokens (overconfidence); how the student spreads its tail is left to the LM loss.
    """
    vocab = student_logits.shape[-1]
    dev = student_logits.device
    s, lp, ids = student_logits, teacher_logprobs.to(dev), teacher_ids.to(device=dev, dtype=torch.long)
    if real is not None:
        s, lp, ids = s[real], lp[real], ids[real]
    s = _wide(s.reshape(-1, vocab)) / temperature
    lp, ids = lp.reshape(s.shape[0], -1).to(s.dtype), ids.reshape(s.shape[0], -1)
    if s.shape[0] == 0:
        return s.sum()
    q, tail = teacher_buckets(lp, vocab)
    log_p = F.log_softmax(s, dim=-1)
    per_token = (torch.special.xlogy(q, q) - q * log_p.gather(-1, ids)).sum(-1)
    if ids.shape[-1] < vocab:
        log_p_tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
        per_token = per_token + torch.special.xlogy(tail, tail) - tail * log_p_tail
    return per_token.mean() * temperature ** 2


class _TopKKDAndLM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                labels: torch.Tensor, real: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = _wide(logits)
        ids = teacher_ids.to(device=s.device, dtype=torch.long)
        q, tail = teacher_buckets(teacher_logprobs.to(device=s.device, dtype=s.dtype), s.shape[-1])
        has_tail = ids.shape[-1] < s.shape[-1]
        scaled = s if temperature == 1.0 else s / temperature
        lse_t = torch.logsumexp(scaled, dim=-1)
        log_p_k = scaled.gather(-1, ids) - lse_t.unsqueeze(-1)
        kl = (torch.special.xlogy(q, q) - q * log_p_k).sum(-1)
        if has_tail:  # log of the student's mass outside the teacher's top-k, without cancellation
            lse_tail = torch.logsumexp(scaled.scatter(-1, ids, float("-inf")), dim=-1)
            kl = kl + torch.special.xlogy(tail, tail) - tail * (lse_tail - lse_t)
        else:
            lse_tail = lse_t  # unused
        w = real.to(s.dtype)
        n_real = w.sum().clamp_min(1.0)
        kd = (kl * w).sum() / n_real * temperature ** 2
        lse = lse_t if temperature == 1.0 else torch.logsumexp(s, dim=-1)
        lm, target, valid, n_valid = _lm_loss(s, lse, labels)
        ctx.save_for_backward(s, ids, q, tail, lse_t, lse_tail, lse, w, n_real, target, valid, n_valid)
        ctx.temperature, ctx.dtype, ctx.has_tail = temperature, logits.dtype, has_tail
        return kd, lm

    @staticmethod
    def backward(ctx: Any, g_kd: torch.Tensor, g_lm: torch.Tensor) -> tuple[Any, ...]:
        s, ids, q, tail, lse_t, lse_tail, lse, w, n_real, target, valid, n_valid = ctx.saved_tensors
        temp = ctx.temperature
        # d kd / d s = T * w / n * (softmax(s / T) - q on the top-k - tail * softmax of the rest(s / T) off it)
        grad, c_kd, c_lm = _softmax_terms(s, temp, lse_t, lse, g_kd, g_lm, w, n_real, valid, n_valid)
        if ctx.has_tail:  # exp of at most 0 off the top-k; the top-k entries are zeroed, not used
            scaled = s if temp == 1.0 else s / temp
            rest = (scaled - lse_tail.unsqueeze(-1)).clamp_max_(0.0).exp_().scatter_(-1, ids, 0.0)
            grad.addcmul_(rest, (tail * c_kd).unsqueeze(-1), value=-1.0)
            del rest
        grad.scatter_add_(-1, ids, -q * c_kd.unsqueeze(-1))
        grad[:, :-1].scatter_add_(-1, target.clamp_min(0).unsqueeze(-1), -c_lm[:, :-1].unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None, None


def topk_kd_and_lm_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                        labels: torch.Tensor, real: torch.Tensor | None,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(`topk_kd_loss`, the causal LM loss) with one fused backward, as `kd_and_lm_loss` for a dense teacher.

    The stored log-probabilities must be of softmax(teacher logits / `temperature`) (the store's manifest
    records its temperature). Costs one more pass over the logits than the dense loss (the tail's
    log-normalizer) and none over teacher logits.
    """
    real = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device) \
        if real is None else real.to(student_logits.device)
    return _TopKKDAndLM.apply(student_logits, teacher_logprobs, teacher_ids, labels.to(student_logits.device), real,
                              float(temperature))


def hidden_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                real: torch.Tensor | None, layers: Sequence[int]) -> torch.Tensor:
    """Mean over `layers` of MSE(student, teacher) / mean(teacher^2) at those blocks' outputs (`states[i + 1]`
    of `output_hidden_states`), over real tokens: normalized, so every depth weighs the same."""
    losses = []
    for i in layers:
        s, t = student_states[i + 1], teacher_states[i + 1].to(student_states[i + 1].device)
        if real is not None:
            s, t = s[real], t[real]
        s, t = s.float(), t.float()
        losses.append(F.mse_loss(s, t) / t.square().mean().clamp_min(1e-12))
    return torch.stack(losses).mean()
