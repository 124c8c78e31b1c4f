"""The hot path: one batched, padding-aware forward pass per model and dataset.

For every scored (response) token t it keeps log q(x_t), the mean of log q over the
vocabulary under q, μ_t = Σ_v q_v log q_v, and the variance σ²_t = Σ_v q_v (log q_v)² − μ_t².
Every single-pass membership signal is a function of these statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class TokenStats:
    """Ragged per-token statistics of N sequences, stored flat with offsets."""

    logprob: np.ndarray   # (total_tokens,) float64
    mean: np.ndarray      # (total_tokens,) μ_t
    var: np.ndarray       # (total_tokens,) σ²_t
    offsets: np.ndarray   # (N + 1,) int64; sequence i owns [offsets[i], offsets[i+1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def split(self, values: np.ndarray) -> list[np.ndarray]:
        return np.split(values, self.offsets[1:-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def total_nll(self) -> np.ndarray:
        return -np.add.reduceat(self.logprob, self.offsets[:-1]) if len(self) else np.zeros(0)

    def nll(self) -> np.ndarray:
        """Mean NLL over each sequence's scored tokens."""
        return self.total_nll() / self.lengths

    def subset(self, index: Sequence[int]) -> "TokenStats":
        parts = [slice(self.offsets[i], self.offsets[i + 1]) for i in index]
        lengths = np.array([s.stop - s.start for s in parts], dtype=np.int64)
        cat = (lambda a: np.concatenate([a[s] for s in parts]) if parts else a[:0])
        return TokenStats(cat(self.logprob), cat(self.mean), cat(self.var),
                          np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def save(self, path: str | Path) -> None:
        np.savez(path, logprob=self.logprob, mean=self.mean, var=self.var, offsets=self.offsets)

    @classmethod
    def load(cls, path: str | Path) -> "TokenStats":
        with np.load(path) as z:
            return cls(z["logprob"], z["mean"], z["var"], z["offsets"])


@dataclass
class ScoringBatch:
    """Right-padded sequences with explicit positions; `score` marks the scored targets."""

    idx: np.ndarray          # positions of the batch's sequences in the input order
    ids: torch.Tensor        # (B, T)
    attn: torch.Tensor       # (B, T)
    pos: torch.Tensor        # (B, T) explicit position ids: padding never shifts them
    score: torch.Tensor      # (B, T) bool


def check_scoring_inputs(sequences: Sequence[Sequence[int]], score_from: Sequence[int]) -> None:
    if len(sequences) != len(score_from):
        raise ValueError("sequences and score_from differ in length")
    for i, (seq, s) in enumerate(zip(sequences, score_from)):
        if not 1 <= s < len(seq):
            raise ValueError(f"sequence {i}: score_from={s} must lie in [1, {len(seq)}) so that "
                             f"at least one token is scored and each has a prefix")


def scoring_batches(sequences: Sequence[Sequence[int]], score_from: Sequence[int], pad_id: int,
                    batch_size: int, device: torch.device | str) -> list[ScoringBatch]:
    """Length-sorted, right-padded batches (less padding, same results as one at a time)."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    out = []
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        score = torch.zeros((len(idx), width), dtype=torch.bool)
        for row, i in enumerate(idx):
            n = len(sequences[i])
            ids[row, :n] = torch.as_tensor(list(sequences[i]))
            attn[row, :n] = 1
            score[row, score_from[i]:n] = True
        pos = torch.arange(width).expand_as(ids)
        out.append(ScoringBatch(idx, ids.to(device), attn.to(device), pos.to(device),
                                score.to(device)))
    return out


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_stats(model, sequences: Sequence[Sequence[int]], score_from: Sequence[int], *,
                pad_id: int, batch_size: int = 32, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, desc: str | None = None) -> TokenStats:
    """Per-token statistics of tokens `sequences[i][score_from[i]:]`, each predicted from its prefix.

    Sequences are sorted by length and right-padded in batches; positions are explicit so that
    padding never shifts them. Only scored positions go through the softmax, in `dtype`.
    """
    check_scoring_inputs(sequences, score_from)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    per_seq: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * len(sequences)  # type: ignore
    batches = scoring_batches(sequences, score_from, pad_id, batch_size, device)
    for batch in tqdm(batches, desc=desc, disable=desc is None, unit="batch", mininterval=1.0):
        idx, ids, score = batch.idx, batch.ids, batch.score
        logits = model(input_ids=ids, attention_mask=batch.attn, position_ids=batch.pos).logits
        # logits at t-1 predict token t: select the rows of scored targets only
        sel = score[:, 1:]
        logp = torch.log_softmax(logits[:, :-1][sel].to(dtype), dim=-1)   # (n_tok, V)
        target = ids[:, 1:][sel]
        lp = logp.gather(1, target[:, None]).squeeze(1)
        p = logp.exp()
        mu = torch.special.xlogy(p, p).sum(-1)                   # 0 · log 0 = 0
        dev = torch.where(p > 0, logp - mu[:, None], 0.0)
        var = (p * dev.square()).sum(-1)                         # no E[x²] − μ² cancellation
        counts = sel.sum(1).tolist()
        for row, (a, b, c) in enumerate(zip(lp.split(counts), mu.split(counts), var.split(counts))):
            per_seq[idx[row]] = (a.double().cpu().numpy(), b.double().cpu().numpy(),
                                 c.double().cpu().numpy())
    model.train(was_training)
    lengths = np.array([len(t[0]) for t in per_seq], dtype=np.int64)
    return TokenStats(logprob=np.concatenate([t[0] for t in per_seq]),
                      mean=np.concatenate([t[1] for t in per_seq]),
                      var=np.concatenate([t[2] for t in per_seq]),
                      offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
