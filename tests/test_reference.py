"""Tests for attacks.reference: LiRA and RMIA (docs/methods.md §8)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from attacks.reference import (
    UndefinedScoreWarning,
    choose_rmia_a,
    fit_lira,
    lira_scores,
    rmia_scores,
)


def _balanced_mask(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """K×N mask in which every example is IN exactly K/2 references (random which)."""
    return np.argsort(rng.random((k, n)), axis=0) < k // 2


def _gaussian_case(k: int = 16, n: int = 4000, delta: float = 2.0, sigma: float = 1.0,
                   seed: int = 0, m: int = 0) -> dict:
    """Per-example μ_out ~ N(0, 1), μ_in = μ_out + Δ, noise σ; target includes a random half.

    With ``m > 0`` also a population of m extra records that no model trained on.
    """
    rng = np.random.default_rng(seed)
    mu_out = rng.normal(0.0, 1.0, n)
    mu_in = mu_out + delta
    ref_in = _balanced_mask(rng, k, n)
    ref_stats = np.where(ref_in, mu_in, mu_out) + sigma * rng.normal(size=(k, n))
    target_in = rng.random(n) < 0.5
    target = np.where(target_in, mu_in, mu_out) + sigma * rng.normal(size=n)
    case = dict(mu_in=mu_in, mu_out=mu_out, ref_in=ref_in, ref_stats=ref_stats,
                target_in=target_in, target=target, sigma=sigma, delta=delta)
    if m:
        pop_mu = rng.normal(0.0, 1.0, m)
        case["pop_target"] = pop_mu + sigma * rng.normal(size=m)
        case["pop_refs"] = pop_mu + sigma * rng.normal(size=(k, m))
    return case


def _true_llr(case: dict) -> np.ndarray:
    s, sig = case["target"], case["sigma"]
    return norm.logpdf(s, case["mu_in"], sig) - norm.logpdf(s, case["mu_out"], sig)


# ---------------------------------------------------------------------------------------------
# LiRA


@pytest.mark.parametrize("k", [16, 64])
def test_lira_fit_recovers_parameters(k):
    case = _gaussian_case(k=k)
    fit = fit_lira(case["ref_stats"], case["ref_in"])
    assert (fit["n_in"] == k // 2).all() and (fit["n_out"] == k // 2).all()
    expected_rmse = case["sigma"] / math.sqrt(k / 2)  # standard error of a mean of K/2 draws
    for side in ("in", "out"):
        rmse = np.sqrt(np.mean((fit[f"mu_{side}"] - case[f"mu_{side}"]) ** 2))
        assert rmse == pytest.approx(expected_rmse, rel=0.1)
        # pooled over N·(K/2 − 1) ≥ 28 000 degrees of freedom: within 3 %
        assert fit[f"sigma_{side}"] == pytest.approx(case["sigma"], rel=0.03)


def test_lira_pooled_variance_definition():
    """σ² is the (n − 1)-weighted mean of the per-example unbiased variances."""
    rng = np.random.default_rng(3)
    stats = rng.normal(size=(6, 40))
    mask = rng.random((6, 40)) < 0.5
    fit = fit_lira(stats, mask)
    for side_mask, key in ((mask, "sigma_in"), (~mask, "sigma_out")):
        num = den = 0.0
        for j in range(stats.shape[1]):
            vals = stats[side_mask[:, j], j]
            if vals.size >= 2:
                num += np.var(vals, ddof=1) * (vals.size - 1)
                den += vals.size - 1
        assert fit[key] == pytest.approx(math.sqrt(num / den), rel=1e-12)


@pytest.mark.parametrize("k", [16, 64])
def test_lira_online_matches_closed_form(k):
    case = _gaussian_case(k=k)
    scores = lira_scores(case["target"], case["ref_stats"], case["ref_in"], online=True)
    fit = fit_lira(case["ref_stats"], case["ref_in"])
    s = case["target"]
    exact = (norm.logpdf(s, fit["mu_in"], fit["sigma_in"])
             - norm.logpdf(s, fit["mu_out"], fit["sigma_out"]))
    np.testing.assert_allclose(scores, exact, rtol=1e-9, atol=1e-9)
    # Against the true parameters the error comes from estimating μ from K/2 draws:
    # first order, (s−μ_in)/σ²·e_in − (s−μ_out)/σ²·e_out with e ~ N(0, σ²/(K/2)), so
    # E|error| ≤ √(2/π)·√((2 + Δ²/σ²)·2/K).
    d = case["delta"] / case["sigma"]
    bound = math.sqrt(2 / math.pi) * math.sqrt((2 + d**2) * 2 / k)
    err = np.abs(scores - _true_llr(case)).mean()
    assert err < 1.05 * bound
    assert err > 0.5 * bound  # the estimation noise is real; guards against a leaky test


def test_lira_online_auc_close_to_theory():
    case = _gaussian_case(k=16, n=4000, delta=2.0, sigma=1.0)
    scores = lira_scores(case["target"], case["ref_stats"], case["ref_in"])
    theory = norm.cdf(case["delta"] / (case["sigma"] * math.sqrt(2)))
    assert roc_auc_score(case["target_in"], scores) == pytest.approx(theory, abs=0.03)


def test_lira_offline_is_gaussian_cdf():
    case = _gaussian_case(k=16, n=500, seed=1)
    scores = lira_scores(case["target"], case["ref_stats"], case["ref_in"], online=False)
    fit = fit_lira(case["ref_stats"], case["ref_in"])
    expected = norm.cdf((case["target"] - fit["mu_out"]) / fit["sigma_out"])
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert roc_auc_score(case["target_in"], scores) > 0.8


def test_lira_nan_for_missing_sides_and_counted():
    case = _gaussian_case(k=8, n=50, seed=2)
    ref_in = case["ref_in"].copy()
    ref_in[:, :3] = True    # no OUT reference
    ref_in[:, 3:7] = False  # no IN reference
    with pytest.warns(UndefinedScoreWarning, match=r"^7 of 50 examples"):
        online = lira_scores(case["target"], case["ref_stats"], ref_in, online=True)
    assert np.isnan(online[:7]).all() and np.isfinite(online[7:]).all()
    with pytest.warns(UndefinedScoreWarning, match=r"^3 of 50 examples"):
        offline = lira_scores(case["target"], case["ref_stats"], ref_in, online=False)
    assert np.isnan(offline[:3]).all() and np.isfinite(offline[3:]).all()
    fit = fit_lira(case["ref_stats"], ref_in)
    assert np.isnan(fit["mu_out"][:3]).all() and np.isnan(fit["mu_in"][3:7]).all()
    assert (fit["n_out"][:3] == 0).all() and (fit["n_in"][3:7] == 0).all()


def test_lira_no_warning_when_all_defined():
    case = _gaussian_case(k=4, n=30, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(lira_scores(case["target"], case["ref_stats"], case["ref_in"])).all()


def test_lira_input_validation():
    stats = np.zeros((4, 5)) + np.arange(5)
    mask = np.zeros((4, 5), dtype=bool)
    mask[:2] = True
    stats = stats + np.random.default_rng(0).normal(size=(4, 5))
    target = np.zeros(5)
    with pytest.raises(ValueError, match="at least 2 reference"):
        lira_scores(target, stats[:1], mask[:1])
    with pytest.raises(ValueError, match="boolean"):
        lira_scores(target, stats, mask.astype(int))
    with pytest.raises(ValueError, match="shape"):
        lira_scores(target, stats, mask[:, :4])
    with pytest.raises(ValueError, match="entries"):
        lira_scores(target[:4], stats, mask)
    bad = stats.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lira_scores(target, bad, mask)
    with pytest.raises(ValueError, match="NaN"):
        lira_scores(np.full(5, np.nan), stats, mask)
    with pytest.raises(ValueError, match="do not vary"):
        lira_scores(target, np.ones((4, 5)), mask)


# ---------------------------------------------------------------------------------------------
# RMIA


def _brute_rmia(target_logq, ref_logq, ref_in, pop_target_logq, pop_ref_logq, pop_ref_in,
                offline, a, gamma):
    """Literal double loop over (x, z) in probability space."""
    def pr(q_refs, inc):
        if not offline:
            return float(np.mean(q_refs))
        out = q_refs[~inc]
        if out.size == 0:
            return math.nan
        return ((1 + a) * out.mean() + (1 - a)) / 2

    k, n = ref_logq.shape
    m = pop_ref_logq.shape[1]
    lr_z = [math.exp(pop_target_logq[j]) / pr(np.exp(pop_ref_logq[:, j]), pop_ref_in[:, j])
            for j in range(m)]
    lr_z = [v for v in lr_z if not math.isnan(v)]
    scores = []
    for i in range(n):
        lr_x = math.exp(target_logq[i]) / pr(np.exp(ref_logq[:, i]), ref_in[:, i])
        if math.isnan(lr_x):
            scores.append(math.nan)
            continue
        scores.append(sum(lr_x / lr > gamma for lr in lr_z) / len(lr_z))
    return np.array(scores)


@pytest.mark.parametrize("offline,a,gamma", [(False, None, 1.0), (True, 0.3, 1.0),
                                             (True, 1.0, 1.0), (True, 0.0, 1.5),
                                             (False, None, 0.8)])
def test_rmia_matches_brute_force(offline, a, gamma):
    rng = np.random.default_rng(11)
    k, n, m = 5, 13, 17
    ref_logq = rng.normal(-1.5, 0.7, (k, n))
    ref_in = rng.random((k, n)) < 0.5
    ref_in[:, 0] = False
    ref_in[:, 1] = True  # no OUT reference: NaN offline
    target = rng.normal(-1.5, 0.7, n)
    pop_refs = rng.normal(-1.5, 0.7, (k, m))
    pop_in = rng.random((k, m)) < 0.3
    pop_target = rng.normal(-1.5, 0.7, m)
    # a population record identical to example 2: LR(x) / LR(z) = 1 exactly, which must not
    # count as > γ for γ = 1 (a strict inequality)
    pop_target[0], pop_refs[:, 0], pop_in[:, 0] = target[2], ref_logq[:, 2], ref_in[:, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedScoreWarning)
        got = rmia_scores(target, ref_logq, ref_in, pop_target, pop_refs, offline=offline,
                          a=a, gamma=gamma, pop_ref_in=pop_in)
    want = _brute_rmia(target, ref_logq, ref_in, pop_target, pop_refs, pop_in,
                       offline, a, gamma)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.isnan(got[1]) == offline
    finite = got[np.isfinite(got)]
    assert ((finite >= 0) & (finite <= 1)).all()


def test_rmia_nan_counted_and_population_default():
    rng = np.random.default_rng(4)
    ref_logq = rng.normal(-1, 0.5, (4, 10))
    ref_in = rng.random((4, 10)) < 0.5
    ref_in[:, :2] = True
    ref_in[:, 2:] &= np.arange(4)[:, None] < 3  # every other example has an OUT reference
    pop_refs = rng.normal(-1, 0.5, (4, 6))
    with pytest.warns(UndefinedScoreWarning, match=r"^2 of 10 examples"):
        off = rmia_scores(rng.normal(-1, 0.5, 10), ref_logq, ref_in,
                          rng.normal(-1, 0.5, 6), pop_refs, offline=True, a=0.5)
    assert np.isnan(off[:2]).all() and np.isfinite(off[2:]).all()
    pop_in = np.zeros((4, 6), dtype=bool)
    pop_in[:, 0] = True  # one population record with no OUT reference: left out, counted
    with pytest.warns(UndefinedScoreWarning) as record:
        rmia_scores(rng.normal(-1, 0.5, 10), ref_logq, ref_in, rng.normal(-1, 0.5, 6),
                    pop_refs, offline=True, a=0.5, pop_ref_in=pop_in)
    messages = sorted(str(w.message) for w in record)
    assert messages[0].startswith("1 of 6 population records have no OUT reference")
    assert messages[1].startswith("2 of 10 examples")


@pytest.mark.parametrize("offline,a", [(False, None), (True, 1.0)])
def test_rmia_invariant_to_common_rescaling(offline, a):
    """Multiplying every q by c (adding log c everywhere) leaves the scores unchanged.

    Holds online and offline with a = 1; for a < 1 the "+ (1 − a)" term treats q as a
    probability, so a rescaling legitimately changes offline scores.
    """
    case = _gaussian_case(k=8, n=300, m=200, seed=6)
    args = [case["target"] - 2.0, case["ref_stats"] - 2.0, case["ref_in"],
            case["pop_target"] - 2.0, case["pop_refs"] - 2.0]
    base = rmia_scores(*args, offline=offline, a=a)
    shifted = [x + 3.7 if x.dtype != bool else x for x in args]
    np.testing.assert_array_equal(rmia_scores(*shifted, offline=offline, a=a), base)


@pytest.mark.parametrize("offline", [False, True])
def test_rmia_detects_membership_on_gaussian_case(offline):
    case = _gaussian_case(k=16, n=2000, m=2000, delta=1.0, seed=7)
    shift = -2.5  # log q = mean token log-prob, below 0
    scores = rmia_scores(case["target"] + shift, case["ref_stats"] + shift, case["ref_in"],
                         case["pop_target"] + shift, case["pop_refs"] + shift,
                         offline=offline)
    assert ((scores >= 0) & (scores <= 1)).all()
    auc = roc_auc_score(case["target_in"], scores)
    assert auc > 0.7
    # calibrating by references beats the raw target statistic here
    assert auc > roc_auc_score(case["target_in"], case["target"]) + 0.05


def test_rmia_input_validation():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(3, 5))
    mask = rng.random((3, 5)) < 0.5
    target, pop_t, pop_r = rng.normal(size=5), rng.normal(size=4), rng.normal(size=(3, 4))
    with pytest.raises(ValueError, match="at least 2 reference"):
        rmia_scores(target, refs[:1], mask[:1], pop_t, pop_r[:1], a=0.5)
    with pytest.raises(ValueError, match="boolean"):
        rmia_scores(target, refs, mask.astype(float), pop_t, pop_r, a=0.5)
    with pytest.raises(ValueError, match="reference rows"):
        rmia_scores(target, refs, mask, pop_t, pop_r[:2], a=0.5)
    with pytest.raises(ValueError, match="pop_target_logq"):
        rmia_scores(target, refs, mask, pop_t[:3], pop_r, a=0.5)
    with pytest.raises(ValueError, match="NaN"):
        rmia_scores(np.full(5, np.nan), refs, mask, pop_t, pop_r, a=0.5)
    with pytest.raises(ValueError, match="gamma"):
        rmia_scores(target, refs, mask, pop_t, pop_r, a=0.5, gamma=0.0)
    with pytest.raises(ValueError, match=r"a must lie"):
        rmia_scores(target, refs, mask, pop_t, pop_r, a=1.5)
    with pytest.raises(ValueError, match="population"):
        rmia_scores(target, refs, mask, pop_t, pop_r, a=0.5,
                    pop_ref_in=np.ones((3, 4), dtype=bool))


def _self_attack_aucs(ref_logq, ref_in, pop_refs, grid):
    """Mean over references-as-target of the offline RMIA AUC, for each a (via rmia_scores)."""
    k = ref_logq.shape[0]
    aucs = np.zeros(len(grid))
    for t in range(k):
        others = np.arange(k) != t
        for i, a in enumerate(grid):
            s = rmia_scores(ref_logq[t], ref_logq[others], ref_in[others], pop_refs[t],
                            pop_refs[others], offline=True, a=a)
            aucs[i] += roc_auc_score(ref_in[t], s)
    return aucs / k


def _difficulty_case(shared: float, noise: float, seed: int, k: int = 8, n: int = 600,
                     m: int = 400):
    """log q_k(x) = −2 + shared·d(x) + 0.5·IN + noise·ε: large `shared` rewards calibration."""
    rng = np.random.default_rng(seed)
    ref_in = _balanced_mask(rng, k, n)
    d, d_pop = rng.normal(size=n), rng.normal(size=m)
    ref_logq = -2 + shared * d + 0.5 * ref_in + noise * rng.normal(size=(k, n))
    pop_refs = -2 + shared * d_pop + noise * rng.normal(size=(k, m))
    return ref_logq, ref_in, pop_refs


@pytest.mark.parametrize("shared,noise,favoured", [(2.0, 0.3, 1.0), (0.0, 1.0, 0.0)])
def test_choose_rmia_a_picks_the_maximiser(shared, noise, favoured):
    """Shared per-example difficulty → full calibration (a = 1) wins; when the references
    carry only independent noise, dividing by their mean hurts and a = 0 wins."""
    ref_logq, ref_in, pop_refs = _difficulty_case(shared, noise, seed=8)
    grid = np.linspace(0, 1, 6)
    chosen = choose_rmia_a(ref_logq, ref_in, pop_refs, grid=grid)
    assert chosen in grid
    aucs = _self_attack_aucs(ref_logq, ref_in, pop_refs, grid)
    assert chosen == grid[int(np.argmax(aucs))]
    assert chosen == favoured
    assert aucs.max() - aucs.min() > 0.01  # the case really separates the grid values


def test_choose_rmia_a_default_grid_and_use_in_rmia():
    ref_logq, ref_in, pop_refs = _difficulty_case(2.0, 0.3, seed=9, k=6, n=300, m=200)
    a = choose_rmia_a(ref_logq, ref_in, pop_refs)
    assert a in np.linspace(0, 1, 11)
    single = choose_rmia_a(ref_logq, ref_in, pop_refs, target_ref=0)
    assert single in np.linspace(0, 1, 11)
    rng = np.random.default_rng(1)
    target, pop_t = rng.normal(-2, 1, 300), rng.normal(-2, 1, 200)
    np.testing.assert_array_equal(
        rmia_scores(target, ref_logq, ref_in, pop_t, pop_refs, offline=True),
        rmia_scores(target, ref_logq, ref_in, pop_t, pop_refs, offline=True, a=a))


def test_choose_rmia_a_validation():
    ref_logq, ref_in, pop_refs = _difficulty_case(1.0, 0.3, seed=1, k=4, n=40, m=20)
    with pytest.raises(ValueError, match="grid"):
        choose_rmia_a(ref_logq, ref_in, pop_refs, grid=[0.5, 1.2])
    with pytest.raises(ValueError, match="grid"):
        choose_rmia_a(ref_logq, ref_in, pop_refs, grid=[])
    with pytest.raises(ValueError, match="target_ref"):
        choose_rmia_a(ref_logq, ref_in, pop_refs, target_ref=4)
    with pytest.raises(ValueError, match="no reference model can serve"):
        choose_rmia_a(ref_logq, np.ones_like(ref_in), pop_refs)
