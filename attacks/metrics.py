"""ROC metrics for membership-inference attacks (kdaudit's docs/methods.md §9).

Conventions: label 1 = member (positive), 0 = non-member (negative); a higher
score means "more likely a member".  Point estimates come from scikit-learn;
confidence intervals come from a stratified percentile bootstrap that is
vectorised over resamples with numpy.

Definitions:

* ROC AUC exactly as computed - never flipped, so an attack that is worse than
  chance keeps an AUC below 0.5.
* TPR at a target FPR is the largest TPR among ROC points whose FPR is <= the
  target.  It is reported only when the non-members can reach that FPR, i.e.
  ``n_nonmembers >= 1 / target``; otherwise it is ``None`` and a note states the
  smallest reachable FPR (``1 / n_nonmembers``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["roc_metrics", "tpr_at_fpr", "is_elevated"]

# FPR targets reported by roc_metrics: (result key prefix, target, label).
# (metric key, target FPR, label): the low-FPR operating points every table reports
FPR_TARGETS: tuple[tuple[str, float, str], ...] = (
    ("tpr_at_1pct", 0.01, "1%"),
    ("tpr_at_0_1pct", 0.001, "0.1%"),
)

# Relative slack for floating-point round-off when comparing an FPR with a
# target (e.g. 0.07 * 100 == 7.000000000000001); used identically by the point
# estimate and the bootstrap so both apply the same cut-off.
_FPR_RTOL = 1e-9

# Upper bound on the number of matrix elements per bootstrap block; bounds
# memory for large inputs (1000 resamples x 2000 samples fits in one block).
_BLOCK_ELEMENTS = 4_000_000


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points whose FPR is <= ``target``.

    ``fpr`` and ``tpr`` are a ROC curve as returned by
    ``sklearn.metrics.roc_curve``.  A curve with no point at or below the
    target yields 0.0 (the reject-everything operating point).
    """
    fpr = np.asarray(fpr, dtype=float)
    tpr = np.asarray(tpr, dtype=float)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
        raise ValueError(
            "fpr and tpr must be 1-D arrays of equal length; "
            f"got shapes {fpr.shape} and {tpr.shape}"
        )
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target FPR must be in [0, 1]; got {target}")
    eligible = fpr <= target * (1.0 + _FPR_RTOL)
    if not eligible.any():
        return 0.0
    return float(tpr[eligible].max())


def is_elevated(
    auc_ci: tuple[float, float], baseline_ci: tuple[float, float] | None
) -> bool:
    """Whether an AUC is elevated above a baseline.

    True when the lower end of ``auc_ci`` exceeds the upper end of
    ``baseline_ci``, or exceeds 0.5 (chance) when there is no baseline.
    """
    lo, hi = _check_interval(auc_ci, "auc_ci")
    if baseline_ci is None:
        return lo > 0.5
    _, base_hi = _check_interval(baseline_ci, "baseline_ci")
    return lo > base_hi


def roc_metrics(
    scores: Any,
    labels: Any,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """ROC AUC, TPR at 1% / 0.1% FPR and their bootstrap confidence intervals.

    Returns a plain dict with ``auc``, ``auc_ci``, ``tpr_at_1pct``,
    ``tpr_at_1pct_ci``, ``tpr_at_0_1pct``, ``tpr_at_0_1pct_ci`` (value and CI are
    ``None`` when the target FPR is unreachable), ``n_members``,
    ``n_nonmembers``, ``min_fpr``, the ROC curve ``fpr`` / ``tpr`` (numpy
    arrays), ``notes`` (list of strings) and the bootstrap settings
    ``n_bootstrap``, ``confidence`` and ``seed``.
    """
    scores_arr, labels_arr = _validate_inputs(scores, labels)
    is_int = isinstance(n_bootstrap, (int, np.integer)) and not isinstance(n_bootstrap, bool)
    if not is_int or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer; got {n_bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1; got {confidence}")

    pos = scores_arr[labels_arr == 1]
    neg = scores_arr[labels_arr == 0]
    n_pos, n_neg = pos.size, neg.size

    auc = float(roc_auc_score(labels_arr, scores_arr))
    fpr, tpr, _ = roc_curve(labels_arr, scores_arr, drop_intermediate=False)

    reachable = {
        key: _max_false_positives(target, n_neg) >= 1 for key, target, _ in FPR_TARGETS
    }
    boot_targets = [target for key, target, _ in FPR_TARGETS if reachable[key]]
    boot_auc, boot_tpr = _bootstrap(
        pos, neg, boot_targets, n_bootstrap=int(n_bootstrap), seed=seed
    )

    result: dict[str, Any] = {
        "auc": auc,
        "auc_ci": _percentile_interval(boot_auc, confidence),
    }
    notes: list[str] = []
    min_fpr = 1.0 / n_neg
    for key, target, label in FPR_TARGETS:
        if reachable[key]:
            result[key] = tpr_at_fpr(fpr, tpr, target)
            result[f"{key}_ci"] = _percentile_interval(boot_tpr[target], confidence)
        else:
            result[key] = None
            result[f"{key}_ci"] = None
            needed = math.ceil(1.0 / target * (1.0 - _FPR_RTOL))
            notes.append(
                f"TPR at {label} FPR not reported: {n_neg} non-members reach FPR "
                f"\u2265 {100 * min_fpr:.3g}% (needs \u2265 {needed} non-members)"
            )

    result.update(
        n_members=int(n_pos),
        n_nonmembers=int(n_neg),
        min_fpr=min_fpr,
        fpr=fpr,
        tpr=tpr,
        notes=notes,
        n_bootstrap=int(n_bootstrap),
        confidence=float(confidence),
        seed=seed,
    )
    return result


# --------------------------------------------------------------------------
# Internals


def _validate_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Convert to 1-D float scores and int 0/1 labels, raising clear ValueErrors."""
    try:
        scores_arr = np.asarray(scores, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be numeric: {exc}") from exc
    labels_raw = np.asarray(labels)
    if scores_arr.ndim != 1 or labels_raw.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-D; got shapes {scores_arr.shape} and {labels_raw.shape}"
        )
    if scores_arr.size != labels_raw.size:
        raise ValueError(
            f"scores and labels must have the same length; got {scores_arr.size} scores "
            f"and {labels_raw.size} labels"
        )
    if labels_raw.dtype.kind not in "biuf":
        raise ValueError(
            f"labels must be 0 (non-member) or 1 (member); got dtype {labels_raw.dtype}"
        )
    bad_labels = ~np.isin(labels_raw, (0, 1))
    if bad_labels.any():
        examples = np.unique(labels_raw[bad_labels])[:5].tolist()
        raise ValueError(
            f"labels must be 0 (non-member) or 1 (member); found {int(bad_labels.sum())} "
            f"other value(s), e.g. {examples}"
        )
    n_bad_scores = int((~np.isfinite(scores_arr)).sum())
    if n_bad_scores:
        raise ValueError(
            f"scores must be finite; got {n_bad_scores} NaN/inf value(s) out of {scores_arr.size}"
        )
    labels_arr = labels_raw.astype(np.int64)
    n_pos = int((labels_arr == 1).sum())
    n_neg = labels_arr.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "roc_metrics needs both members (label 1) and non-members (label 0); "
            f"got {n_pos} members and {n_neg} non-members"
        )
    return scores_arr, labels_arr


def _check_interval(ci: tuple[float, float], name: str) -> tuple[float, float]:
    """Validate a (lo, hi) interval."""
    if ci is None or len(ci) != 2:
        raise ValueError(f"{name} must be a (lo, hi) pair; got {ci!r}")
    lo, hi = float(ci[0]), float(ci[1])
    if not lo <= hi:
        raise ValueError(f"{name} must satisfy lo <= hi; got {ci!r}")
    return lo, hi


def _max_false_positives(target: float, n_neg: int) -> int:
    """Largest false-positive count k with k / n_neg <= target."""
    return int(math.floor(target * n_neg * (1.0 + _FPR_RTOL)))


def _auc_from_samples(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC per row via the Mann-Whitney U statistic (average ranks for ties).

    ``pos`` is (B, n_pos) and ``neg`` is (B, n_neg); returns shape (B,).
    """
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), method="average", axis=1)
    u = ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _tpr_at_fpr_from_samples(pos: np.ndarray, neg: np.ndarray, target: float) -> np.ndarray:
    """Largest TPR with FPR <= ``target``, per row; shapes as in ``_auc_from_samples``.

    With k = floor(target * n_neg) allowed false positives, the best threshold
    t must satisfy #{neg >= t} <= k, i.e. t > the (k+1)-th highest negative
    score.  The smallest such t admits exactly the positives strictly above
    that score, which reproduces the ROC definition including ties.
    """
    n_neg = neg.shape[1]
    k = _max_false_positives(target, n_neg)
    if k >= n_neg:
        return np.ones(pos.shape[0])
    # (k+1)-th highest negative = element k of the descending order.
    threshold = -np.partition(-neg, k, axis=1)[:, k]
    return (pos > threshold[:, None]).mean(axis=1)


def _bootstrap(
    pos: np.ndarray,
    neg: np.ndarray,
    targets: list[float],
    *,
    n_bootstrap: int,
    seed: int,
) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Stratified bootstrap of AUC and TPR-at-FPR for each target.

    Members and non-members are resampled separately with replacement, each
    at its own size, so every resample contains both classes.  All resample
    indices are drawn up front (results do not depend on blocking); the
    statistics are computed vectorised over resamples in a few large blocks to
    bound memory.
    """
    rng = np.random.default_rng(seed)
    n_pos, n_neg = pos.size, neg.size
    idx_pos = rng.integers(0, n_pos, size=(n_bootstrap, n_pos))
    idx_neg = rng.integers(0, n_neg, size=(n_bootstrap, n_neg))

    aucs = np.empty(n_bootstrap)
    tprs = {target: np.empty(n_bootstrap) for target in targets}
    block = max(1, _BLOCK_ELEMENTS // (n_pos + n_neg))
    for start in range(0, n_bootstrap, block):
        rows = slice(start, start + block)
        pos_s = pos[idx_pos[rows]]
        neg_s = neg[idx_neg[rows]]
        aucs[rows] = _auc_from_samples(pos_s, neg_s)
        for target in targets:
            tprs[target][rows] = _tpr_at_fpr_from_samples(pos_s, neg_s, target)
    return aucs, tprs


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap statistics."""
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
