"""DP-SGD plans (docs/methods.md §5): how much noise the one training loop adds, and what it spent.

The loop applies a plan with Opacus (`kdaudit.train.dp`); this module builds it:
- The unit: N is the number of persons (the default; `Record.person`) or of records
  (`unit = "record"`), and everything below is per unit: q, δ and the ε.
- Gaussian: σ solved from the target ε by `accounting.solve_noise_multiplier` (0.1% in ε),
  at q = 1 / ⌈N / batch_size⌉, exactly the rate Opacus's Poisson loader samples at; δ
  defaults to 1/(10 N); the ε spent is reported by `accounting.account`. At the record level
  the ε of the largest person (k records) is reported beside it (`accounting.group_epsilon`).
- LMO-DP (`kdaudit.dp.lmo`): the Gaussian noise is replaced by LMO-DP noise, per coordinate
  Laplace(0, 1/u), added to the sum of clipped per-sample gradients and not scaled by C.
  Its parameters come from a file whose clip must be the run's C; the run's own q, steps
  and δ are what is reported: the ε the method claims (never a guarantee) beside a PLD
  lower bound on the true ε.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

from kdaudit.config import DPConfig
from kdaudit.dp import lmo
from kdaudit.dp.accounting import PrivacySpent, account, default_delta, group_epsilon, \
    solve_noise_multiplier
from kdaudit.train.dp import DPPlan, units_of


def plan_for(persons: Sequence[str | None], batch_size: int, epochs: float,
             dp: DPConfig) -> DPPlan:
    """The plan for training examples of these persons (`Encoded.person`): N is the number of
    persons, or of examples at the record level, where the largest person's ε is reported."""
    people = units_of(persons, "person")
    n = len(people) if dp.unit == "person" else len(persons)
    return plan(n, batch_size, epochs, dp, largest_person=max(map(len, people), default=1))


def plan(n_units: int, batch_size: int, epochs: float, dp: DPConfig,
         largest_person: int = 1) -> DPPlan:
    """The noise for `epochs` of Poisson-sampled steps at q = 1 / ⌈N / batch_size⌉ (≈ B / N,
    exactly the rate Opacus's loader samples at) over `n_units` units: Gaussian (σ solved from
    dp.epsilon unless given), or LMO-DP from the dp.lmo_params file."""
    q = 1.0 / math.ceil(n_units / batch_size)
    steps = max(1, math.ceil(epochs / q))
    delta = dp.delta if dp.delta is not None else default_delta(n_units)
    if dp.mechanism == "lmo":
        p = _lmo_plan(q, steps, delta, dp)
    else:
        sigma = dp.noise_multiplier if dp.noise_multiplier is not None else \
            solve_noise_multiplier(dp.epsilon, q, steps, delta)
        p = DPPlan(sigma, q, steps, delta, dp.max_grad_norm)
        group = largest_person if dp.unit == "record" else 1
        p.account = functools.partial(_gaussian_spent, p, group)
    return dataclasses.replace(
        p, n_units=n_units, unit=dp.unit, reproducible_noise=dp.reproducible_noise,
        gradient_canaries=dp.gradient_canaries, canary_guess_fraction=dp.canary_guess_fraction)


def _gaussian_spent(p: DPPlan, group: int, steps_taken: int) -> dict[str, Any]:
    """What the run spent, by the accounting module (PRV reported, PLD and RDP beside); at the
    record level with persons of several records, the largest person's ε at the same δ."""
    s: PrivacySpent = account(p.noise_multiplier, p.sample_rate, steps_taken, p.delta)
    out = {**s.to_dict(), "max_grad_norm": p.max_grad_norm, "mechanism": "gaussian",
           "sampling": "poisson"}
    if group > 1:
        out["group_privacy"] = {
            "records": group, "delta": p.delta,
            "epsilon": group_epsilon(p.noise_multiplier, p.sample_rate, steps_taken, p.delta,
                                     group),
            "note": f"ε of a person with {group} records under record-level DP-SGD (each "
                    f"record drawn independently; PLD of the mixture of Gaussians)"}
    return out


def _lmo_plan(q: float, steps: int, delta: float, dp: DPConfig) -> DPPlan:
    if dp.noise_multiplier is not None:
        raise ValueError("dp.noise_multiplier is for Gaussian noise; mechanism 'lmo' takes its "
                         "noise from the parameter file")
    params = lmo.load_lmo_params(dp.lmo_params)
    if params.clip != dp.max_grad_norm:
        raise ValueError(f"{dp.lmo_params}: the LMO-DP parameters are for clip {params.clip:g} "
                         f"(the sensitivity of their noise), but the run's max_grad_norm is "
                         f"{dp.max_grad_norm:g}; make them equal")
    p = DPPlan(0.0, q, steps, delta, dp.max_grad_norm, "lmo",
               noise=functools.partial(_lmo_noise, params), details=params)
    lmo.claimed_step_epsilon(_run_params(p, steps))   # undefined accounting: fail before training
    p.account = lambda steps_taken: _lmo_spent(_run_params(p, steps_taken), str(dp.lmo_params))
    return p


def _lmo_noise(params: lmo.LMOParams, shape, generator, dtype):
    return lmo.sample_noise(shape, params, generator, dtype=dtype)


def _run_params(p: DPPlan, steps: int) -> lmo.LMOParams:
    """The file's noise at the run's own sample rate, steps, δ and clipping norm."""
    return dataclasses.replace(p.details, sample_rate=p.sample_rate, steps=steps,
                               delta=p.delta, clip=p.max_grad_norm)


_NOISE_FIELDS = ("a1", "a3", "a4", "shape_k", "scale_theta", "exp_rate", "uniform_low",
                 "uniform_high", "clip")


def _lmo_numbers(run: lmo.LMOParams) -> tuple[float, float, float]:
    return (lmo.claimed_epsilon(run), lmo.claimed_epsilon(run, strict=True),
            lmo.pld_lower_bound(run))


def _lmo_spent(run: lmo.LMOParams, params_file: str | None) -> dict[str, Any]:
    claimed, strict, lower = _lmo_numbers(run)
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no inf)
    return {
        "mechanism": "lmo", "sampling": "poisson",
        "epsilon_claimed": finite(claimed),
        "epsilon_claimed_finite_moments_only": finite(strict),
        "epsilon_pld_lower_bound": finite(lower),
        "claim_holds": not lower > claimed,
        "sample_rate": run.sample_rate, "steps": run.steps, "delta": run.delta,
        "max_grad_norm": run.clip,
        "lmo_params": {k: getattr(run, k) for k in _NOISE_FIELDS},
        "lmo_params_file": params_file,
        "note": "epsilon_claimed is what the LMO-DP authors' accounting claims, not a "
                "guarantee; epsilon_claimed_finite_moments_only is the same procedure "
                "restricted to the orders where its moments are finite, also not a guarantee "
                "nor a corrected epsilon; epsilon_pld_lower_bound is a lower bound on the true "
                "epsilon (one-coordinate PLD of the noise as sampled); null means infinite",
    }
