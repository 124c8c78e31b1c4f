"""Token batches: padding, response masks and a seeded, length-grouped batch order."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kdaudit import seeds
from kdaudit.data.template import Encoded


@dataclass
class Batch:
    """Right-padded ids; `target_mask[:, t]` marks tokens t ≥ 1 that are scored (responses)."""

    input_ids: torch.Tensor       # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    target_mask: torch.Tensor     # (B, T) bool
    # per-token values aligned with input_ids that a loss needs, e.g. MiniLLM's sampling-time
    # log probabilities; 0 outside the responses
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.target_mask.to(device),
                     {k: v.to(device) for k, v in self.extras.items()})

    @property
    def position_ids(self) -> torch.Tensor:
        """Explicit positions (right padding: 0..T-1 per row); Opacus needs them per sample."""
        return torch.arange(self.input_ids.shape[1], device=self.input_ids.device).expand_as(
            self.input_ids)

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """A causal LM's keyword inputs for this batch: ids, attention mask and positions."""
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    position_ids=self.position_ids)


def collate(examples: Sequence[Encoded], pad_id: int,
            extras: dict[str, Sequence[Sequence[float]]] | None = None) -> Batch:
    """Right-pad examples into a batch. `extras[name][row]` holds one value per response token
    of that row; it is placed at the response positions (0 elsewhere)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attn[row, :n] = 1
        target[row, max(1, e.response_start):n] = True
    placed = {}
    for name, rows in (extras or {}).items():
        values = torch.zeros((len(examples), width), dtype=torch.float32)
        for row, (e, v) in enumerate(zip(examples, rows)):
            values[row, e.response_start:e.response_start + len(v)] = torch.tensor(v)
        placed[name] = values
    return Batch(ids, attn, target, placed)


def batch_order(lengths: Sequence[int], batch_size: int, epochs: float, seed: int,
                group: int = 32) -> list[list[int]]:
    """Index lists for every step of training, seeded and reproducible.

    Each epoch is shuffled, cut into groups of `group` batches, sorted by length inside a group
    (less padding) and the batches of an epoch are shuffled again. A fractional last epoch
    keeps its first batches.
    """
    n = len(lengths)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * per_epoch))
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total:
        rng = random.Random(seeds.per_index(seed, epoch))
        idx = list(range(n))
        rng.shuffle(idx)
        batches = []
        for g in range(0, n, batch_size * group):
            chunk = sorted(idx[g:g + batch_size * group], key=lambda i: lengths[i])
            batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        order += batches
        epoch += 1
    return order[:total]
