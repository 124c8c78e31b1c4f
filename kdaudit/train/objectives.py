"""Divergences between teacher and student next-token distributions, as pure functions.

Notation: p is the teacher distribution and q the student distribution over the vocabulary at
one position; every per-token value is a sum over the vocabulary.

    forward_kl        KL(p || q) = sum p (log p - log q)        (true KL, teacher entropy included)
    reverse_kl        KL(q || p)
    generalized_jsd   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,
                      0 < beta < 1 (GKD, Agarwal et al.)
    total_variation   1/2 sum |p - q|
    skew_forward_kl   KL(p || alpha p + (1 - alpha) q),  0 <= alpha <= 1 (DistiLLM)
    skew_reverse_kl   KL(q || (1 - alpha) p + alpha q),  0 <= alpha <= 1 (DistiLLM)

All share one signature: `(student_logits, teacher_logits, mask, *, temperature=1.0,
reduction="mean")` plus `beta` or `alpha` where the divergence has one. Logits are
(batch, seq, vocab) in any float dtype; `mask` is (batch, seq), bool or 0/1, and marks the
positions that count (response tokens).

Conventions worth knowing:
- The temperature divides both sets of logits before the softmax. These functions do NOT
  multiply by temperature**2; the caller does that for the KD term when it wants the usual
  gradient scale.
- Only the masked-in positions are gathered before any arithmetic, so whatever sits at the
  other positions (inf, nan, huge values) never reaches the values or the gradients; their
  gradient is exactly zero.
- Everything is computed in log space (log_softmax, logaddexp for mixtures) in float32, or in
  float64 when either input is float64. A -inf logit (e.g. a padded vocabulary entry) is
  replaced by the most negative finite number, so its probability is exactly 0, 0 log 0 = 0,
  and no inf - inf ever appears in values or gradients.
- reduction="mean" averages the per-token values over all masked-in tokens of the batch
  (0 when there are none); reduction="none" returns one value per sequence, the mean over
  that sequence's masked-in tokens (0 for a sequence without any), as DP-SGD needs
  per-sample losses.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "none")


# ----------------------------------------------------------------------------------------------
# per-token kernels on gathered log-probabilities of shape (tokens, vocab)

def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row. Log-probs are finite (see _log_probs), so exp(log_a) = 0 gives 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b); the endpoints w = 0 and w = 1 skip the log(0) they would need."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _forward_kl_tokens(logp: Tensor, logq: Tensor) -> Tensor:
    return _kl(logp, logq)


def _reverse_kl_tokens(logp: Tensor, logq: Tensor) -> Tensor:
    return _kl(logq, logp)


def _generalized_jsd_tokens(logp: Tensor, logq: Tensor, beta: float = 0.1) -> Tensor:
    logm = _log_mixture(logp, logq, beta)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def _total_variation_tokens(logp: Tensor, logq: Tensor) -> Tensor:
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def _skew_forward_kl_tokens(logp: Tensor, logq: Tensor, alpha: float = 0.1) -> Tensor:
    return _kl(logp, _log_mixture(logp, logq, alpha))


def _skew_reverse_kl_tokens(logp: Tensor, logq: Tensor, alpha: float = 0.1) -> Tensor:
    return _kl(logq, _log_mixture(logp, logq, 1.0 - alpha))


# name -> (kernel(logp, logq, **params), names of the keyword parameters it accepts)
_KERNELS: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "forward_kl": (_forward_kl_tokens, ()),
    "reverse_kl": (_reverse_kl_tokens, ()),
    "generalized_jsd": (_generalized_jsd_tokens, ("beta",)),
    "total_variation": (_total_variation_tokens, ()),
    "skew_forward_kl": (_skew_forward_kl_tokens, ("alpha",)),
    "skew_reverse_kl": (_skew_reverse_kl_tokens, ("alpha",)),
}


# ----------------------------------------------------------------------------------------------
# validation and plumbing

def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 < beta < 1.0:  # also rejects nan
        raise ValueError(f"generalized_jsd needs 0 < beta (jsd_beta) < 1 strictly, got {beta}")
    return beta


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew KL needs 0 <= alpha (skew_alpha) <= 1, got {alpha}")
    return alpha


def _check_pair(student: Tensor, teacher: Tensor, kind: str, dims: str,
                temperature: float) -> None:
    """Both floating tensors of the same shape with len(dims) axes, and a usable temperature;
    `kind` names them in the message ("logits", "rows")."""
    for name, t in ((f"student_{kind}", student), (f"teacher_{kind}", teacher)):
        if t.dim() != len(dims.split(",")) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating ({dims}) tensor, "
                             f"got dtype {t.dtype} and shape {tuple(t.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher {kind} differ in shape: "
                         f"{tuple(student.shape)} vs {tuple(teacher.shape)} "
                         f"(align the vocabularies before distilling)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                  temperature: float) -> None:
    _check_pair(student_logits, teacher_logits, "logits", "batch, seq, vocab", temperature)
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask must have shape (batch, seq) = {tuple(student_logits.shape[:2])}, "
                         f"got {tuple(mask.shape)}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_probs(logits: Tensor, mask: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """Log-softmax of logits/temperature at the masked-in positions only: (tokens, vocab).

    Boolean indexing gathers a fresh copy, so the in-place ops below never touch the caller's
    tensor, and positions outside the mask get an exactly-zero gradient whatever they hold
    (it also skips the prompt tokens' work, at the price of one host sync on GPU).
    """
    return _normalized(logits[mask].to(dtype), temperature, dtype)


def _normalized(z: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """log_softmax(z / temperature) of a (tokens, vocab) tensor the caller no longer needs
    (it is changed in place)."""
    if temperature != 1.0:
        z.div_(temperature)
    # -inf -> most negative finite: probability still exactly 0, but log-probs stay finite
    z.masked_fill_(torch.isneginf(z), torch.finfo(dtype).min)
    return F.log_softmax(z, dim=-1)


def _kernel(name: str, params: dict[str, float]
            ) -> tuple[Callable[..., Tensor], dict[str, float]]:
    """The per-token kernel of divergence `name` and its parameters, checked."""
    if name not in _KERNELS:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(_KERNELS)}")
    kernel, accepted = _KERNELS[name]
    unexpected = set(params) - set(accepted)
    if unexpected:
        raise TypeError(f"{name} got unexpected parameters {sorted(unexpected)}; "
                        f"it accepts {list(accepted) or 'none'}")
    if "beta" in params:
        params = {**params, "beta": _check_beta(params["beta"])}
    if "alpha" in params:
        params = {**params, "alpha": _check_alpha(params["alpha"])}
    return kernel, params


def _token_values(name: str, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                  temperature: float, params: dict[str, float]) -> Tensor:
    """The divergence at each masked-in token, as a flat (tokens,) tensor."""
    kernel, params = _kernel(name, params)
    _check_inputs(student_logits, teacher_logits, mask, temperature)
    mask = mask.to(torch.bool)
    dtype = _compute_dtype(student_logits, teacher_logits)
    logq = _log_probs(student_logits, mask, temperature, dtype)
    logp = _log_probs(teacher_logits, mask, temperature, dtype)
    return kernel(logp, logq, **params)


def divergence_rows(name: str, student_rows: Tensor, teacher_rows: Tensor, *,
                    temperature: float = 1.0, **params: float) -> Tensor:
    """The divergence at each of a (tokens, vocab) pair of logit rows already gathered at the
    positions that count (unnormalised or log-probabilities: both are renormalised): (tokens,).
    The same values as `per_token` at those positions."""
    kernel, params = _kernel(name, params)
    _check_pair(student_rows, teacher_rows, "rows", "tokens, vocab", temperature)
    dtype = _compute_dtype(student_rows, teacher_rows)
    logq = _normalized(student_rows.to(dtype, copy=True), temperature, dtype)
    logp = _normalized(teacher_rows.to(dtype, copy=True), temperature, dtype)
    return kernel(logp, logq, **params)


def _scatter(values: Tensor, mask: Tensor) -> Tensor:
    """Put flat per-token values back at their (batch, seq) positions; zeros elsewhere."""
    mask = mask.to(torch.bool)
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def per_token(divergence_name: str, student_logits: Tensor, teacher_logits: Tensor,
              mask: Tensor | None = None, *, temperature: float = 1.0,
              **params: float) -> Tensor:
    """Per-token divergence of shape (batch, seq); 0 where `mask` is false (default: all true).

    `params` are the divergence's own parameters (`beta` or `alpha`).
    """
    if mask is None:
        mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    values = _token_values(divergence_name, student_logits, teacher_logits, mask,
                           temperature, params)
    return _scatter(values, mask)


def _divergence(name: str, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                temperature: float, reduction: str, **params: float) -> Tensor:
    """Compute one divergence and reduce it: a scalar ("mean") or one value per sequence ("none")."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    values = _token_values(name, student_logits, teacher_logits, mask, temperature, params)
    if reduction == "mean":
        return values.sum() / max(values.numel(), 1)
    mask = mask.to(torch.bool)
    counts = mask.sum(dim=1).clamp_min(1).to(values.dtype)
    return _scatter(values, mask).sum(dim=1) / counts


# ----------------------------------------------------------------------------------------------
# public divergences

def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
               temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """KL(p || q), teacher to student: mode-covering, the classic KD objective."""
    return _divergence("forward_kl", student_logits, teacher_logits, mask, temperature, reduction)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
               temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """KL(q || p), student to teacher: mode-seeking (MiniLLM-style)."""
    return _divergence("reverse_kl", student_logits, teacher_logits, mask, temperature, reduction)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
                    beta: float = 0.1, temperature: float = 1.0,
                    reduction: str = "mean") -> Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q, 0 < beta < 1 (GKD)."""
    return _divergence("generalized_jsd", student_logits, teacher_logits, mask, temperature,
                       reduction, beta=beta)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
                    temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """1/2 sum |p - q|: a bounded, symmetric distance in [0, 1]."""
    return _divergence("total_variation", student_logits, teacher_logits, mask, temperature,
                       reduction)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
                    alpha: float = 0.1, temperature: float = 1.0,
                    reduction: str = "mean") -> Tensor:
    """KL(p || alpha p + (1 - alpha) q), 0 <= alpha <= 1 (DistiLLM); alpha = 0 is forward KL."""
    return _divergence("skew_forward_kl", student_logits, teacher_logits, mask, temperature,
                       reduction, alpha=alpha)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
                    alpha: float = 0.1, temperature: float = 1.0,
                    reduction: str = "mean") -> Tensor:
    """KL(q || (1 - alpha) p + alpha q), 0 <= alpha <= 1 (DistiLLM); alpha = 0 is reverse KL."""
    return _divergence("skew_reverse_kl", student_logits, teacher_logits, mask, temperature,
                       reduction, alpha=alpha)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}
