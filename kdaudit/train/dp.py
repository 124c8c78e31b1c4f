"""DP-SGD in the one training loop, with Opacus: the wiring, given a plan.

A `DPPlan` says how much noise, at which sample rate, for how many steps; `kdaudit.dp`
builds it (the accountants solve σ from ε; LMO-DP supplies its own noise) and tells the ε
spent through the plan's `account`. This module only applies it:

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
- A plan with its own `noise` (LMO-DP) replaces the Gaussian noise: drawn per coordinate
  from a seeded generator, added to the sum of clipped per-sample gradients and not scaled
  by C (`custom_noise_optimizer_class`); clipping and averaging stay Opacus's.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

NoiseSampler = Callable[[torch.Size, torch.Generator, torch.dtype], torch.Tensor]


@dataclass
class DPPlan:
    noise_multiplier: float     # Gaussian σ / C; 0 with a custom `noise`
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    mechanism: str = "gaussian"             # "gaussian" | "lmo"
    noise: NoiseSampler | None = None       # custom noise on the summed clipped gradients
    account: Callable[[int], dict[str, Any]] | None = None   # the ε spent after n steps
    details: Any = None                     # the planner's own (e.g. the LMO-DP parameters)


@functools.cache
def custom_noise_optimizer_class() -> type:
    """Opacus's DPOptimizer with the plan's own noise in place of the Gaussian (made on first
    use, so that importing this module does not import Opacus): the noise is added to the
    sum of clipped per-sample gradients, not scaled by max_grad_norm, and drawn from the
    seeded `generator`; clipping and the division by the expected batch size are Opacus's
    own (`clip_and_accumulate`, `scale_grad`)."""
    from opacus.optimizers import DPOptimizer

    class CustomNoiseDPOptimizer(DPOptimizer):
        def __init__(self, optimizer, *, noise: NoiseSampler, max_grad_norm: float,
                     expected_batch_size: int, generator: torch.Generator,
                     loss_reduction: str = "mean"):
            super().__init__(optimizer, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size,
                             loss_reduction=loss_reduction, generator=generator)
            self.noise = noise

        def add_noise(self):
            for p in self.params:
                summed = p.summed_grad
                noise = self.noise(summed.shape, self.generator, summed.dtype)
                p.grad = (summed + noise.to(summed.device)).view_as(p)

    return CustomNoiseDPOptimizer


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

    if distributed and p.noise is not None:
        raise ValueError(f"{p.mechanism} noise runs in one process only: its optimizer does "
                         f"not all-reduce gradients across ranks")
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
    if p.noise is not None:   # same clipping and averaging, the plan's noise
        device = next(iter(optimizer.params)).device
        optimizer = custom_noise_optimizer_class()(
            optimizer.original_optimizer, noise=p.noise,
            max_grad_norm=p.max_grad_norm, expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction,
            generator=torch.Generator(device=device).manual_seed(noise_seed(seed)))
    return module, optimizer, loader, engine


def unwrap(module):
    """The plain model inside Opacus's GradSampleModule (and DPDDP)."""
    inner = module._module
    return getattr(inner, "module", inner) if type(inner).__name__.endswith(
        "DistributedDataParallel") else inner


def noise_seed(seed: int) -> int:
    """The custom noise generator's seed: its own stream, apart from the loader's (`seed`)."""
    return int(np.random.SeedSequence([seed, 0x4C4D4F]).generate_state(1, np.uint64)[0] >> 1)


def per_sequence_ce(logits: torch.Tensor, input_ids: torch.Tensor,
                    target_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sequence's mean response-token NLL."""
    from kdaudit.train.methods import cross_entropy

    return cross_entropy(logits[:, :-1], input_ids[:, 1:], target_mask[:, 1:],
                         per_sequence=True)


def poisson_batches(loader, steps: int) -> list[list[int]]:
    """`steps` Poisson-sampled index batches from Opacus's loader (epochs as needed)."""
    out: list[list[int]] = []
    while len(out) < steps:
        for (idx,) in loader:
            out.append(idx.tolist())
            if len(out) == steps:
                break
    return out


def noise_only_step(optimizer) -> None:
    """An empty batch still takes a DP step: zero per-sample gradients plus the noise."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
