"""DP-SGD for the one training loop (METHODS §4), with Opacus.

- True Poisson sampling: Opacus's DPDataLoader draws every example with probability
  q = batch_size / N at every step, so batch sizes vary. It hands the loop index batches and
  is never wrapped by Accelerate (that would re-batch it and break the accounting).
- Per-sample clipping with Opacus's "hooks" grad samplers. Ghost clipping refuses the tied
  input/output embeddings of the zoo's gpt2, opt and llama models ("Parameter tying is not
  supported with Ghost Clipping", Opacus 1.6), so hooks it is for all three.
- OPT is refused with a clear error (`UNSUPPORTED`): its layers flatten batch and sequence,
  so per-layer hooks cannot separate examples.
- The loss is the mean over the batch of per-sequence mean token losses, so each example's
  gradient does not depend on the others' lengths (the sensitivity DP-SGD assumes).
- σ is solved from the target ε by `accounting.solve_noise_multiplier` (0.1% in ε), δ
  defaults to 1/(10 N), and the ε spent is reported by `accounting.account`.
- Mechanism "lmo" (METHODS §4, `kdaudit.dp.lmo`): the Gaussian noise is replaced by LMO-DP
  noise, per coordinate Laplace(0, 1/u), added to the sum of clipped per-sample gradients
  and not scaled by C (`lmo_optimizer_class`), drawn from a seeded generator. Its parameters
  come from a file whose clip must be the run's C; the run's own q, steps and δ are what is
  reported: the ε the method claims (never a guarantee) beside a PLD lower bound on the
  true ε.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdaudit.config import DPConfig
from kdaudit.dp import lmo
from kdaudit.dp.accounting import PrivacySpent, account, default_delta, solve_noise_multiplier


@dataclass
class DPPlan:
    noise_multiplier: float     # Gaussian σ / C; 0 for "lmo" (no Gaussian noise)
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    mechanism: str = "gaussian"           # "gaussian" | "lmo"
    lmo_params: lmo.LMOParams | None = None   # "lmo": the parameter file as read
    lmo_params_file: str | None = None


def plan(n_examples: int, batch_size: int, epochs: float, dp: DPConfig) -> DPPlan:
    """The noise for `epochs` of Poisson-sampled steps at q = 1 / ⌈N / batch_size⌉ (≈ B / N,
    exactly the rate Opacus's loader samples at): Gaussian (σ solved from dp.epsilon unless
    given), or LMO-DP from the dp.lmo_params file."""
    q = 1.0 / math.ceil(n_examples / batch_size)
    steps = max(1, math.ceil(epochs / q))
    delta = dp.delta if dp.delta is not None else default_delta(n_examples)
    if dp.mechanism == "lmo":
        return _lmo_plan(q, steps, delta, dp)
    sigma = dp.noise_multiplier if dp.noise_multiplier is not None else \
        solve_noise_multiplier(dp.epsilon, q, steps, delta)
    return DPPlan(sigma, q, steps, delta, dp.max_grad_norm)


def _lmo_plan(q: float, steps: int, delta: float, dp: DPConfig) -> DPPlan:
    if dp.noise_multiplier is not None:
        raise ValueError("dp.noise_multiplier is for Gaussian noise; mechanism 'lmo' takes its "
                         "noise from the parameter file")
    params = lmo.load_lmo_params(dp.lmo_params)
    if params.clip != dp.max_grad_norm:
        raise ValueError(f"{dp.lmo_params}: the LMO-DP parameters are for clip {params.clip:g} "
                         f"(the sensitivity of their noise), but the run's max_grad_norm is "
                         f"{dp.max_grad_norm:g}; make them equal")
    p = DPPlan(0.0, q, steps, delta, dp.max_grad_norm, "lmo", params, str(dp.lmo_params))
    lmo.claimed_step_epsilon(_run_params(p, steps))   # undefined accounting: fail before training
    return p


def _run_params(p: DPPlan, steps: int) -> lmo.LMOParams:
    """The file's noise at the run's own sample rate, steps, δ and clipping norm."""
    return dataclasses.replace(p.lmo_params, sample_rate=p.sample_rate, steps=steps,
                               delta=p.delta, clip=p.max_grad_norm)


@functools.cache
def lmo_optimizer_class() -> type:
    """LMODPOptimizer, made on first use so that importing this module does not import Opacus.

    Opacus's DPOptimizer with LMO-DP noise: per coordinate Laplace(0, 1/u) added to the sum of
    clipped per-sample gradients, not scaled by max_grad_norm (the sensitivity is C), drawn
    from the seeded `generator`; clipping and the division by the expected batch size are
    Opacus's own (`clip_and_accumulate`, `scale_grad`).
    """
    from opacus.optimizers import DPOptimizer

    class LMODPOptimizer(DPOptimizer):
        def __init__(self, optimizer, *, lmo_params: lmo.LMOParams, max_grad_norm: float,
                     expected_batch_size: int, generator: torch.Generator,
                     loss_reduction: str = "mean"):
            super().__init__(optimizer, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size,
                             loss_reduction=loss_reduction, generator=generator)
            self.lmo_params = lmo_params

        def add_noise(self):
            for p in self.params:
                summed = p.summed_grad
                noise = lmo.sample_noise(summed.shape, self.lmo_params, self.generator,
                                         dtype=summed.dtype).to(summed.device)
                p.grad = (summed + noise).view_as(p)

    return LMODPOptimizer


UNSUPPORTED = {
    "opt": "its decoder layers flatten batch and sequence into one axis before the MLP, so "
           "Opacus's per-layer hooks see batch × length rows and cannot form per-example "
           "gradients (measured: 9 per-sample norms on one layer, 576 on another)",
}


def check_supported(model) -> None:
    """A clear error for architectures whose per-sample gradients Opacus gets wrong."""
    kind = getattr(model.config, "model_type", "")
    if kind in UNSUPPORTED:
        raise ValueError(f"DP-SGD is not available for {kind} models: {UNSUPPORTED[kind]}")


def make_private(model, optimizer, n_examples: int, p: DPPlan, seed: int,
                 distributed: bool = False):
    """(GradSampleModule, DPOptimizer, Poisson loader of index tensors, PrivacyEngine).

    `distributed` (several processes under one launcher): the model is wrapped in Opacus's
    DPDDP, so Opacus makes its distributed optimizer (each rank clips its own examples, the
    noise is added once) and a distributed Poisson sampler (each rank draws from its shard
    at the same q; `seed` must then differ per rank, or the ranks' draws coincide)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if distributed and p.mechanism == "lmo":
        raise ValueError("LMO-DP noise runs in one process only: its optimizer does not "
                         "all-reduce gradients across ranks")
    if distributed:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        model = DPDDP(model)

    loader = DataLoader(TensorDataset(torch.arange(n_examples)),
                        batch_size=math.ceil(p.sample_rate * n_examples - 1e-9),
                        generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant="prv")
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
        poisson_sampling=True, grad_sample_mode="hooks")
    if abs(loader.sample_rate - p.sample_rate) > 1e-12:   # the accounting's q is the one drawn
        raise RuntimeError(f"Opacus samples at q = {loader.sample_rate}, the plan accounts for "
                           f"q = {p.sample_rate}")
    if p.mechanism == "lmo":   # same clipping and averaging, LMO-DP noise; no Opacus accountant
        device = next(iter(optimizer.params)).device
        optimizer = lmo_optimizer_class()(
            optimizer.original_optimizer, lmo_params=p.lmo_params,
            max_grad_norm=p.max_grad_norm, expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction,
            generator=torch.Generator(device=device).manual_seed(lmo_noise_seed(seed)))
    return module, optimizer, loader, engine


def unwrap(module):
    """The plain model inside Opacus's GradSampleModule (and DPDDP)."""
    inner = module._module
    return getattr(inner, "module", inner) if type(inner).__name__.endswith(
        "DistributedDataParallel") else inner


def lmo_noise_seed(seed: int) -> int:
    """The LMO noise generator's seed: its own stream, apart from the loader's (`seed`)."""
    return int(np.random.SeedSequence([seed, 0x4C4D4F]).generate_state(1, np.uint64)[0] >> 1)


def per_sequence_ce(logits: torch.Tensor, input_ids: torch.Tensor,
                    target_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sequence's mean response-token NLL."""
    from kdaudit.train.methods import cross_entropy

    return cross_entropy(logits[:, :-1], input_ids[:, 1:], target_mask[:, 1:],
                         per_sequence=True)


def spent(p: DPPlan, steps_taken: int) -> dict[str, Any]:
    """What the run spent, by the accounting module (PRV reported, PLD and RDP beside); for
    LMO-DP the labelled numbers at the run's q, steps, δ and C (the claim is no guarantee)."""
    if p.mechanism == "lmo":
        return _lmo_spent(_run_params(p, steps_taken), p.lmo_params_file)
    s: PrivacySpent = account(p.noise_multiplier, p.sample_rate, steps_taken, p.delta)
    return {**s.to_dict(), "max_grad_norm": p.max_grad_norm, "mechanism": "gaussian",
            "sampling": "poisson"}


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
        "epsilon_claimed_strict_mgf": finite(strict),
        "epsilon_pld_lower_bound": finite(lower),
        "claim_holds": not lower > claimed,
        "sample_rate": run.sample_rate, "steps": run.steps, "delta": run.delta,
        "max_grad_norm": run.clip,
        "lmo_params": {k: getattr(run, k) for k in _NOISE_FIELDS},
        "lmo_params_file": params_file,
        "note": "epsilon_claimed is what the LMO-DP authors' accounting claims, not a "
                "guarantee; epsilon_pld_lower_bound is a lower bound on the true epsilon "
                "(one-coordinate PLD of the noise as sampled); null means infinite",
    }
