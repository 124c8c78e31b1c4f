"""Privacy-leakage measures beyond ROC metrics (kdaudit's docs/methods.md §11).

Three families, in decreasing order of rigour:

* **Canary exposure** (Carlini et al. 2019, "The Secret Sharer"): how far up the
  model's preference ranking a randomly drawn inserted secret sits,
  ``exposure = log2|R| - log2 rank(secret)``.
* **Rigorous empirical ε lower bound**: the one-run audit of Steinke, Nasr and
  Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run").
  Canaries are included independently with probability 1/2; the auditor guesses
  "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest and
  abstains on the rest.  The number of correct guesses is tested against the
  tail bound of their Theorem 3.1, computed as in the paper's Appendix D, which
  holds for every (ε, δ)-DP training procedure.  The result is a
  ``1 - β``-confidence lower bound on ε.
* **Heuristic ε estimate**: ``log((TPR - δ)/FPR)`` and ``log((1 - δ - FPR)/FNR)``
  with Clopper-Pearson bounds on the rates.  This is an *estimate, not a bound*:
  the records scored against one model are not independent trials of the
  mechanism, so the binomial confidence intervals do not carry a DP guarantee.

Convention throughout: a higher score means "more likely a member / included".
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from scipy.special import bdtrc, expit

__all__ = [
    "clopper_pearson",
    "exposure_from_rank",
    "estimate_exposure",
    "one_run_p_value",
    "max_epsilon_for_guesses",
    "one_run_epsilon_lower_bound",
    "heuristic_epsilon",
]

# Resolution of the ε search; results are floored onto this grid (conservative).
EPSILON_RESOLUTION = 1e-3
_GRID_STEPS_PER_UNIT = 1000  # 1 / EPSILON_RESOLUTION, exact for clean decimal output

# Exposure estimators accepted by `estimate_exposure`; "sampling" is the default.
EXPOSURE_METHODS = ("sampling", "skewnorm")

HEURISTIC_KIND = "estimate (not a bound)"
ONE_RUN_KIND = "lower bound (Steinke, Nasr & Jagielski 2023, Thm 3.1)"


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta <= 1.0 or math.isnan(delta):
        raise ValueError(f"delta must be in [0, 1]; got {delta}")


def _check_count(name: str, value: int) -> int:
    """Accept Python or numpy integers (not bools, not floats) that are >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return int(value)


def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """A 1-D float array without NaN."""
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN ({int(np.isnan(arr).sum())} values)")
    return arr


def _as_binary(values: np.ndarray, name: str) -> np.ndarray:
    """A 1-D boolean array from booleans or numbers that are exactly 0 or 1."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean or 0/1; got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name} must be boolean or 0/1; found values {bad.tolist()}")
    return arr.astype(bool)


# --------------------------------------------------------------------------- #
# Clopper-Pearson
# --------------------------------------------------------------------------- #
def _clopper_pearson_arrays(
    k: np.ndarray, n: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised two-sided Clopper-Pearson interval (no validation)."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lo, hi


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for a proportion ``k / n``.

    Each tail gets ``(1 - confidence) / 2``; ``k = 0`` gives lower bound 0 and
    ``k = n`` gives upper bound 1.
    """
    k = _check_count("k", k)
    n = _check_count("n", n)
    if n == 0:
        raise ValueError("n must be >= 1")
    if k > n:
        raise ValueError(f"k must be <= n; got k={k}, n={n}")
    _check_confidence(confidence)
    lo, hi = _clopper_pearson_arrays(np.array(k), np.array(n), confidence)
    return float(lo), float(hi)


# --------------------------------------------------------------------------- #
# Canary exposure
# --------------------------------------------------------------------------- #
def exposure_from_rank(rank: float, space_size: float) -> float:
    """``log2 |R| - log2 rank``: 0 for the worst rank, ``log2 |R|`` for rank 1.

    ``rank`` may be fractional (an estimate) but must lie in ``[1, |R|]``.
    """
    if not space_size >= 1:
        raise ValueError(f"space_size must be >= 1; got {space_size}")
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank must be in [1, space_size={space_size}]; got {rank}")
    return float(math.log2(space_size) - math.log2(rank))


def estimate_exposure(
    secret_loss: float,
    candidate_losses: np.ndarray,
    space_size: float,
    method: str = "sampling",
) -> float:
    """Exposure of a secret from the losses of random candidate secrets.

    ``candidate_losses`` are the model's losses on secrets drawn uniformly from
    the secret space R (size ``space_size``), used when R is too large to rank
    exhaustively.  Lower loss = the model prefers that secret.

    * ``"sampling"`` (default): rank ≈ 1 + |R| · (fraction of candidates whose
      loss is strictly lower than the secret's).  Assumption-free, but it cannot
      resolve ranks finer than ``|R| / len(candidate_losses)``: when no
      candidate beats the secret it reports rank 1, i.e. exposure ``log2 |R|``.
    * ``"skewnorm"``: Carlini et al.'s extrapolation - fit a skew-normal to the
      candidate losses and use rank ≈ 1 + |R| · CDF(secret_loss).  Resolves deep
      tails, at the price of assuming that shape for the loss distribution.
    """
    if method not in EXPOSURE_METHODS:
        raise ValueError(f"method must be one of {EXPOSURE_METHODS}; got {method!r}")
    if math.isnan(secret_loss):
        raise ValueError("secret_loss is NaN")
    losses = _as_scores(candidate_losses, "candidate_losses")
    if losses.size == 0:
        raise ValueError("candidate_losses is empty")
    if not space_size >= 1:
        raise ValueError(f"space_size must be >= 1; got {space_size}")

    if method == "sampling":
        fraction_lower = float(np.mean(losses < secret_loss))
    else:
        if losses.size < 3 or np.ptp(losses) == 0:
            raise ValueError("skewnorm fit needs >= 3 candidate losses that are not all equal")
        shape, loc, scale = stats.skewnorm.fit(losses)
        fraction_lower = float(stats.skewnorm.cdf(secret_loss, shape, loc=loc, scale=scale))
    rank = min(1.0 + space_size * fraction_lower, float(space_size))
    return exposure_from_rank(rank, space_size)


# --------------------------------------------------------------------------- #
# One-run audit (Steinke, Nasr & Jagielski 2023)
# --------------------------------------------------------------------------- #
def one_run_p_value(correct: int, guesses: int, m: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ ``correct`` of ``guesses`` guesses right] under (ε, δ)-DP.

    Theorem 3.1 of Steinke, Nasr & Jagielski (2023), evaluated as in their
    Appendix D.  With ``q = e^ε / (1 + e^ε)`` (the accuracy of ε-DP randomized
    response) and ``f(v) = P[Binomial(r, q) ≥ v]``::

        p = f(v) + 2 m δ · max_{i = 1..v} (f(v - i) - f(v)) / i

    where ``f(v - i) - f(v) = Σ_{j=1..i} P[Binomial(r, q) = v - j]`` is
    accumulated one term at a time.  For δ = 0 this is the binomial tail alone.
    Inputs are assumed valid (see `max_epsilon_for_guesses`).
    """
    v, r = correct, guesses
    q = float(expit(epsilon))
    if v == 0:
        return 1.0
    tail = float(bdtrc(v - 1, r, q))  # f(v) = P[B >= v] = P[B > v - 1]; ufunc, no scipy.stats overhead
    if delta == 0:
        return min(tail, 1.0)
    # pmf at v-1, v-2, ..., 0; the running sum over the first i terms is f(v-i) - f(v).
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    slope = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * slope, 1.0)


def max_epsilon_for_guesses(
    correct: int, guesses: int, m: int, delta: float, confidence: float
) -> float:
    """Largest ε (on a 1e-3 grid) rejected by the one-run test at level ``1 - confidence``.

    Returns the ε at which ``one_run_p_value`` is still ≤ β = 1 - confidence, found by
    bisection with the invariant p(lo) ≤ β < p(hi) and floored onto the grid; 0 when
    even ε = 0 is not rejected.  Rejecting (ε, δ)-DP also rejects every smaller ε, so
    the returned value is a valid lower bound on the mechanism's ε at this δ.
    """
    v = _check_count("correct", correct)
    r = _check_count("guesses", guesses)
    m = _check_count("m", m)
    if not v <= r <= m:
        raise ValueError(f"need correct <= guesses <= m; got {v}, {r}, {m}")
    _check_delta(delta)
    _check_confidence(confidence)
    beta = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(v, r, m, eps, delta) <= beta

    if r == 0 or not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # terminates: p -> 1 as ε grows (q reaches 1.0 in floating point)
        lo, hi = hi, 2.0 * hi
    while hi - lo > EPSILON_RESOLUTION / 4:
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return math.floor(lo * _GRID_STEPS_PER_UNIT) / _GRID_STEPS_PER_UNIT


def one_run_epsilon_lower_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    k_plus: int,
    k_minus: int,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> dict:
    """Rigorous ε lower bound from one training run (Steinke, Nasr & Jagielski 2023).

    ``included[i]`` says whether canary i was inserted; for the bound to hold each
    canary must have been included independently with probability 1/2, and
    ``k_plus`` / ``k_minus`` must be fixed before looking at the scores.  The
    auditor guesses "in" for the ``k_plus`` highest scores and "out" for the
    ``k_minus`` lowest; ties are broken by position, so the order of canaries must
    not depend on inclusion.  Returns the ε bound at confidence ``confidence`` for
    the given δ, with the counts it rests on.
    """
    s = _as_scores(scores)
    inc = _as_binary(included, "included")
    if s.shape != inc.shape:
        raise ValueError(f"scores and included differ in length: {s.size} vs {inc.size}")
    k_plus = _check_count("k_plus", k_plus)
    k_minus = _check_count("k_minus", k_minus)
    m = s.size
    if k_plus + k_minus > m:
        raise ValueError(f"k_plus + k_minus = {k_plus + k_minus} exceeds the {m} canaries")
    _check_delta(delta)
    _check_confidence(confidence)

    order = np.argsort(s, kind="stable")  # ascending score
    guessed_out = order[:k_minus]
    guessed_in = order[m - k_plus :]
    correct = int(inc[guessed_in].sum() + (~inc[guessed_out]).sum())
    guesses = k_plus + k_minus
    return {
        "epsilon_lb": max_epsilon_for_guesses(correct, guesses, m, delta, confidence),
        "correct": correct,
        "guesses": guesses,
        "k_plus": k_plus,
        "k_minus": k_minus,
        "m": m,
        "delta": float(delta),
        "confidence": float(confidence),
        "kind": ONE_RUN_KIND,
    }


# --------------------------------------------------------------------------- #
# Heuristic ε estimate
# --------------------------------------------------------------------------- #
def _epsilon_from_counts(
    tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int, delta: float, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clopper-Pearson-bounded ε estimate at each operating point; also the rate bounds."""
    tpr_lo, _ = _clopper_pearson_arrays(tp, np.full_like(tp, n_pos), confidence)
    _, fpr_hi = _clopper_pearson_arrays(fp, np.full_like(fp, n_neg), confidence)
    _, fnr_hi = _clopper_pearson_arrays(n_pos - tp, np.full_like(tp, n_pos), confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_pos = np.where(tpr_lo > delta, np.log((tpr_lo - delta) / fpr_hi), 0.0)
        eps_neg = np.where(
            1.0 - delta - fpr_hi > 0, np.log((1.0 - delta - fpr_hi) / fnr_hi), 0.0
        )
    eps = np.maximum(np.maximum(eps_pos, eps_neg), 0.0)
    return eps, tpr_lo, fpr_hi, fnr_hi


def _operating_points(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when "member" means score >= threshold."""
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    tp = (pos.size - np.searchsorted(pos, thresholds, side="left")).astype(float)
    fp = (neg.size - np.searchsorted(neg, thresholds, side="left")).astype(float)
    return tp, fp


def heuristic_epsilon(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Heuristic ε ESTIMATE (not a bound) from a thresholded membership attack.

    The records are split at random (seeded, stratified by label) into halves.
    On the first half a threshold is chosen to maximise the estimate below; on
    the second half, with Clopper-Pearson bounds at ``confidence`` (TPR lower,
    FPR and FNR upper), the estimate is::

        max(log((TPR_lo - δ) / FPR_hi), log((1 - δ - FPR_hi) / FNR_hi), 0)

    It is NOT a statistical lower bound: the records of one model are not
    independent runs of the training mechanism, so the intervals only describe
    sampling noise among records.  Labels: 1/True = member; higher score = member.
    """
    s = _as_scores(scores)
    lab = _as_binary(labels, "labels")
    if s.shape != lab.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {lab.size}")
    _check_delta(delta)
    _check_confidence(confidence)
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"need >= 2 members and >= 2 non-members to split; got {n_pos} and {n_neg}"
        )

    rng = np.random.default_rng(seed)
    select = np.zeros(s.size, dtype=bool)
    for group in (np.flatnonzero(lab), np.flatnonzero(~lab)):
        chosen = rng.permutation(group)[: group.size // 2]
        select[chosen] = True
    evaluate = ~select

    # Candidate thresholds from the selection half: below all, midpoints, above all.
    uniq = np.unique(s[select])
    thresholds = np.concatenate(
        [uniq[:1], (uniq[:-1] + uniq[1:]) / 2.0, [np.nextafter(uniq[-1], np.inf)]]
    )
    s_sel, l_sel = s[select], lab[select]
    tp, fp = _operating_points(s_sel, l_sel, thresholds)
    eps_sel, *_ = _epsilon_from_counts(
        tp, fp, int(l_sel.sum()), int((~l_sel).sum()), delta, confidence
    )
    threshold = float(thresholds[int(np.argmax(eps_sel))])

    s_ev, l_ev = s[evaluate], lab[evaluate]
    tp, fp = _operating_points(s_ev, l_ev, np.array([threshold]))
    eps, tpr_lo, fpr_hi, fnr_hi = _epsilon_from_counts(
        tp, fp, int(l_ev.sum()), int((~l_ev).sum()), delta, confidence
    )
    return {
        "epsilon_estimate": float(eps[0]),
        "threshold": threshold,
        "tpr_lo": float(tpr_lo[0]),
        "fpr_hi": float(fpr_hi[0]),
        "fnr_hi": float(fnr_hi[0]),
        "kind": HEURISTIC_KIND,
        "delta": float(delta),
        "confidence": float(confidence),
        "n_eval": int(evaluate.sum()),
    }
