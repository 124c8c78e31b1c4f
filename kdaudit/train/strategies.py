"""How the loop takes its steps: plain training (`NoDP`: Accelerate's DDP over a global
batch) or DP-SGD (`DPSGD`: Opacus, per-unit clipping, the plan's noise and Poisson batches).
The loop calls the same methods on either; only these classes know the difference."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from kdaudit import seeds
from kdaudit.train import dp as opacus_dp
from kdaudit.train.config import KDParams
from kdaudit.train.methods import DP_METHODS, Method


class NoDP:
    """Plain training: Accelerate wraps model, optimizer and scheduler; each process takes its
    share of the length-grouped batch order; gradients are clipped by their global norm; the
    run checkpoints and resumes."""

    clips_by_norm = True
    checkpoints = True
    private = False
    backward_inputs = None      # every gradient

    def setup(self, model, method: Method, params: KDParams, device) -> KDParams:
        return params

    def steps(self, order: list[list[int]], world: int) -> int:
        return len(order)

    def wrap(self, model, optimizer, schedule: Callable, accelerator, n_examples: int,
             seed: int):
        return accelerator.prepare(model, optimizer, schedule(optimizer))

    def batches(self, order: list[list[int]], accelerator) -> list[list[int]]:
        """This process's share of every batch: `batch_size` is the global batch, split
        across the processes (DDP averages their gradients), so a launched run takes the
        same steps over the same batches as one process. A batch smaller than the number of
        processes gives its first example to the processes it cannot serve."""
        world, rank = accelerator.num_processes, accelerator.process_index
        return [b[rank::world] or b[:1] for b in order] if world > 1 else order

    def noise_only_step(self, optimizer) -> None:
        raise RuntimeError("an empty batch outside DP-SGD")

    def before_step(self, optimizer, idx: Sequence[int]) -> None:
        """Nothing: plain training clips the batch's gradient as a whole, not per unit."""

    def log_parts(self, idx: Sequence[int]) -> dict[str, float]:
        return {}

    def unwrap(self, model, accelerator):
        return accelerator.unwrap_model(model)

    def account(self, steps: int) -> dict[str, Any] | None:
        return None


class DPSGD:
    """DP-SGD with a plan (`kdaudit.train.dp`): per-sequence losses, Opacus's per-sample
    gradients summed per unit (person or record) and clipped, the plan's noise, its own
    Poisson draws of units per process (never handed to Accelerate, which would re-batch
    them), the plan's number of steps; a run restarts rather than resumes, its losses are
    private, and the plan's accounting says what it spent."""

    clips_by_norm = False
    checkpoints = False
    private = True

    def __init__(self, plan: opacus_dp.DPPlan, persons: Sequence[str | None]):
        self.plan = plan
        self.units = opacus_dp.units_of(persons, plan.unit)
        if plan.n_units and plan.n_units != len(self.units):
            raise ValueError(f"the DP plan is for {plan.n_units} {plan.unit}s, the examples "
                             f"hold {len(self.units)}")
        self.unit_of = {i: u for u, members in enumerate(self.units) for i in members}
        self.order: list[list[int]] = []
        self.optimizer = None
        self.backward_inputs: list[torch.Tensor] | None = None

    def setup(self, model, method: Method, params: KDParams, device) -> KDParams:
        """Refuse what DP-SGD cannot train; per-sequence means, so that one example's gradient
        ignores the others' lengths."""
        if not method.dp_sgd:
            raise ValueError(f"DP-SGD supports the methods {DP_METHODS}, not '{method.name}'")
        if method.lm_term and params.lm_coef:
            raise ValueError(f"DP-SGD of '{method.name}': the pretraining LM term is not a "
                             f"per-example loss Opacus can clip; set kd.lm_coef = 0")
        params = replace(params, per_sequence=True)
        opacus_dp.check_supported(model)
        model.to(device)
        return params

    def steps(self, order: list[list[int]], world: int) -> int:
        return self.plan.steps

    def wrap(self, model, optimizer, schedule: Callable, accelerator, n_examples: int,
             seed: int):
        """Opacus's model and optimizer (DPDDP across processes, each rank its own seed), the
        Poisson batches drawn, then the schedule on the private optimizer."""
        world, rank = accelerator.num_processes, accelerator.process_index
        model, optimizer, poisson, _ = opacus_dp.make_private(
            model, optimizer, len(self.units), self.plan,
            seed if world == 1 else seeds.per_index(seed, rank), distributed=world > 1)
        self.order = [[i for u in drawn for i in self.units[u]]
                      for drawn in opacus_dp.poisson_batches(poisson, self.plan.steps)]
        self.optimizer = optimizer
        self.backward_inputs = opacus_dp.graph_roots(model)
        return model, optimizer, schedule(optimizer)

    def batches(self, order: list[list[int]], accelerator) -> list[list[int]]:
        return self.order

    def noise_only_step(self, optimizer) -> None:
        opacus_dp.noise_only_step(optimizer)

    def before_step(self, optimizer, idx: Sequence[int]) -> None:
        """Tell the optimizer which unit each row of the batch belongs to."""
        units = [self.unit_of[i] for i in idx]
        position = {u: k for k, u in enumerate(dict.fromkeys(units))}
        optimizer.segments = torch.tensor([position[u] for u in units])

    def log_parts(self, idx: Sequence[int]) -> dict[str, float]:
        """The Poisson batch's size (records): for the private log only."""
        return {"batch_size": float(len(idx))}

    def unwrap(self, model, accelerator):
        return opacus_dp.unwrap(model)

    def account(self, steps: int) -> dict[str, Any] | None:
        """The plan's accounting, the unit and its sizes, and the white-box audit's bound."""
        spent = self.plan.account(steps) if self.plan.account else {}
        sizes = [len(m) for m in self.units]
        audit = opacus_dp.white_box_bound(self.optimizer, self.plan)
        return {**spent, "unit": self.plan.unit, "units": len(sizes),
                "records": sum(sizes), "largest_unit": max(sizes, default=0),
                "noise": "reproducible" if self.plan.reproducible_noise else "secret",
                **({"white_box_audit": audit} if audit else {})}
