"""LMO-DP (Yang et al., arXiv 2405.18776) as a noise mechanism, and an audit of its claim.

Per coordinate the authors draw ``u = a1·Gamma(k, θ) + a3·Exponential(E) + a4·Uniform(a, b)``
and add ``z ~ Laplace(0, 1/u)`` to the sum of clipped per-sample gradients; the noise is not
scaled by the clipping norm C, so the sensitivity is Δ = C (docs/methods.md §6).

Three numbers come out, always labelled, and the first is never a guarantee:

- ``claimed_epsilon``: what the authors' procedure reports (their per-step RDP formula for
  the mixture, turned into a per-step ε, paired with a Gaussian of σ = √(2 ln(1.25/δ))/ε_step
  under the subsampled-Gaussian RDP accountant);
- ``pld_lower_bound``: a lower bound on the true ε of the noise as sampled (a one-coordinate
  privacy-loss distribution, Poisson-subsampled and composed with dp-accounting);
- the empirical lower bound of docs/methods.md §11, computed elsewhere and passed in.
"""
from __future__ import annotations

import json
import math
import numbers
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The RDP orders of the authors' accountant (integers 2..128); the claimed number depends on
# this grid, so it is part of reproducing it.
AUTHORS_ORDERS: tuple[int, ...] = tuple(range(2, 129))


@dataclass(frozen=True)
class LMOParams:
    """One LMO-DP parameter set and the run it is used in.

    ``exp_rate`` (E) is the *rate* of the Exponential component (mean 1/E). The authors'
    sampler passes E to numpy as its *scale* (mean E) while their accounting treats it as a
    rate; kdaudit samples with E as a rate, so the noise is the one their accounting is about.
    ``clip`` is the per-sample clipping norm C, which is also the sensitivity.
    """

    a1: float
    a3: float
    a4: float
    shape_k: float
    scale_theta: float
    exp_rate: float
    uniform_low: float
    uniform_high: float
    delta: float
    sample_rate: float
    steps: int
    clip: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want_int = f.name == "steps"
            kind_ok = isinstance(v, numbers.Integral if want_int else numbers.Real)
            if isinstance(v, bool) or not kind_ok or not math.isfinite(v):
                kind = "an integer" if want_int else "a finite number"
                raise ValueError(f"field '{f.name}' must be {kind}, got {v!r}")
        checks = [
            ("a1", self.a1 >= 0, ">= 0"), ("a3", self.a3 >= 0, ">= 0"),
            ("a4", self.a4 >= 0, ">= 0"),
            ("a1", self.a1 + self.a3 + self.a4 > 0, "> 0 for at least one of a1, a3, a4"),
            ("shape_k", self.shape_k > 0, "> 0"), ("scale_theta", self.scale_theta > 0, "> 0"),
            ("exp_rate", self.exp_rate > 0, "> 0"),
            ("uniform_low", self.uniform_low >= 0, ">= 0 (u must stay positive)"),
            ("uniform_high", self.uniform_high > self.uniform_low, "> uniform_low"),
            ("delta", 0 < self.delta < 1, "in (0, 1)"),
            ("sample_rate", 0 < self.sample_rate <= 1, "in (0, 1]"),
            ("steps", self.steps >= 1, ">= 1"), ("clip", self.clip > 0, "> 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"field '{name}' must be {expected}, got {getattr(self, name)!r}")


def load_lmo_params(path: str | Path) -> LMOParams:
    """Read an LMOParams from a TOML or JSON file; errors name the file and the field."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {e}")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of LMO-DP parameters")
    known = [f.name for f in fields(LMOParams)]
    for key in data:
        if key not in known:
            raise ValueError(f"{path}: unknown field '{key}' (expected fields: {', '.join(known)})")
    required = [f.name for f in fields(LMOParams) if f.name != "clip"]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(repr(m) for m in missing)}")
    try:
        return LMOParams(**data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def sample_noise(shape: tuple[int, ...] | torch.Size, params: LMOParams,
                 generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LMO-DP noise of the given shape, on the generator's device, reproducible from it.

    Per coordinate: u = a1·Gamma(k, θ) + a3·Exponential(rate E) + a4·Uniform(a, b), then
    z = Laplace(0, 1/u), drawn as (e1 − e2)/u with e1, e2 standard exponentials. Not scaled
    by the clipping norm (the sensitivity is C).
    """
    p, g, dev = params, generator, generator.device
    kw = {"dtype": torch.float64, "device": dev}
    # torch.distributions.Gamma takes no generator; _standard_gamma is what it calls.
    gamma = torch._standard_gamma(torch.full(tuple(shape), float(p.shape_k), **kw), generator=g)
    u = p.a1 * p.scale_theta * gamma
    u = u + p.a3 * torch.empty(tuple(shape), **kw).exponential_(p.exp_rate, generator=g)
    u = u + p.a4 * torch.empty(tuple(shape), **kw).uniform_(p.uniform_low, p.uniform_high,
                                                             generator=g)
    e1 = torch.empty(tuple(shape), **kw).exponential_(1.0, generator=g)
    e2 = torch.empty(tuple(shape), **kw).exponential_(1.0, generator=g)
    return ((e1 - e2) / u).to(dtype)


def laplace_transform(params: LMOParams, t: np.ndarray | float) -> np.ndarray:
    """E[exp(−t·u)] for t >= 0, in closed form (the three components are independent).

    This is also the noise tail: P(z > t) = ½·E[exp(−t·u)], and E|z| = E[1/u] = ∫ it dt.
    """
    p = params
    t = np.asarray(t, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = (1 + p.a1 * p.scale_theta * t) ** (-p.shape_k)
        out = out * (p.exp_rate / (p.exp_rate + p.a3 * t))
        w = p.a4 * (p.uniform_high - p.uniform_low) * t
        unif = np.where(w > 0, -np.expm1(-w) / np.where(w > 0, w, 1), 1.0)
        out = out * np.exp(-p.a4 * p.uniform_low * t) * unif
    return np.where(np.isinf(t), 0.0, out)


# ---------------------------------------------------------------- (a) the authors' claim

def _authors_mgf(p: LMOParams, t: float, strict: bool) -> float:
    """E[exp(t·C·u)] by the authors' closed forms. Outside the region where the MGF exists
    (a1·θ·t·C >= 1 or a3·t·C >= E) the true value is +inf; ``strict=False`` evaluates the
    formulas there anyway, as the authors' code does."""
    a1, a3, a4 = p.a1 * p.clip, p.a3 * p.clip, p.a4 * p.clip
    base = 1 - a1 * p.scale_theta * t
    den = p.exp_rate - a3 * t
    if base == 0 or den == 0 or (strict and (base < 0 or den < 0)):
        return math.inf
    if base < 0 and not float(p.shape_k).is_integer():
        return math.nan  # a complex number in the authors' code: the order is dropped
    m = base ** (-p.shape_k) * (p.exp_rate / den)
    if a4 > 0 and t != 0:
        try:
            m *= (math.exp(a4 * t * p.uniform_high) - math.exp(a4 * t * p.uniform_low)) / (
                a4 * t * (p.uniform_high - p.uniform_low))
        except OverflowError:
            return math.inf
    return m


def authors_step_rdp(params: LMOParams, strict: bool = False) -> np.ndarray:
    """The authors' per-step RDP of the mixture at AUTHORS_ORDERS (inf where undefined):
    RDP(α) = log[(α·M(α−1) + (α−1)·M(−α)) / (2α−1)] / (α−1), M the MGF of C·u, i.e. the
    Laplace RDP of Mironov (2017) with 1/b = C·u, averaged over u inside the logarithm."""
    p = params
    if p.a1 * p.clip * p.scale_theta >= 1 or p.a3 * p.clip >= p.exp_rate:
        raise ValueError("the authors' accounting is undefined for these parameters: it "
                         "needs a1·C·θ < 1 and a3·C < exp_rate (their check at order 2)")
    out = []
    for a in AUTHORS_ORDERS:
        m1, m2 = _authors_mgf(p, a - 1, strict), _authors_mgf(p, -a, strict)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = float(np.log((a * m1 + (a - 1) * m2) / (2 * a - 1)) / (a - 1))
        out.append(v if math.isfinite(v) and v > 0 else math.inf)
    return np.array(out)


def claimed_step_epsilon(params: LMOParams, strict: bool = False) -> float:
    """The per-step ε the authors derive: their RDP curve at one step, converted at δ."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = authors_step_rdp(params, strict)
    if not np.isfinite(rdp).any():
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(AUTHORS_ORDERS), rdp=rdp, delta=params.delta)
    return float(eps)


def claimed_epsilon(params: LMOParams, strict: bool = False) -> float:
    """The overall ε the LMO-DP method claims (NOT a guarantee).

    Reproduces the authors' procedure: per-step ε from their RDP formula, then a Gaussian
    with σ = √(2 ln(1.25/δ))/ε_step composed over ``steps`` at ``sample_rate`` by Opacus'
    subsampled-Gaussian RDP accountant on their order grid 2..128. Their code evaluates the
    closed-form MGFs also at orders where the MGF is infinite (for the reference set, orders
    >= 52, where two negative factors multiply to a finite positive number); that is where
    their per-step ε ≈ 0.29 comes from. ``strict=True`` treats those orders as infinite.
    """
    from opacus.accountants import RDPAccountant

    eps_step = claimed_step_epsilon(params, strict)
    if not math.isfinite(eps_step) or eps_step <= 0:
        return math.inf
    sigma = math.sqrt(2 * math.log(1.25 / params.delta)) / eps_step
    acc = RDPAccountant()
    acc.history = [(sigma, params.sample_rate, params.steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(params.delta, alphas=list(AUTHORS_ORDERS)))


# ---------------------------------------------------------------- (b) a lower bound

def _bin_masses(p: LMOParams, edges: np.ndarray, shift: float) -> np.ndarray:
    """P(edges[i] < z + shift <= edges[i+1]) for the LMO noise z, from its closed-form tail."""
    lo, hi = edges[:-1] - shift, edges[1:] - shift
    L = lambda x: laplace_transform(p, np.abs(x))  # noqa: E731
    left = 0.5 * (L(hi) - L(lo))           # both ends <= 0: F(x) = ½ L(−x)
    right = 0.5 * (L(lo) - L(hi))          # both ends >= 0: 1 − F(x) = ½ L(x)
    mid = 1 - 0.5 * L(lo) - 0.5 * L(hi)    # the bin straddles 0
    return np.clip(np.where(hi <= 0, left, np.where(lo >= 0, right, mid)), 0, None)


def _output_grid(p: LMOParams, n_central: int) -> np.ndarray:
    """Bin edges: fine uniform bins around [0, C], geometric bins further out, open tails."""
    mean_u = (p.a1 * p.shape_k * p.scale_theta + p.a3 / p.exp_rate
              + p.a4 * (p.uniform_low + p.uniform_high) / 2)
    w = 30.0 / mean_u  # 30 noise scales
    central = np.linspace(-w, p.clip + w, n_central + 1)
    outer = np.geomspace(w, w * 1e4, 400)[1:]
    return np.concatenate([[-np.inf], -outer[::-1], central, p.clip + outer, [np.inf]])


def _pld_epsilon(upper: np.ndarray, lower: np.ndarray, steps: int, delta: float,
                 interval: float) -> float:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

    # Bins where a mass underflowed to 0 are dropped (optimistic): the true masses are > 0.
    keep = (upper > 0) & (lower > 0)
    keys = np.floor(np.log(upper[keep] / lower[keep]) / interval).astype(np.int64)  # optimistic
    uniq, inv = np.unique(keys, return_inverse=True)
    mass = np.bincount(inv, weights=upper[keep])
    pmf = {int(k): float(m) for k, m in zip(uniq, mass)}
    pld = PrivacyLossDistribution.create_from_rounded_probability(
        pmf, 0.0, interval, pessimistic_estimate=False)
    return float(pld.self_compose(steps).get_epsilon_for_delta(delta))


def pld_lower_bound(params: LMOParams, n_central: int = 20_000,
                    value_discretization_interval: float = 1e-5) -> float:
    """A lower bound on the true ε of the LMO-DP noise as sampled, at ``params.delta``.

    The one-coordinate mechanism x + z, z with density E_u[(u/2)·exp(−u|z|)], neighbours
    x = 0 and x = C, Poisson-subsampled at q (remove: ((1−q)·f + q·f(·−C)) vs f; add: the
    reverse), composed over ``steps`` with dp-accounting's PLD, the larger ε of the two
    directions. It is a lower bound because (1) a gradient difference of norm C lying on one
    coordinate is one admissible neighbouring pair of the real d-dimensional mechanism, and
    the other coordinates then carry no information; (2) the output is binned, which is
    post-processing and can only lower ε; (3) privacy losses are rounded down (optimistic
    discretisation) and truncated tail mass is dropped. The bin masses come from the
    closed-form tail ½·E[exp(−t·u)] (no quadrature needed; tests check it numerically).
    """
    p = params
    edges = _output_grid(p, n_central)
    f = _bin_masses(p, edges, 0.0)
    g = _bin_masses(p, edges, p.clip)
    mix = (1 - p.sample_rate) * f + p.sample_rate * g
    args = (p.steps, p.delta, value_discretization_interval)
    return max(_pld_epsilon(mix, f, *args), _pld_epsilon(f, mix, *args))


# ---------------------------------------------------------------- the report

@dataclass(frozen=True)
class LMOReport:
    """The three labelled LMO-DP numbers at one δ. The claim is never a guarantee."""

    claimed: float
    pld_lower_bound: float
    empirical: float | None = None
    delta: float | None = None

    @property
    def claim_fails(self) -> bool:
        """True when a lower bound on the true ε exceeds the claimed ε."""
        bounds = [self.pld_lower_bound] + ([self.empirical] if self.empirical is not None else [])
        return any(b > self.claimed for b in bounds)

    def lines(self) -> list[str]:
        at = f" at delta={self.delta:g}" if self.delta is not None else ""
        emp = "none" if self.empirical is None else f"{self.empirical:.4f}"
        return [
            f"LMO-DP claimed epsilon{at} (the authors' accounting; a claim, not a guarantee): "
            f"{self.claimed:.4f}",
            f"Lower bound on the true epsilon{at} (PLD of the noise as sampled, one coordinate):"
            f" {self.pld_lower_bound:.4f}",
            f"Empirical lower bound on epsilon (privacy audit): {emp}",
        ]


def lmo_report(params: LMOParams, empirical: float | None = None) -> LMOReport:
    return LMOReport(claimed_epsilon(params), pld_lower_bound(params), empirical, params.delta)
