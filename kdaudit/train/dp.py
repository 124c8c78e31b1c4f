"""DP-SGD in the one training loop, with Opacus: the wiring, given a plan.

A `DPPlan` says how much noise, at which sample rate, for how many steps, per which unit;
`kdaudit.dp` builds it (the accountants solve σ from ε; LMO-DP supplies its own noise) and
tells the ε spent through the plan's `account`. This module only applies it:

- The unit is a person by default: Opacus's Poisson loader draws every person with
  probability q = batch_size / N_persons at every step, a drawn person brings all of their
  records, and the per-record gradients Opacus computes are summed per person before they
  are clipped (`UnitDPOptimizer`), so one clip bounds a person's whole contribution and the
  accounting's q and δ are per person. `unit = "record"` treats every record as its own
  unit (the copies of a record stay one person only at the person level).
- The loader is never wrapped by Accelerate (that would re-batch it and break the
  accounting); it hands the loop units, which the loop turns into records.
- Per-sample gradients by Opacus's "hooks" grad samplers, with one added for GPT-2's
  `Conv1D` (`register_grad_samplers`). Ghost clipping refuses the tied
  input/output embeddings of the zoo's gpt2, opt and llama models ("Parameter tying is not
  supported with Ghost Clipping", Opacus 1.6), so hooks it is for all three.
- OPT is refused with a clear error (`UNSUPPORTED`): its layers flatten batch and sequence,
  so per-layer hooks cannot separate examples.
- The loss is the mean over the batch of per-sequence mean token losses, so each example's
  gradient does not depend on the others' lengths (the sensitivity DP-SGD assumes).
- Secret randomness: the Poisson draws, the noise and the audit canaries come from
  generators seeded from the operating system's entropy, never written down, unless the
  plan asks for `reproducible_noise` (then from the run's seed, and the guarantee does not
  hold against anyone who knows it). Opacus's own `secure_mode` needs torchcsprng, which has
  no build for current PyTorch.
- A plan with its own `noise` (LMO-DP) replaces the Gaussian noise: drawn per coordinate,
  added to the sum of clipped per-unit gradients and not scaled by C, with Opacus's checks
  that every gradient is clipped once and noised once.
- White-box audit (Steinke, Nasr & Jagielski 2023): `gradient_canaries` Dirac canaries,
  each a coordinate of an extra parameter block that the optimizer noises like every model
  parameter but the model never reads. Each canary is included with probability ½; an
  included one is a unit of its own, drawn at rate q at every step, whose gradient is the
  clip norm C on its coordinate. Its score is the sum over steps of the noised gradient on
  that coordinate (`UnitDPOptimizer.canary_scores`).
"""
from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

NoiseSampler = Callable[[torch.Size, torch.Generator, torch.dtype], torch.Tensor]
UNITS = ("person", "record")


@dataclass
class DPPlan:
    noise_multiplier: float     # Gaussian σ / C; 0 with a custom `noise`
    sample_rate: float          # per unit (person or record)
    steps: int
    delta: float
    max_grad_norm: float
    mechanism: str = "gaussian"             # "gaussian" | "lmo"
    noise: NoiseSampler | None = None       # custom noise on the summed clipped gradients
    account: Callable[[int], dict[str, Any]] | None = None   # the ε spent after n steps
    details: Any = None                     # the planner's own (e.g. the LMO-DP parameters)
    unit: str = "person"                    # what one Poisson draw samples and one clip bounds
    reproducible_noise: bool = False        # draws from the run's seed instead of the OS
    gradient_canaries: int = 0              # white-box audit canaries (0: no audit)
    canary_guess_fraction: float = 0.1      # guesses "in" and "out" on this share each
    n_units: int = 0                        # the N the plan is for (0: not checked)


def units_of(persons: Sequence[str | None], unit: str) -> list[list[int]]:
    """The example indices of each unit, units in order of first appearance: one per distinct
    person (an example without a person is its own), or one per example at the record level."""
    if unit not in UNITS:
        raise ValueError(f"DP unit must be one of {UNITS}, got {unit!r}")
    if unit == "record":
        return [[i] for i in range(len(persons))]
    groups: dict[Any, list[int]] = {}
    for i, person in enumerate(persons):
        groups.setdefault(person if person is not None else ("#", i), []).append(i)
    return list(groups.values())


def dp_generator(plan: DPPlan, seed: int, stream: int, device="cpu") -> torch.Generator:
    """A generator for one stream of a DP run's randomness (Poisson draws, noise, canaries):
    seeded from the OS's entropy and never recorded, or from the run's seed with
    `reproducible_noise`."""
    g = torch.Generator(device=device)
    if plan.reproducible_noise:
        return g.manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(
            1, np.uint64)[0] >> 1))
    return g.manual_seed(secrets.randbits(63))


SAMPLING, NOISE, CANARIES = 0x5341, 0x4C4D4F, 0x434E   # stream ids


@functools.cache
def unit_optimizer_class(base: type) -> type:
    """Opacus's DP optimizer `base` (made on first use, so that importing this module does
    not import Opacus) with three additions: per-record gradients summed per unit before the
    clip, the plan's own noise when it has one, and the white-box audit's gradient canaries."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class UnitDPOptimizer(base):
        segments: torch.Tensor | None = None   # the unit of each row of the next batch
        noise: NoiseSampler | None = None
        canaries: torch.nn.Parameter | None = None
        included: torch.Tensor | None = None
        canary_generator: torch.Generator | None = None
        canary_rate: float = 0.0
        canary_scores: torch.Tensor | None = None
        param_names: dict[int, str] = {}

        def pre_step(self, closure=None):
            check_per_sample_grads((self.param_names.get(id(p), f"parameter {k}"), p)
                                   for k, p in enumerate(self.params) if p is not self.canaries)
            self._sum_per_unit()
            return super().pre_step(closure)

        def clip_and_accumulate(self):
            super().clip_and_accumulate()
            if self.canaries is not None:   # each included canary is a unit drawn at rate q
                drawn = torch.rand(self.included.shape, generator=self.canary_generator,
                                   device=self.included.device) < self.canary_rate
                self.canaries.summed_grad += self.max_grad_norm * (drawn & self.included)

        def _sum_per_unit(self) -> None:
            """Sum the rows of each unit (`segments`; None: every row is its own unit), and
            give the canary block its per-unit gradients: zeros, the data never reach it."""
            segments, self.segments = self.segments, None
            rows = len(self._get_flat_grad_sample(self.params[0]))
            if segments is not None and len(segments) != rows:
                raise RuntimeError(f"{len(segments)} unit ids for a batch of {rows} rows")
            if segments is not None and torch.equal(segments.cpu(), torch.arange(rows)):
                segments = None     # every row its own unit, in order: the sums are the rows
            n = rows if segments is None or not rows else int(segments.max()) + 1
            for p in self.params:
                if p is self.canaries:
                    p.grad_sample = p.new_zeros((n, *p.shape))
                elif segments is not None:
                    g = self._get_flat_grad_sample(p)
                    p.grad_sample = g.new_zeros((n, *g.shape[1:])).index_add_(
                        0, segments.to(g.device), g)

        def add_noise(self):
            if self.noise is None:
                super().add_noise()
            else:   # the plan's noise, with Opacus's once-and-only-once checks
                for p in self.params:
                    _check_processed_flag(p.summed_grad)
                    noise = self.noise(p.summed_grad.shape, self.generator, p.summed_grad.dtype)
                    p.grad = (p.summed_grad + noise.to(p.summed_grad.device)).view_as(p)
                    _mark_as_processed(p.summed_grad)
            if self.canaries is not None:
                self.canary_scores += self.canaries.grad.detach()

    return UnitDPOptimizer


UNSUPPORTED = {
    "opt": "its decoder layers flatten batch and sequence into one axis before the MLP, so "
           "Opacus's per-layer hooks see batch × length rows and cannot form per-example "
           "gradients (measured: 9 per-sample norms on one layer, 576 on another)",
}


@functools.cache
def register_grad_samplers() -> None:
    """Per-sample gradients for transformers' `Conv1D` (GPT-2's attention and MLP layers: a
    linear layer, y = x W + b with W stored in × out), which Opacus does not know: without
    this it falls back to functorch, which runs each layer's forward again per example
    (measured: a DP step of the tiny GPT-2 teacher 470 → 390 ms)."""
    from opacus.grad_sample import register_grad_sampler
    from transformers.pytorch_utils import Conv1D

    @register_grad_sampler(Conv1D)
    def conv1d_grad_sample(layer, activations, backprops):
        x = activations[0].to(backprops.dtype)
        out = {}
        if layer.weight.requires_grad:
            out[layer.weight] = torch.einsum("n...i,n...j->nij", x, backprops)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.einsum("n...k->nk", backprops)
        return out


def graph_roots(model) -> list[torch.Tensor] | None:
    """The trainable weights of the model's embedding layers, the tensors a DP backward pass
    asks autograd for (`loss.backward(inputs=...)`); None when there are none (then the whole
    backward runs).

    Opacus forms each layer's per-sample gradients in a backward hook, from the layer's input
    and the gradient of its output, and discards the batch gradient autograd computes for the
    layer's weights. Every layer of a language model lies between the embeddings and the
    loss, so a backward pass to the embedding weights alone still computes every layer's
    output gradient and fires every hook, and skips the weight-gradient products nobody reads
    (measured on the tiny GPT-2 teacher: DP step 371 → 345 ms, per-sample gradients equal).
    A trainable layer off that path gets no per-sample gradient; the optimizer's step then
    names it (`check_per_sample_grads`) instead of training it on nothing."""
    roots = [p for m in model.modules() if isinstance(m, torch.nn.Embedding)
             for p in m.parameters(recurse=False) if p.requires_grad]
    return list({id(p): p for p in roots}.values()) or None


def check_per_sample_grads(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise, naming them, if trainable parameters got no per-sample gradient in backward."""
    missing = [name for name, p in named_parameters
               if p.requires_grad and getattr(p, "grad_sample", None) is None]
    if missing:
        raise RuntimeError(
            f"DP-SGD: no per-sample gradient for {', '.join(missing[:5])}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}; the backward "
            f"pass runs to the embedding weights only (`graph_roots`), and these parameters "
            f"are not on a path from them to the loss")


def check_supported(model) -> None:
    """A clear error for architectures whose per-sample gradients Opacus gets wrong."""
    kind = getattr(model.config, "model_type", "")
    if kind in UNSUPPORTED:
        raise ValueError(f"DP-SGD is not available for {kind} models: {UNSUPPORTED[kind]}")


def make_private(model, optimizer, n_units: int, p: DPPlan, seed: int,
                 distributed: bool = False):
    """(GradSampleModule, DPOptimizer, Poisson loader of unit-index tensors, PrivacyEngine).

    The loop sets `optimizer.segments` (each row's unit within the batch) before each step.
    `distributed` (several processes under one launcher): the model is wrapped in Opacus's
    DPDDP, so Opacus's distributed optimizer adds the noise once and each rank draws from its
    shard at the same q (`seed` must then differ per rank); the white-box canaries and custom
    noise run in one process only."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    register_grad_samplers()
    if distributed and p.noise is not None:
        raise ValueError(f"{p.mechanism} noise runs in one process only: its optimizer does "
                         f"not all-reduce gradients across ranks")
    if distributed:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        model = DPDDP(model)
    device = next(model.parameters()).device
    loader = DataLoader(TensorDataset(torch.arange(n_units)),
                        batch_size=math.ceil(p.sample_rate * n_units - 1e-9),
                        generator=dp_generator(p, seed, SAMPLING))
    engine = PrivacyEngine(accountant="prv")
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
        poisson_sampling=True, grad_sample_mode="hooks",
        noise_generator=dp_generator(p, seed, NOISE, device))
    if abs(loader.sample_rate - p.sample_rate) > 1e-12:   # the accounting's q is the one drawn
        raise RuntimeError(f"Opacus samples at q = {loader.sample_rate}, the plan accounts for "
                           f"q = {p.sample_rate}")
    inner = optimizer.original_optimizer
    canaries = None
    if p.gradient_canaries and not distributed:
        canaries = torch.nn.Parameter(torch.zeros(p.gradient_canaries, device=device))
        inner.add_param_group({"params": [canaries], "lr": 0.0, "weight_decay": 0.0})
    unit_optimizer = unit_optimizer_class(type(optimizer))(
        inner, noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
        expected_batch_size=optimizer.expected_batch_size,
        loss_reduction=optimizer.loss_reduction, generator=optimizer.generator)
    unit_optimizer.noise = p.noise
    unit_optimizer.param_names = {id(q): name for name, q in model.named_parameters()}
    if canaries is not None:
        g = dp_generator(p, seed, CANARIES, device)
        unit_optimizer.canaries, unit_optimizer.canary_generator = canaries, g
        unit_optimizer.included = torch.rand(p.gradient_canaries, generator=g,
                                             device=device) < 0.5
        unit_optimizer.canary_rate = p.sample_rate
        unit_optimizer.canary_scores = torch.zeros_like(canaries.detach())
    return module, unit_optimizer, loader, engine


def white_box_bound(optimizer, p: DPPlan) -> dict[str, Any] | None:
    """The one-run lower bound on ε (95%) from the gradient canaries, at the plan's δ (None
    without canaries): guesses "in" for the top and "out" for the bottom
    `p.canary_guess_fraction` of the canaries' scores, a share fixed before training."""
    from attacks.privacy import one_run_epsilon_lower_bound

    if getattr(optimizer, "canaries", None) is None:
        return None
    scores = optimizer.canary_scores.double().cpu().numpy()
    included = optimizer.included.cpu().numpy()
    k = max(1, int(p.canary_guess_fraction * len(scores)))
    b = one_run_epsilon_lower_bound(scores, included, k_plus=k, k_minus=k, delta=p.delta)
    return {"epsilon_lower_bound": b["epsilon_lb"], "correct": b["correct"],
            "guesses": b["guesses"], "canaries": len(scores), "included": int(included.sum()),
            "delta": p.delta}


def unwrap(module):
    """The plain model inside Opacus's GradSampleModule (and DPDDP)."""
    inner = module._module
    return getattr(inner, "module", inner) if type(inner).__name__.endswith(
        "DistributedDataParallel") else inner


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
