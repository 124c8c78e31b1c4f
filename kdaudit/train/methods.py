"""Training methods as configurations of the one loop: a name, what it needs, and its loss.

A loss takes the model's logits, the teacher's logits (or None), the batch and the method's
parameters, and returns (scalar loss, named parts for the log). Positions are shifted here
once: logits at t predict the token at t+1, scored where `target_mask[:, t+1]` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kdaudit.train import objectives
from kdaudit.train.batching import Batch

LossFn = Callable[[torch.Tensor, torch.Tensor | None, Batch, dict[str, Any]],
                  tuple[torch.Tensor, dict[str, float]]]


def shifted(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting t+1, targets, mask) over positions 0..T-2."""
    return logits[:, :-1], batch.input_ids[:, 1:], batch.target_mask[:, 1:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over masked positions, in float32."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view_as(targets)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def ce_loss(logits, teacher_logits, batch, params):
    s, y, m = shifted(logits, batch)
    loss = cross_entropy(s, y, m)
    return loss, {"ce": loss.item()}


def kd_loss(logits, teacher_logits, batch, params):
    """(1 − kd_ratio)·CE + kd_ratio·τ²·KL(p_teacher ‖ q_student) on ground-truth responses."""
    ratio, tau = params.get("kd_ratio", 1.0), params.get("temperature", 1.0)
    s, y, m = shifted(logits, batch)
    t = teacher_logits[:, :-1]
    ce = cross_entropy(s, y, m)
    kl = objectives.forward_kl(s, t, m, temperature=tau)
    loss = (1 - ratio) * ce + ratio * tau ** 2 * kl
    return loss, {"ce": ce.item(), "forward_kl": kl.item()}


@dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    needs_teacher: bool = False
    student: bool = True        # selectable as a student method in configs and the CLI
    description: str = ""


METHODS: dict[str, Method] = {
    "pretrain": Method("pretrain", ce_loss, student=False,
                       description="next-token CE on every token of public pre-training text"),
    "sft": Method("sft", ce_loss, student=False,
                  description="supervised fine-tuning: CE on response tokens"),
    "nokd": Method("nokd", ce_loss,
                   description="student base fine-tuned on public ground truth, no teacher"),
    "kd": Method("kd", kd_loss, needs_teacher=True,
                 description="word-level KD: forward KL to the teacher on public ground truth"),
}
