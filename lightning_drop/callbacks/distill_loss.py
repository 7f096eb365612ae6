"""The losses of `Distillation`: KL to the teacher and the LM loss from one pass over the logits.

Over a vocabulary of 50k tokens the logits of one batch are hundreds of MB, and every elementwise pass over
them costs about as much as a decoder layer on a CPU. `kd_and_lm_loss` therefore computes both losses with
one log-normalizer of the student's logits and its own backward (the gradient of `a * KL + b * CE` with
respect to the logits is `softmax(s) * (a' + b') - a' * p_teacher - b' * onehot(label)`, built in place), where
autograd through `log_softmax` twice would make about ten passes. `kd_loss` is the plain definition, kept
for measurements and as the reference the fused one is tested against.
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
        # next-token LM loss: position l predicts labels[l + 1] (-100: not a target), as transformers does
        target = labels[:, 1:]
        valid = (target != -100).to(s.dtype)
        n_valid = valid.sum().clamp_min(1.0)
        lse = lse_t if temperature == 1.0 else torch.logsumexp(s, dim=-1)
        picked = s[:, :-1].gather(-1, target.clamp_min(0).unsqueeze(-1))[..., 0]
        lm = ((lse[:, :-1] - picked) * valid).sum() / n_valid
        ctx.save_for_backward(s, p_t, lse_t, lse, w, n_real, target, valid, n_valid)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return kd, lm

    @staticmethod
    def backward(ctx: Any, g_kd: torch.Tensor, g_lm: torch.Tensor) -> tuple[Any, ...]:
        s, p_t, lse_t, lse, w, n_real, target, valid, n_valid = ctx.saved_tensors
        temp = ctx.temperature
        # d kd / d s = T * w / n * (softmax(s / T) - p_t); d lm / d s = valid / m * (softmax(s) - onehot)
        c_kd = g_kd * temp * w / n_real  # [B, L]
        c_lm = torch.zeros_like(w)
        c_lm[:, :-1] = g_lm * valid / n_valid
        scaled = s if temp == 1.0 else s / temp
        grad = (scaled - lse_t.unsqueeze(-1)).exp_()
        if temp == 1.0:
            grad.mul_((c_kd + c_lm).unsqueeze(-1))
        else:
            grad.mul_(c_kd.unsqueeze(-1)).add_((s - lse.unsqueeze(-1)).exp_().mul_(c_lm.unsqueeze(-1)))
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
