"""The teacher's distributions on fixed training examples, computed once and reused.

Off-policy methods (kd, seqkd, dpkd, distildp) train on examples that never change, and the
teacher (in eval mode) gives each one the same logits every epoch. With `teacher_cache_topk`
k > 0 the first epoch keeps, per response token, the teacher's k most likely log-probabilities
and their token ids; later epochs rebuild the teacher's logits from them instead of running
it: the k kept log-probabilities, and the remaining mass 1 − Σ top-k spread evenly over the
other V − k tokens. k ≥ V keeps every log-probability, in vocabulary order, and the rebuilt
distribution is exact. Memory: (4 + 4) · k bytes per response token (4 · V when k ≥ V), on
the CPU. Only the positions that predict a response token are filled in the rebuilt logits:
the losses gather those before any arithmetic (`kdaudit.train.objectives`), so the others are
left as allocated. A loss with a row form (`kd`, `seqkd`) takes the rows as they are kept
(`rows`), and the training loop then runs the student's LM head on those positions only
(`kdaudit.train.loop`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from kdaudit.train.batching import Batch


class TeacherCache:
    """Top-k teacher log-probabilities per example index, filled on first use."""

    def __init__(self, k: int):
        self.k, self.vocab = k, 0
        # (n_resp, k) log-probabilities and token ids; ids None when every token is kept
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def nbytes(self) -> int:
        return sum(v.nbytes + (i.nbytes if i is not None else 0)
                   for v, i in self.entries.values())

    def logits(self, batch: Batch, idx: Sequence[int],
               teacher_logits: Callable[[], torch.Tensor]) -> torch.Tensor:
        """(B, T, V) teacher logits for the batch of examples `idx` (rows in that order):
        from the cache, after running `teacher_logits()` once for the rows not yet in it.
        Only positions that predict a response token carry the teacher's distribution; the
        others are unset (the losses never read them)."""
        mask = batch.target_mask[:, 1:].bool()
        rows = self.rows(batch, idx, teacher_logits)
        bsz, width = batch.input_ids.shape
        out = torch.empty(bsz, width, self.vocab, device=rows.device)
        out[:, :-1][mask] = rows
        return out

    def rows(self, batch: Batch, idx: Sequence[int],
             teacher_logits: Callable[[], torch.Tensor]) -> torch.Tensor:
        """(tokens, V): the teacher's log-probabilities at the positions that predict a
        response token, in the order `logits[:, :-1][mask]` gathers them (row by row)."""
        mask = batch.target_mask[:, 1:].bool()                          # position t predicts t+1
        missing = [row for row, i in enumerate(idx) if i not in self.entries]
        if missing:
            full = teacher_logits()
            self.vocab = full.shape[-1]
            logp = torch.log_softmax(full[:, :-1].float(), dim=-1)
            k = min(self.k, self.vocab)
            for row in missing:
                kept = logp[row][mask[row]]
                if k == self.vocab:
                    self.entries[idx[row]] = (kept.cpu(), None)
                else:
                    values, ids = kept.topk(k, dim=-1)
                    self.entries[idx[row]] = (values.cpu(), ids.to(torch.int32).cpu())
        device = batch.input_ids.device
        values = torch.cat([self.entries[i][0] for i in idx]).to(device)
        k = values.shape[-1]
        if k == self.vocab:
            return values
        ids = torch.cat([self.entries[i][1] for i in idx]).to(device, torch.long)
        tail = (1 - values.exp().sum(-1)).clamp(min=1e-30)
        rows = (tail.log() - math.log(self.vocab - k))[:, None].expand(-1, self.vocab).contiguous()
        return rows.scatter_(1, ids, values)
