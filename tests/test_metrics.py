"""Tests for attacks.metrics (docs/methods.md §9)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from attacks.metrics import (
    _auc_from_samples,
    _tpr_at_fpr_from_samples,
    is_elevated,
    roc_metrics,
    tpr_at_fpr,
)


def _make_data(
    n_pos: int, n_neg: int, shift: float = 0.5, seed: int = 0, decimals: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian scores, members shifted by ``shift``; optional rounding creates ties."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(shift, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)])
    if decimals is not None:
        scores = np.round(scores, decimals)
    labels = np.concatenate([np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)])
    perm = rng.permutation(scores.size)
    return scores[perm], labels[perm]


def _brute_force_tpr(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Largest TPR over all thresholds whose FPR <= target, by explicit looping."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    best = 0.0
    for threshold in [*np.unique(scores), np.inf]:
        false_positives = int((neg >= threshold).sum())
        if false_positives <= target * neg.size + 1e-9:
            best = max(best, float((pos >= threshold).mean()))
    return best


# ---------------------------------------------------------------- AUC


@pytest.mark.parametrize(
    ("shift", "decimals"),
    [(0.3, None), (0.3, 1), (0.0, 0), (3.0, None), (3.0, 1)],
    ids=["weak", "weak-ties", "null-heavy-ties", "strong", "strong-ties"],
)
def test_auc_matches_sklearn(shift: float, decimals: int | None) -> None:
    scores, labels = _make_data(300, 400, shift=shift, seed=1, decimals=decimals)
    result = roc_metrics(scores, labels, n_bootstrap=50)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(result["fpr"], fpr)
    np.testing.assert_array_equal(result["tpr"], tpr)


def test_auc_below_half_is_not_flipped() -> None:
    scores, labels = _make_data(300, 300, shift=-1.0, seed=2)
    result = roc_metrics(scores, labels, n_bootstrap=200)
    assert result["auc"] < 0.5
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["auc"] == pytest.approx(1.0 - roc_metrics(-scores, labels, n_bootstrap=10)["auc"])
    assert result["auc_ci"][1] < 0.5


# ---------------------------------------------------------------- TPR at low FPR


@pytest.mark.parametrize("n_neg", [100, 500, 2000])
@pytest.mark.parametrize("decimals", [None, 1], ids=["continuous", "ties"])
def test_tpr_at_1pct_matches_brute_force(n_neg: int, decimals: int | None) -> None:
    scores, labels = _make_data(300, n_neg, shift=1.5, seed=n_neg, decimals=decimals)
    result = roc_metrics(scores, labels, n_bootstrap=20)
    assert result["tpr_at_1pct"] == pytest.approx(_brute_force_tpr(scores, labels, 0.01), abs=1e-12)
    assert result["tpr_at_1pct_ci"] is not None


def test_tpr_at_1pct_unreachable_with_99_nonmembers() -> None:
    scores, labels = _make_data(200, 99, shift=1.0, seed=3)
    result = roc_metrics(scores, labels, n_bootstrap=20)
    assert result["tpr_at_1pct"] is None
    assert result["tpr_at_1pct_ci"] is None
    assert result["min_fpr"] == pytest.approx(1 / 99)
    assert any("1% FPR" in note and "99 non-members" in note for note in result["notes"])


def test_tpr_at_0_1pct_needs_1000_nonmembers() -> None:
    scores, labels = _make_data(200, 500, shift=1.0, seed=4)
    small = roc_metrics(scores, labels, n_bootstrap=20)
    assert small["tpr_at_0_1pct"] is None and small["tpr_at_0_1pct_ci"] is None
    assert small["tpr_at_1pct"] is not None
    assert any("0.1% FPR" in n and "500 non-members" in n and "0.2%" in n for n in small["notes"])

    scores, labels = _make_data(200, 1000, shift=1.0, seed=4)
    large = roc_metrics(scores, labels, n_bootstrap=20)
    assert large["tpr_at_0_1pct"] == pytest.approx(_brute_force_tpr(scores, labels, 0.001))
    assert large["tpr_at_0_1pct_ci"] is not None
    assert large["notes"] == []


def test_tpr_at_fpr_from_curve() -> None:
    fpr = np.array([0.0, 0.0, 0.005, 0.01, 0.02, 1.0])
    tpr = np.array([0.0, 0.1, 0.2, 0.3, 0.5, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(0.3)
    assert tpr_at_fpr(fpr, tpr, 0.009) == pytest.approx(0.2)
    assert tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(0.1)
    assert tpr_at_fpr(fpr, tpr, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        tpr_at_fpr(fpr, tpr[:-1], 0.01)


# ---------------------------------------------------------------- degenerate inputs and errors


def test_all_equal_scores() -> None:
    labels = np.array([1] * 150 + [0] * 150)
    result = roc_metrics(np.full(300, 0.7), labels, n_bootstrap=100)
    assert result["auc"] == 0.5
    assert result["auc_ci"] == (0.5, 0.5)
    assert result["tpr_at_1pct"] == 0.0
    assert result["tpr_at_1pct_ci"] == (0.0, 0.0)


@pytest.mark.parametrize(("n_pos", "n_neg"), [(50, 0), (0, 50)])
def test_one_class_missing(n_pos: int, n_neg: int) -> None:
    labels = np.array([1] * n_pos + [0] * n_neg)
    message = (
        "roc_metrics needs both members (label 1) and non-members (label 0); "
        f"got {n_pos} members and {n_neg} non-members"
    )
    with pytest.raises(ValueError) as info:
        roc_metrics(np.arange(50.0), labels)
    assert str(info.value) == message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_rejected(bad: float) -> None:
    scores, labels = _make_data(20, 20)
    scores[[3, 7]] = bad
    with pytest.raises(ValueError, match=r"finite.*2 NaN/inf"):
        roc_metrics(scores, labels)


def test_invalid_labels_and_lengths() -> None:
    scores, labels = _make_data(20, 20)
    with pytest.raises(ValueError, match="labels must be 0"):
        roc_metrics(scores, np.where(labels == 1, 2, 0))
    with pytest.raises(ValueError, match="labels must be 0"):
        roc_metrics(scores, labels.astype(str))
    with pytest.raises(ValueError, match="same length"):
        roc_metrics(scores[:-1], labels)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (200, 2000):  # 400 and 4000 samples in total
        scores, labels = _make_data(n, n, shift=0.5, seed=5, decimals=2)
        result = roc_metrics(scores, labels)
        for key in ("auc", "tpr_at_1pct"):
            lo, hi = result[f"{key}_ci"]
            assert 0.0 <= lo <= result[key] <= hi <= 1.0
        widths.append(result["auc_ci"][1] - result["auc_ci"][0])
    assert widths[1] < 0.5 * widths[0]


def test_bootstrap_is_deterministic_for_fixed_seed() -> None:
    scores, labels = _make_data(150, 250, shift=0.5, seed=6)
    first = roc_metrics(scores, labels, seed=11)
    second = roc_metrics(scores, labels, seed=11)
    other = roc_metrics(scores, labels, seed=12)
    assert first["auc_ci"] == second["auc_ci"]
    assert first["tpr_at_1pct_ci"] == second["tpr_at_1pct_ci"]
    assert first["auc_ci"] != other["auc_ci"]


def test_identity_resample_reproduces_point_estimates() -> None:
    scores, labels = _make_data(400, 1000, shift=1.0, seed=7, decimals=1)
    pos, neg = scores[labels == 1][None, :], scores[labels == 0][None, :]
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert _auc_from_samples(pos, neg)[0] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for target in (0.001, 0.01, 0.05, 0.3):
        assert _tpr_at_fpr_from_samples(pos, neg, target)[0] == pytest.approx(
            tpr_at_fpr(fpr, tpr, target), abs=1e-12
        )


@settings(max_examples=60, deadline=None)
@given(
    pos=st.lists(st.integers(0, 6), min_size=1, max_size=30),
    neg=st.lists(st.integers(0, 6), min_size=1, max_size=300),
    target=st.sampled_from([0.001, 0.01, 0.07, 0.1, 0.25, 0.5, 1.0]),
)
def test_identity_resample_matches_sklearn_property(
    pos: list[int], neg: list[int], target: float
) -> None:
    scores = np.array(pos + neg, dtype=float)
    labels = np.array([1] * len(pos) + [0] * len(neg))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    pos_m, neg_m = np.array(pos, float)[None, :], np.array(neg, float)[None, :]
    auc = roc_auc_score(labels, scores)
    assert _auc_from_samples(pos_m, neg_m)[0] == pytest.approx(auc, abs=1e-12)
    expected = tpr_at_fpr(fpr, tpr, target)
    assert _tpr_at_fpr_from_samples(pos_m, neg_m, target)[0] == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(_brute_force_tpr(scores, labels, target), abs=1e-12)


# ---------------------------------------------------------------- is_elevated


@pytest.mark.parametrize(
    ("auc_ci", "baseline_ci", "expected"),
    [
        ((0.52, 0.60), None, True),
        ((0.49, 0.60), None, False),
        ((0.50, 0.60), None, False),
        ((0.62, 0.70), (0.55, 0.61), True),
        ((0.60, 0.70), (0.55, 0.61), False),
        ((0.61, 0.70), (0.55, 0.61), False),
        ((0.45, 0.48), (0.40, 0.44), True),
    ],
)
def test_is_elevated(
    auc_ci: tuple[float, float], baseline_ci: tuple[float, float] | None, expected: bool
) -> None:
    assert is_elevated(auc_ci, baseline_ci) is expected


def test_is_elevated_rejects_malformed_interval() -> None:
    with pytest.raises(ValueError):
        is_elevated((0.7, 0.6), None)
