"""The hot path: one batched, padding-aware forward pass per model and dataset.

For every scored (response) token t it keeps log q(x_t), the mean of log q over the
vocabulary under q, μ_t = Σ_v q_v log q_v, and the variance σ²_t = Σ_v q_v (log q_v)² − μ_t².
Every single-pass membership signal is a function of these statistics.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from attacks import parallel


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


# On a CPU, batches of about this many tokens score fastest: larger ones spill the caches
# (measured on a 2-core machine, benchmarks/perf/bench_scoring.py). Accelerators take
# `batch_size` sequences whatever their length.
CPU_BATCH_TOKENS = 2048


def default_batch_tokens(device: torch.device | str) -> int | None:
    """The token budget of a scoring batch on `device`: `CPU_BATCH_TOKENS` on a CPU, else none."""
    return CPU_BATCH_TOKENS if torch.device(device).type == "cpu" else None


def scoring_batches(sequences: Sequence[Sequence[int]], score_from: Sequence[int], pad_id: int,
                    batch_size: int, device: torch.device | str,
                    max_tokens: int | None = None) -> list[ScoringBatch]:
    """Length-sorted, right-padded batches (less padding, same results as one at a time) of at
    most `batch_size` sequences and, when `max_tokens` is set, at most that many padded
    tokens (a longer sequence goes alone)."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and (
                max_tokens is None or (len(groups[-1]) + 1) * len(sequences[i]) <= max_tokens):
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for idx in map(np.array, groups):
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


def _split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(body, head) when the model's logits are `head(body(...)[0])`, the usual causal-LM
    layout, so that the head can run on the scored positions only; else None."""
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if body is None or body is model or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


def scored_logits(model, batch: ScoringBatch, split: tuple | None) -> torch.Tensor:
    """(n_scored, V) logits at the positions that predict the batch's scored tokens, in batch
    row order. With `split` the LM head runs on those rows only: no (B, T, V) tensor."""
    kw = dict(input_ids=batch.ids, attention_mask=batch.attn, position_ids=batch.pos)
    sel = batch.score[:, 1:]
    if split is None:
        return model(**kw).logits[:, :-1][sel]
    body, head = split
    return head(body(**kw)[0][:, :-1][sel])


def _checked_split(model, batch: ScoringBatch) -> tuple[tuple | None, torch.Tensor]:
    """(`_split_head(model)` if it reproduces the model's own logits on `batch`, else None
    (a model may scale or cap its logits after the head); the batch's scored logits)."""
    full = scored_logits(model, batch, None)
    split = _split_head(model)
    if split is None:
        return None, full
    try:
        part = scored_logits(model, batch, split)
    except (RuntimeError, TypeError, ValueError):   # e.g. a wrapper whose body is the whole LM
        return None, full
    same = part.shape == full.shape and torch.allclose(part, full, rtol=1e-4, atol=1e-4)
    return (split, part) if same else (None, full)


def stats_of_logits(logits: torch.Tensor, target: torch.Tensor, dtype: torch.dtype,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log q(target), μ, σ²) per row of `logits` (n, V), in chunks of `chunk` rows so that
    only (chunk, V) temporaries live at once: one log-softmax and one exp per element, no
    E[x²] − μ² cancellation."""
    out = []
    for lg, tg in zip(logits.split(chunk), target.split(chunk)):
        logp = torch.log_softmax(lg.to(dtype), dim=-1)
        lp = logp.gather(1, tg[:, None]).squeeze(1)
        # below −1e4, q is exactly 0 in any float type: clamping keeps 0 · log 0 = 0 (a −inf
        # logit, a masked token, would otherwise give 0 · −inf = nan) and changes no sum
        p = logp.clamp_(min=-1e4).exp()
        mu = (p * logp).sum(-1)
        out.append((lp, mu, (p * (logp - mu[:, None]).square()).sum(-1)))
    return tuple(torch.cat(parts) for parts in zip(*out)) if out else \
        (logits.new_zeros(0, dtype=dtype),) * 3


@torch.no_grad()
def token_stats(model, sequences: Sequence[Sequence[int]], score_from: Sequence[int], *,
                pad_id: int, batch_size: int = 32, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, desc: str | None = None,
                max_tokens: int | None | str = "auto") -> TokenStats:
    """Per-token statistics of tokens `sequences[i][score_from[i]:]`, each predicted from its prefix.

    Sequences are sorted by length and right-padded in batches of at most `batch_size`
    sequences and `max_tokens` tokens ("auto": `default_batch_tokens(device)`); positions are
    explicit so that padding never shifts them. The LM head and the softmax run on the scored
    positions only, the softmax in `dtype`.
    """
    check_scoring_inputs(sequences, score_from)
    device = torch.device(device) if device is not None else _model_device(model)
    if max_tokens == "auto":
        max_tokens = default_batch_tokens(device)
    was_training = model.training
    model.eval()
    per_seq: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    batches = parallel.my_batches(
        scoring_batches(sequences, score_from, pad_id, batch_size, device, max_tokens))
    split, first = _checked_split(model, batches[0][1]) if batches else (None, None)
    for n, (_, batch) in enumerate(tqdm(batches, desc=desc, unit="batch", mininterval=1.0,
                                        disable=desc is None or not parallel.is_first())):
        sel = batch.score[:, 1:]
        logits = first if n == 0 else scored_logits(model, batch, split)
        lp, mu, var = stats_of_logits(logits, batch.ids[:, 1:][sel], dtype)
        _keep_per_sequence(per_seq, batch.idx, (lp, mu, var), sel.sum(1).tolist())
    model.train(was_training)
    return _merged_stats(per_seq, len(sequences))


def _keep_per_sequence(per_seq: dict, idx: Sequence[int], stats: tuple[torch.Tensor, ...],
                       counts: list[int]) -> None:
    """File a batch's (log q, μ, σ²) rows, `counts[r]` for its row r, under each row's input
    index `idx[r]`, as float64 arrays."""
    for i, *parts in zip(idx, *(v.split(counts) for v in stats)):
        per_seq[int(i)] = tuple(p.double().cpu().numpy() for p in parts)


def _merged_stats(per_seq: dict, n: int) -> TokenStats:
    """Every process's filed rows for sequences 0..n−1, flat, in sequence order."""
    rows = parallel.in_order(per_seq, n)
    lengths = np.array([len(t[0]) for t in rows], dtype=np.int64)
    return TokenStats(logprob=np.concatenate([t[0] for t in rows]),
                      mean=np.concatenate([t[1] for t in rows]),
                      var=np.concatenate([t[2] for t in rows]),
                      offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def cache_keyword(model) -> str:
    """The KV-cache argument of `model.forward`: `cache` (transformers ≥ 5.x) or
    `past_key_values` (older releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least one of its own."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    n = 0
    while n < shortest - 1 and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def _rows_on_prefix(model, sequences: Sequence[Sequence[int]], idx: Sequence[int], n: int,
                    pad_id: int, device: torch.device) -> list[torch.Tensor]:
    """For each sequence `sequences[i]`, i in `idx`: the logits (len − 1, V) predicting its
    tokens 1.., from one pass over the shared prefix (its first n tokens) and one over the
    sequences' own tokens, right-padded, on the prefix's KV cache."""
    from transformers import DynamicCache

    keyword = cache_keyword(model)
    prefix = torch.as_tensor(list(sequences[idx[0]][:n]), device=device)[None]
    cache = DynamicCache()
    prefix_logits = model(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                          position_ids=torch.arange(n, device=device)[None], use_cache=True,
                          **{keyword: cache}).logits[0]
    cache.batch_repeat_interleave(len(idx))
    own = [list(sequences[i][n:]) for i in idx]
    width = max(len(o) for o in own)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(idx), n + width, dtype=torch.long)
    attn[:, :n] = 1
    for row, o in enumerate(own):
        ids[row, :len(o)] = torch.as_tensor(o)
        attn[row, n:n + len(o)] = 1
    positions = (n + torch.arange(width, device=device))[None].expand(len(idx), -1)
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                   position_ids=positions, use_cache=True, **{keyword: cache}).logits
    # token t is predicted by the logits at t − 1: the prefix's up to t = n, then its own
    return [torch.cat([prefix_logits, logits[row, :len(o) - 1]]) for row, o in enumerate(own)]


def _prefix_cache_reproduces(model, seq: Sequence[int], n: int, pad_id: int,
                             device: torch.device) -> bool:
    """Whether `_rows_on_prefix` gives the model's own logits on `seq` (a model may keep no
    KV cache, or one of another kind)."""
    try:
        cached = _rows_on_prefix(model, [seq], [0], n, pad_id, device)[0]
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        # what a forward without a cache argument, or one that cannot use a DynamicCache,
        # raises: such a model is scored in full by `token_stats`, which needs no cache
        return False
    ids = torch.as_tensor(list(seq), device=device)[None]
    full = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                 position_ids=torch.arange(len(seq), device=device)[None]).logits[0, :-1]
    return cached.shape == full.shape and torch.allclose(cached, full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def shared_prefix_stats(model, sequences: Sequence[Sequence[int]], score_from: Sequence[int], *,
                        pad_id: int, batch_size: int = 32,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> TokenStats:
    """`token_stats` of sequences that share a long token prefix (a canary and its candidate
    secrets): the prefix runs once and the sequences' own tokens run on its KV cache.

    Equal to `token_stats` up to float rounding (the attention over the prefix is summed in
    another order). Falls back to `token_stats` when the shared prefix is shorter than half
    the shortest sequence, or when the cached pass does not reproduce the model's own logits
    on the first sequence. Batches are shared out among processes as `token_stats`'s are."""
    check_scoring_inputs(sequences, score_from)
    n = common_prefix_length(sequences)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    if n < 1 or 2 * n < min(len(s) for s in sequences) or \
            not _prefix_cache_reproduces(model, sequences[0], n, pad_id, device):
        model.train(was_training)
        return token_stats(model, sequences, score_from, pad_id=pad_id, batch_size=batch_size,
                           device=device, dtype=dtype)
    order = np.argsort([len(s) for s in sequences], kind="stable")
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    per_seq: dict[int, tuple[np.ndarray, ...]] = {}
    for _, idx in parallel.my_batches(batches):
        rows = [r[score_from[i] - 1:]
                for r, i in zip(_rows_on_prefix(model, sequences, idx, n, pad_id, device), idx)]
        targets = torch.as_tensor([t for i in idx for t in sequences[i][score_from[i]:]],
                                  device=device)
        _keep_per_sequence(per_seq, idx, stats_of_logits(torch.cat(rows), targets, dtype),
                           [len(r) for r in rows])
    model.train(was_training)
    return _merged_stats(per_seq, len(sequences))
