"""Reference-model membership-inference attacks: LiRA and RMIA (kdaudit's docs/methods.md §8).

Higher score = more likely a member.  Every function takes a per-example statistic computed by
the caller under the target model and under K reference models, plus the K×N boolean
inclusion mask saying which reference trained on which example.

* **LiRA** (Carlini et al. 2022).  The statistic ``s(x)`` is the mean response-token
  log-probability.  Per example, ``μ_in(x)`` / ``μ_out(x)`` are the means of ``s`` over the
  references that did / did not train on ``x``.  The variances are *global*, one per side: the
  pooled within-example variance, i.e. the residuals ``s_ref(x) − μ(x)`` of that side pooled
  over all examples and divided by their degrees of freedom ``Σ_x (n(x) − 1)`` (equivalently
  the ``(n(x) − 1)``-weighted mean of the per-example unbiased variances).  With a handful of
  references a per-example variance is mostly noise; the pooled one is not.
  Online score: ``log N(s; μ_in, σ_in) − log N(s; μ_out, σ_out)``.
  Offline score: ``Φ((s − μ_out) / σ_out)``.
* **RMIA** (Zarifzadeh et al. 2024).  ``q(x) = exp(mean response-token log-probability)``;
  ``LR(x) = q(x) / Pr(x)`` with ``Pr(x)`` the mean of ``q`` over all references (online) or
  ``((1 + a)·mean_OUT q + (1 − a)) / 2`` over OUT references (offline).  The score is the
  fraction of population records ``z`` with ``LR(x) / LR(z) > γ``.

Examples whose score is undefined (no IN or no OUT reference where one is needed) get NaN,
never a made-up number, and a :class:`UndefinedScoreWarning` states how many.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

__all__ = [
    "UndefinedScoreWarning",
    "fit_lira",
    "lira_scores",
    "rmia_scores",
    "choose_rmia_a",
]


class UndefinedScoreWarning(RuntimeWarning):
    """Some examples got a NaN score because the references cannot define one."""


# ---------------------------------------------------------------------------------------------
# input validation


def _float_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains infinite values")
    return arr


def _ref_matrix(name: str, value: Any) -> np.ndarray:
    arr = _float_array(name, value, 2)
    if arr.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 reference models (rows), got {arr.shape[0]}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no examples (columns)")
    return arr


def _mask(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr


def _vector(name: str, value: Any, n: int) -> np.ndarray:
    arr = _float_array(name, value, 1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n}")
    return arr


def _check_a(a: float) -> float:
    a = float(a)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a must lie in [0, 1], got {a}")
    return a


def _warn_undefined(n_nan: int, n_total: int, why: str) -> None:
    if n_nan:
        warnings.warn(f"{n_nan} of {n_total} examples have {why}; their scores are NaN",
                      UndefinedScoreWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# LiRA


def _pooled_sigma(stats: np.ndarray, mask: np.ndarray, mu: np.ndarray) -> float:
    """Pooled within-example standard deviation of the masked entries (NaN without dof)."""
    counts = mask.sum(axis=0)
    dof = int(np.maximum(counts - 1, 0).sum())
    if dof == 0:
        return math.nan
    resid = np.where(mask, stats - np.where(counts > 0, mu, 0.0), 0.0)
    return math.sqrt(float((resid**2).sum()) / dof)


def fit_lira(ref_stats: np.ndarray, ref_in: np.ndarray) -> dict:
    """Fit LiRA's IN/OUT Gaussians from K reference models.

    Returns ``mu_in``, ``mu_out`` (N,; NaN where that side has no reference), the global
    ``sigma_in``, ``sigma_out`` (floats; pooled within-example standard deviations, NaN when
    no example has two references on that side) and the counts ``n_in``, ``n_out`` (N,).
    """
    stats = _ref_matrix("ref_stats", ref_stats)
    mask = _mask("ref_in", ref_in, stats.shape)
    out = ~mask
    n_in = mask.sum(axis=0)
    n_out = out.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(n_in > 0, np.where(mask, stats, 0.0).sum(axis=0) / n_in, np.nan)
        mu_out = np.where(n_out > 0, np.where(out, stats, 0.0).sum(axis=0) / n_out, np.nan)
    return {
        "mu_in": mu_in,
        "mu_out": mu_out,
        "sigma_in": _pooled_sigma(stats, mask, mu_in),
        "sigma_out": _pooled_sigma(stats, out, mu_out),
        "n_in": n_in,
        "n_out": n_out,
    }


def _usable_sigma(name: str, sigma: float) -> float:
    if not math.isfinite(sigma):
        raise ValueError(f"{name} cannot be estimated: no example has two references on that side")
    if sigma <= 0.0:
        raise ValueError(f"{name} is zero: the reference statistics do not vary")
    return sigma


def lira_scores(target_stat: np.ndarray, ref_stats: np.ndarray, ref_in: np.ndarray, *,
                online: bool = True) -> np.ndarray:
    """LiRA membership scores for the target's statistic ``target_stat`` (N,).

    Online: Gaussian log-likelihood ratio IN vs OUT (NaN where an example lacks an IN or an
    OUT reference).  Offline: one-sided ``Φ((s − μ_out) / σ_out)`` (NaN without OUT reference).
    """
    params = fit_lira(ref_stats, ref_in)
    s = _vector("target_stat", target_stat, params["mu_out"].shape[0])
    n = s.shape[0]
    sigma_out = _usable_sigma("sigma_out", params["sigma_out"])
    z_out = (s - params["mu_out"]) / sigma_out
    if not online:
        undefined = params["n_out"] == 0
        _warn_undefined(int(undefined.sum()), n, "no OUT reference")
        scores = norm.cdf(z_out)
        scores[undefined] = np.nan
        return scores
    sigma_in = _usable_sigma("sigma_in", params["sigma_in"])
    z_in = (s - params["mu_in"]) / sigma_in
    undefined = (params["n_in"] == 0) | (params["n_out"] == 0)
    _warn_undefined(int(undefined.sum()), n, "no IN or no OUT reference")
    scores = math.log(sigma_out) - math.log(sigma_in) + 0.5 * (z_out**2 - z_in**2)
    scores[undefined] = np.nan
    return scores


# ---------------------------------------------------------------------------------------------
# RMIA


def _log_mean_q(ref_logq: np.ndarray, ref_in: np.ndarray, offline: bool) -> np.ndarray:
    """log of the mean q per column over all references (online) or the OUT ones (offline).

    NaN where offline and the column has no OUT reference.
    """
    if not offline:
        return logsumexp(ref_logq, axis=0) - math.log(ref_logq.shape[0])
    out = ~ref_in
    n_out = out.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mean = logsumexp(np.where(out, ref_logq, -np.inf), axis=0) - np.log(n_out)
    return np.where(n_out > 0, log_mean, np.nan)


def _log_pr(log_mean: np.ndarray, offline: bool, a: float) -> np.ndarray:
    """log Pr(x): the reference mean online, log(((1 + a)·m + (1 − a)) / 2) offline."""
    if not offline or a == 1.0:
        return log_mean
    with np.errstate(invalid="ignore"):  # NaN (no OUT reference) stays NaN
        return np.logaddexp(math.log1p(a) + log_mean, math.log(1.0 - a)) - math.log(2.0)


def _rmia(target_logq: np.ndarray, log_mean_x: np.ndarray, pop_target_logq: np.ndarray,
          log_mean_z: np.ndarray, offline: bool, a: float,
          gamma: float) -> tuple[np.ndarray, int]:
    """RMIA scores from the reference means; also the number of unusable population records."""
    log_lr_x = target_logq - _log_pr(log_mean_x, offline, a)
    log_lr_z = pop_target_logq - _log_pr(log_mean_z, offline, a)
    usable = np.isfinite(log_lr_z)
    if not usable.any():
        raise ValueError("no population record has an OUT reference; RMIA cannot compare")
    sorted_z = np.sort(log_lr_z[usable])
    # LR(x) / LR(z) > γ  ⇔  log LR(z) < log LR(x) − log γ: count strictly smaller entries
    defined = np.isfinite(log_lr_x)
    counts = np.searchsorted(sorted_z, log_lr_x[defined] - math.log(gamma), side="left")
    scores = np.full(log_lr_x.shape, np.nan)
    scores[defined] = counts / sorted_z.size
    return scores, int((~usable).sum())


def _rmia_inputs(target_logq: Any, ref_logq: Any, ref_in: Any, pop_target_logq: Any,
                 pop_ref_logq: Any, pop_ref_in: Any) -> tuple[np.ndarray, ...]:
    refs = _ref_matrix("ref_logq", ref_logq)
    k, n = refs.shape
    mask = _mask("ref_in", ref_in, refs.shape)
    target = _vector("target_logq", target_logq, n) if target_logq is not None else None
    pop_refs = _float_array("pop_ref_logq", pop_ref_logq, 2)
    if pop_refs.shape[0] != k:
        raise ValueError(f"pop_ref_logq has {pop_refs.shape[0]} reference rows, ref_logq has {k}")
    if pop_refs.shape[1] == 0:
        raise ValueError("the population is empty")
    m = pop_refs.shape[1]
    pop_target = (_vector("pop_target_logq", pop_target_logq, m)
                  if pop_target_logq is not None else None)
    pop_mask = (np.zeros((k, m), dtype=bool) if pop_ref_in is None
                else _mask("pop_ref_in", pop_ref_in, (k, m)))
    return target, refs, mask, pop_target, pop_refs, pop_mask


def rmia_scores(target_logq: np.ndarray, ref_logq: np.ndarray, ref_in: np.ndarray,
                pop_target_logq: np.ndarray, pop_ref_logq: np.ndarray, *,
                offline: bool = True, a: float | None = None, gamma: float = 1.0,
                pop_ref_in: np.ndarray | None = None) -> np.ndarray:
    """RMIA scores in [0, 1]: the fraction of population records ``z`` with LR(x)/LR(z) > γ.

    ``target_logq`` (N,) and ``ref_logq`` (K, N) are log q of the audited examples under the
    target and the references; ``pop_target_logq`` (M,) and ``pop_ref_logq`` (K, M) the same
    for the population.  ``pop_ref_in`` says which references trained on which population
    record (default: none did).  Offline uses OUT references only and, when ``a`` is None,
    picks it with :func:`choose_rmia_a`; online uses all references and ignores ``a``.
    Examples without an OUT reference (offline) get NaN; population records without one are
    left out of the comparison.  Both are counted in an :class:`UndefinedScoreWarning`.
    """
    target, refs, mask, pop_target, pop_refs, pop_mask = _rmia_inputs(
        target_logq, ref_logq, ref_in, pop_target_logq, pop_ref_logq, pop_ref_in)
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma > 0.0):
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    if offline:
        a = (choose_rmia_a(refs, mask, pop_refs, pop_ref_in=pop_mask) if a is None
             else _check_a(a))
    else:
        a = 1.0  # unused online
    scores, n_bad_pop = _rmia(target, _log_mean_q(refs, mask, offline), pop_target,
                              _log_mean_q(pop_refs, pop_mask, offline), offline, a, gamma)
    if n_bad_pop:
        warnings.warn(f"{n_bad_pop} of {pop_refs.shape[1]} population records have no OUT "
                      "reference and were left out of the comparison",
                      UndefinedScoreWarning, stacklevel=2)
    _warn_undefined(int(np.isnan(scores).sum()), scores.size, "no OUT reference")
    return scores


def choose_rmia_a(ref_logq: np.ndarray, ref_in: np.ndarray, pop_ref_logq: np.ndarray,
                  grid=np.linspace(0, 1, 11), *, pop_ref_in: np.ndarray | None = None,
                  target_ref: int | None = None) -> float:
    """Pick offline RMIA's ``a`` from ``grid`` by attacking the reference models themselves.

    Each reference in turn (or only ``target_ref``, as ML Privacy Meter does with one model)
    plays the target, the other K − 1 are its offline references, and its own inclusion mask
    gives the labels.  Returns the grid value with the highest AUC (averaged over the targets
    used; the first one on ties).  Examples without an OUT reference among the others are
    skipped, as is a target whose labels are all one class.
    """
    _, refs, mask, _, pop_refs, pop_mask = _rmia_inputs(
        None, ref_logq, ref_in, None, pop_ref_logq, pop_ref_in)
    grid_arr = np.asarray(grid, dtype=np.float64).ravel()
    if grid_arr.size == 0:
        raise ValueError("grid is empty")
    if np.isnan(grid_arr).any() or (grid_arr < 0).any() or (grid_arr > 1).any():
        raise ValueError("grid values must lie in [0, 1]")
    k = refs.shape[0]
    if target_ref is None:
        targets = range(k)
    elif 0 <= target_ref < k:
        targets = [target_ref]
    else:
        raise ValueError(f"target_ref must be in [0, {k}), got {target_ref}")

    auc_sum = np.zeros(grid_arr.size)
    n_used = 0
    for t in targets:
        others = np.arange(k) != t
        labels = mask[t]
        log_mean_x = _log_mean_q(refs[others], mask[others], offline=True)
        log_mean_z = _log_mean_q(pop_refs[others], pop_mask[others], offline=True)
        if not np.isfinite(log_mean_z).any():
            continue  # no usable population record with this target
        per_a = np.full(grid_arr.size, np.nan)
        for i, a in enumerate(grid_arr):
            scores, _ = _rmia(refs[t], log_mean_x, pop_refs[t], log_mean_z, True, float(a), 1.0)
            ok = np.isfinite(scores)
            if labels[ok].all() or not labels[ok].any():
                break
            per_a[i] = roc_auc_score(labels[ok], scores[ok])
        if np.isfinite(per_a).all():
            auc_sum += per_a
            n_used += 1
    if n_used == 0:
        raise ValueError("no reference model can serve as a target to tune a: each needs IN and "
                         "OUT examples with OUT references among the others, and a population")
    return float(grid_arr[int(np.argmax(auc_sum))])
