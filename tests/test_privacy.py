"""Tests for attacks.privacy (docs/methods.md §11): exposure, one-run ε bound, heuristic ε."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from attacks.privacy import (
    clopper_pearson,
    estimate_exposure,
    exposure_from_rank,
    heuristic_epsilon,
    max_epsilon_for_guesses,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

BETA = 0.05


def _closed_form_all_correct(r: int, beta: float = BETA) -> float:
    """δ = 0, all r guesses right: ε with q^r = β, q = e^ε / (1 + e^ε)."""
    q = beta ** (1.0 / r)
    return math.log(q / (1.0 - q))


def _reference_p_value(v: int, r: int, m: int, eps: float, delta: float) -> float:
    """Theorem 3.1 written literally: f(v) + 2mδ max_i (f(v-i) - f(v)) / i."""
    q = math.exp(eps) / (1.0 + math.exp(eps))

    def f(x: int) -> float:
        return float(stats.binom.sf(x - 1, r, q))

    slope = max(((f(v - i) - f(v)) / i for i in range(1, v + 1)), default=0.0)
    return min(f(v) + 2 * m * delta * slope, 1.0)


def _randomized_response_scores(
    rng: np.random.Generator, m: int, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """ε-DP per canary: inclusion bit flipped w.p. 1/(1+e^ε), plus tie-breaking noise."""
    included = rng.random(m) < 0.5
    flipped = rng.random(m) < 1.0 / (1.0 + math.exp(eps))
    scores = (included ^ flipped).astype(float) + rng.normal(0.0, 1e-3, m)
    return scores, included


# --------------------------------------------------------------------------- #
# Clopper-Pearson
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("k", "n", "confidence"), [(3, 10, 0.95), (50, 100, 0.95), (17, 400, 0.9), (1, 2, 0.99)]
)
def test_clopper_pearson_matches_beta_quantiles(k: int, n: int, confidence: float) -> None:
    alpha = 1 - confidence
    lo, hi = clopper_pearson(k, n, confidence)
    assert lo == pytest.approx(stats.beta.ppf(alpha / 2, k, n - k + 1), rel=1e-10)
    assert hi == pytest.approx(stats.beta.ppf(1 - alpha / 2, k + 1, n - k), rel=1e-10)
    assert lo < k / n < hi


def test_clopper_pearson_edges() -> None:
    n = 20
    lo, hi = clopper_pearson(0, n)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-10)
    lo, hi = clopper_pearson(n, n)
    assert hi == 1.0
    assert lo == pytest.approx(0.025 ** (1 / n), rel=1e-10)


@pytest.mark.parametrize(("k", "n", "confidence"), [(5, 4, 0.95), (-1, 4, 0.95), (1, 0, 0.95), (1, 4, 1.0)])
def test_clopper_pearson_rejects_bad_input(k: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        clopper_pearson(k, n, confidence)


# --------------------------------------------------------------------------- #
# Exposure
# --------------------------------------------------------------------------- #
def test_exposure_from_rank_endpoints() -> None:
    assert exposure_from_rank(1, 1e10) == pytest.approx(math.log2(1e10))
    assert exposure_from_rank(1e10, 1e10) == pytest.approx(0.0, abs=1e-12)
    assert exposure_from_rank(4, 1024) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        exposure_from_rank(0.5, 1024)
    with pytest.raises(ValueError):
        exposure_from_rank(2048, 1024)


@pytest.mark.parametrize("exact_rank", [1, 11, 201, 1001])
def test_sampling_exposure_close_to_exact_rank(exact_rank: int) -> None:
    """Small space: enumerate the exact rank, then estimate it from random candidates."""
    rng = np.random.default_rng(exact_rank)
    space = 2000
    losses = rng.permutation(np.arange(space, dtype=float))  # distinct losses
    secret = int(np.flatnonzero(losses == exact_rank - 1)[0])   # exact_rank − 1 lower losses

    candidates = losses[rng.integers(0, space, size=50_000)]
    estimate = estimate_exposure(losses[secret], candidates, space)
    assert estimate == pytest.approx(exposure_from_rank(exact_rank, space), abs=0.2)
    assert estimate == estimate_exposure(losses[secret], candidates, space, method="sampling")


def test_skewnorm_exposure_extrapolates_beyond_sampling_resolution() -> None:
    rng = np.random.default_rng(1)
    shape, space = 4.0, 1e10
    candidates = stats.skewnorm.rvs(shape, size=5000, random_state=rng)
    secret_loss = float(stats.skewnorm.ppf(1e-6, shape))  # far rarer than 1 in 5000
    truth = math.log2(space) - math.log2(1 + space * 1e-6)

    by_fit = estimate_exposure(secret_loss, candidates, space, method="skewnorm")
    by_sampling = estimate_exposure(secret_loss, candidates, space)
    assert by_fit == pytest.approx(truth, abs=1.0)
    assert by_sampling == pytest.approx(math.log2(space))  # saturates: no candidate lower
    with pytest.raises(ValueError):
        estimate_exposure(secret_loss, candidates, space, method="bogus")


# --------------------------------------------------------------------------- #
# One-run ε lower bound
# --------------------------------------------------------------------------- #
def test_one_run_bound_consistent_with_zero_for_random_scores() -> None:
    rng = np.random.default_rng(0)
    trials, positive = 200, 0
    for _ in range(trials):
        included = rng.random(1000) < 0.5
        result = one_run_epsilon_lower_bound(
            rng.normal(size=1000), included, k_plus=100, k_minus=100
        )
        positive += result["epsilon_lb"] > 0
    assert positive <= 0.05 * trials + 10  # a 95% bound; slack for 200 trials


@pytest.mark.parametrize("k", [10, 25, 50, 100])
def test_perfect_separation_matches_closed_form(k: int) -> None:
    rng = np.random.default_rng(k)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(0.0, 0.01, 1000)
    result = one_run_epsilon_lower_bound(scores, included, k_plus=k, k_minus=k)
    assert result["correct"] == result["guesses"] == 2 * k
    closed = _closed_form_all_correct(2 * k)
    assert closed - 1e-3 <= result["epsilon_lb"] <= closed
    assert set(result) >= {"epsilon_lb", "correct", "guesses", "k_plus", "k_minus", "m", "delta", "confidence"}


def test_perfect_separation_bound_increases_with_guesses() -> None:
    bounds = [max_epsilon_for_guesses(r, r, 1000, 0.0, 0.95) for r in (5, 20, 50, 100, 200, 400)]
    assert bounds[0] > 0
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


def test_bound_monotone_in_correct_count() -> None:
    bounds = [max_epsilon_for_guesses(v, 200, 1000, 0.0, 0.95) for v in range(100, 201)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] == 0.0 and bounds[-1] > 4.0
    assert bounds[-1] == pytest.approx(_closed_form_all_correct(200), abs=1e-3)


@pytest.mark.parametrize(("v", "r"), [(150, 200), (190, 200), (200, 200), (45, 50)])
def test_positive_delta_never_exceeds_delta_zero(v: int, r: int) -> None:
    zero = max_epsilon_for_guesses(v, r, 1000, 0.0, 0.95)
    for delta in (1e-6, 1e-5, 1e-3):
        assert max_epsilon_for_guesses(v, r, 1000, delta, 0.95) <= zero


@pytest.mark.parametrize(("v", "r", "delta"), [(190, 200, 1e-5), (80, 100, 1e-4), (200, 200, 1e-3)])
def test_delta_bound_follows_theorem_3_1(v: int, r: int, delta: float) -> None:
    """The returned ε is rejected by the literal Theorem 3.1 p-value; ε + 2e-3 is not."""
    eps = max_epsilon_for_guesses(v, r, 1000, delta, 0.95)
    assert eps > 0
    assert _reference_p_value(v, r, 1000, eps, delta) <= BETA
    assert _reference_p_value(v, r, 1000, eps + 2e-3, delta) > BETA
    for e in (0.0, eps / 2, eps, 2 * eps):
        assert one_run_p_value(v, r, 1000, e, delta) == pytest.approx(
            _reference_p_value(v, r, 1000, e, delta), rel=1e-9, abs=1e-15
        )


@pytest.mark.parametrize("true_eps", [1.0, 2.0, 4.0])
def test_randomized_response_bound_stays_below_true_epsilon(true_eps: float) -> None:
    """Simulated ε-DP randomized response: the bound exceeds ε in about ≤ 5% of runs.

    A 95% bound may exceed ε in up to 5% of runs, so the count of runs above ε
    gets three binomial standard deviations of slack; an invalid bound (e.g. the
    plug-in log(v / (r - v))) exceeds ε in roughly half of the runs.
    """
    rng = np.random.default_rng(int(true_eps * 10))
    trials = 300
    above = sum(
        one_run_epsilon_lower_bound(
            *_randomized_response_scores(rng, 1000, true_eps), k_plus=100, k_minus=100
        )["epsilon_lb"]
        > true_eps
        for _ in range(trials)
    )
    slack = 3 * math.sqrt(trials * BETA * (1 - BETA))
    assert trials - above >= 0.95 * trials - slack


@pytest.mark.parametrize("true_eps", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_exact_coverage_under_randomized_response(true_eps: float, delta: float) -> None:
    """Under ε-DP randomized response the r guesses are i.i.d. right w.p. q, so
    P[bound > ε] can be summed exactly over W ~ Binomial(r, q); it must be <= β."""
    r, m = 200, 1000
    q = math.exp(true_eps) / (1 + math.exp(true_eps))
    pmf = stats.binom.pmf(np.arange(r + 1), r, q)
    exceeds = np.array(
        [max_epsilon_for_guesses(v, r, m, delta, 0.95) > true_eps for v in range(r + 1)]
    )
    assert 0.0 < pmf[exceeds].sum() <= BETA  # > 0: the bound is not trivially small


def test_randomized_response_eps4_bound_clearly_positive() -> None:
    rng = np.random.default_rng(4)
    for _ in range(10):
        scores, included = _randomized_response_scores(rng, 1000, 4.0)
        lb = one_run_epsilon_lower_bound(scores, included, k_plus=100, k_minus=100)["epsilon_lb"]
        assert lb > 2.0


def test_inverted_scores_give_zero_bound() -> None:
    included = np.arange(1000) % 2 == 0
    result = one_run_epsilon_lower_bound(-included.astype(float), included, k_plus=50, k_minus=50)
    assert result["correct"] == 0 and result["epsilon_lb"] == 0.0


def test_one_run_validation_errors() -> None:
    scores = np.linspace(0, 1, 10)
    included = np.arange(10) % 2
    with pytest.raises(ValueError, match="exceeds"):
        one_run_epsilon_lower_bound(scores, included, k_plus=6, k_minus=5)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        one_run_epsilon_lower_bound(scores, included * 2, k_plus=2, k_minus=2)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        one_run_epsilon_lower_bound(scores, np.array(["a"] * 10), k_plus=2, k_minus=2)
    with pytest.raises(ValueError, match="length"):
        one_run_epsilon_lower_bound(scores[:9], included, k_plus=2, k_minus=2)
    with pytest.raises(ValueError, match="NaN"):
        one_run_epsilon_lower_bound(np.where(included, np.nan, 0.0), included, k_plus=2, k_minus=2)
    with pytest.raises(ValueError):
        max_epsilon_for_guesses(11, 10, 100, 0.0, 0.95)


# --------------------------------------------------------------------------- #
# Heuristic ε estimate
# --------------------------------------------------------------------------- #
def test_heuristic_near_zero_for_random_scores() -> None:
    rng = np.random.default_rng(0)
    for seed in range(5):
        labels = rng.random(2000) < 0.5
        result = heuristic_epsilon(rng.normal(size=2000), labels, seed=seed)
        assert result["epsilon_estimate"] < 0.1
        assert result["kind"] == "estimate (not a bound)"


def test_heuristic_large_for_separable_scores() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < 0.5
    scores = labels + rng.normal(0.0, 0.05, 2000)
    result = heuristic_epsilon(scores, labels, seed=3)
    assert result["epsilon_estimate"] > 4.0
    assert 0.2 < result["threshold"] < 0.8
    assert result["kind"] == "estimate (not a bound)"
    assert result["tpr_lo"] > 0.95 and result["fpr_hi"] < 0.05 and result["fnr_hi"] < 0.05
    assert heuristic_epsilon(scores, labels, seed=3) == result  # seeded split is reproducible
    with_delta = heuristic_epsilon(scores, labels, seed=3, delta=0.1)
    assert with_delta["epsilon_estimate"] < result["epsilon_estimate"]


def test_heuristic_validation_errors() -> None:
    scores = np.linspace(0, 1, 10)
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="NaN"):
        heuristic_epsilon(np.where(labels, np.nan, 0.0), labels)
    with pytest.raises(ValueError, match="length"):
        heuristic_epsilon(scores, labels[:8])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        heuristic_epsilon(scores, labels + 1)
    with pytest.raises(ValueError, match="members"):
        heuristic_epsilon(scores, np.zeros(10, dtype=int))
