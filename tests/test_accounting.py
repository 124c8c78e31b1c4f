"""kdaudit.dp.accounting: the numbers equal the libraries' own, and the solver hits its target."""
from __future__ import annotations

import argparse
import math
import warnings

import pytest

from kdaudit.dp import accounting
from kdaudit.dp.accounting import (
    account,
    default_delta,
    epsilon,
    prv_eps_error,
    solve_noise_multiplier,
)

RUNS = [(1.0, 0.01, 1000, 1e-5), (0.8, 256 / 60000, 2000, 1e-6)]


def _opacus(kind: str, sigma: float, q: float, steps: int, delta: float, **kw) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta, **kw)


def _google_pld(sigma: float, q: float, steps: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def test_default_delta():
    assert default_delta(1000) == pytest.approx(1e-4)
    assert default_delta(1) == pytest.approx(0.1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n"):
            default_delta(bad)


@pytest.mark.parametrize("run", RUNS)
def test_epsilon_equals_the_libraries(run):
    rdp = _opacus("rdp", *run)
    assert epsilon(*run, accountant="rdp") == pytest.approx(rdp, rel=1e-12)
    prv = _opacus("prv", *run, eps_error=prv_eps_error(rdp))
    assert epsilon(*run) == pytest.approx(prv, rel=1e-9)
    assert epsilon(*run, accountant="prv") == pytest.approx(prv, rel=1e-9)
    pld = _google_pld(*run)
    assert epsilon(*run, accountant="pld") == pytest.approx(pld, rel=1e-9)
    # the two tight accountants agree; RDP is looser
    assert abs(prv - pld) / max(prv, pld) < 0.02
    assert rdp > max(prv, pld)


def test_account_collects_the_three():
    run = RUNS[0]
    spent = account(*run)
    assert (spent.noise_multiplier, spent.sample_rate, spent.steps, spent.delta) == run
    assert spent.epsilon == pytest.approx(epsilon(*run), rel=1e-9)
    assert spent.epsilon_pld == pytest.approx(epsilon(*run, accountant="pld"), rel=1e-9)
    assert spent.epsilon_rdp == pytest.approx(epsilon(*run, accountant="rdp"), rel=1e-12)
    gap = abs(spent.epsilon - spent.epsilon_pld) / max(spent.epsilon, spent.epsilon_pld)
    assert spent.relative_gap() == pytest.approx(gap)
    d = spent.to_dict()
    assert d["epsilon"] == spent.epsilon and d["accountant"] == "prv"
    assert d["relative_gap_prv_pld"] == pytest.approx(gap)


def test_prv_eps_error_scales_with_epsilon():
    assert prv_eps_error(8.0) == 1e-2
    assert prv_eps_error(0.5) == pytest.approx(2.5e-3)
    assert prv_eps_error(1e-6) == 1e-4


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, 8.0])
def test_solved_noise_multiplier_reaches_target(target):
    q, steps, delta = 0.01, 1000, 1e-5
    sigma = solve_noise_multiplier(target, q, steps, delta)
    achieved = epsilon(sigma, q, steps, delta)
    assert abs(achieved - target) / target <= 1e-3
    assert achieved <= target  # never over budget


@pytest.mark.parametrize("kwargs, field", [
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": -1.0}, "target_epsilon"),
    ({"target_epsilon": math.inf}, "target_epsilon"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"steps": 0}, "steps"),
    ({"steps": 10.5}, "steps"),
    ({"delta": 0.0}, "delta"),
    ({"delta": 1.0}, "delta"),
    ({"rel_tol": 0.0}, "rel_tol"),
])
def test_solver_rejects_bad_inputs(kwargs, field):
    args = {"target_epsilon": 2.0, "sample_rate": 0.01, "steps": 100, "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=field):
        solve_noise_multiplier(**args)


@pytest.mark.parametrize("args, field", [
    ((0.0, 0.01, 100, 1e-5), "noise_multiplier"),
    ((-1.0, 0.01, 100, 1e-5), "noise_multiplier"),
    ((1.0, 0.0, 100, 1e-5), "sample_rate"),
    ((1.0, 0.01, 0, 1e-5), "steps"),
    ((1.0, 0.01, 100, 2.0), "delta"),
])
def test_epsilon_rejects_bad_inputs(args, field):
    with pytest.raises(ValueError, match=field):
        epsilon(*args)


def test_unknown_accountant():
    with pytest.raises(ValueError, match="accountant"):
        epsilon(1.0, 0.01, 100, 1e-5, accountant="moments")
    assert accounting.ACCOUNTANTS == ("prv", "pld", "rdp")


def _parser() -> argparse.ArgumentParser:
    from kdaudit.dp.cli import add_privacy_parser

    ap = argparse.ArgumentParser(prog="kdaudit")
    add_privacy_parser(ap.add_subparsers(dest="command"))
    return ap


def test_cli_epsilon_mode(capsys):
    args = _parser().parse_args(["privacy", "--noise-multiplier", "1.0", "--sample-rate",
                                 "0.01", "--steps", "1000", "--n-records", "10000"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    spent = account(1.0, 0.01, 1000, 1e-5)
    assert f"epsilon (PRV, reported):    {spent.epsilon:.4f}" in out
    assert f"epsilon (PLD, cross-check): {spent.epsilon_pld:.4f}" in out
    assert f"epsilon (RDP, reference):   {spent.epsilon_rdp:.4f}" in out
    assert "PRV/PLD relative gap" in out


def test_cli_errors():
    ap = _parser()
    with pytest.raises(SystemExit):  # two modes at once: an argparse error
        ap.parse_args(["privacy", "--noise-multiplier", "1", "--epsilon", "2"])
    with pytest.raises(SystemExit):
        ap.parse_args(["privacy", "--epsilon", "2", "--delta", "1e-5", "--n-records", "10"])
    args = ap.parse_args(["privacy", "--epsilon", "2", "--sample-rate", "0.01", "--delta",
                          "1e-5"])
    with pytest.raises(ValueError, match="--steps"):
        args.fn(args)
