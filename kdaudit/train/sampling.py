"""Batched response sampling with a KV cache, from the student or from a student–teacher mixture.

On-policy KD methods train on text the student writes during training (ImitKD, GKD,
DistiLLM); SeqKD trains on teacher samples; MiniLLM samples from the mixture
`(1 − α) q + α p` of student q and teacher p and needs, for every sampled token, its log
probability under both. One token loop serves all of them: left-padded prompts, explicit
position ids (left padding shifts them), one forward per new token per model on the cache.
`temperature = 0` is greedy decoding, which lets a test compare against `model.generate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from attacks.memorization import left_padded_batches
from attacks.scoring import cache_keyword


@dataclass(frozen=True)
class Lockstep:
    """Keeps processes in step where every forward of the student is a collective (FSDP
    shards it, so each forward gathers its weights from all processes): they take the same
    on-policy decisions (`first`: the main process's draw, in every process) and sample for
    the same number of tokens (`all`: True when every process has finished its batch)."""

    first: Callable[[float], float]
    all: Callable[[bool], bool]


@dataclass
class Sample:
    """One sampled response: its tokens (EOS kept when reached) and, per token, the log
    probability under the student and under the teacher (None without a teacher)."""

    tokens: list[int]
    student_logprob: list[float]
    teacher_logprob: list[float] | None


def _top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose mass reaches top_p."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    sorted_lp = sorted_lp.masked_fill(mass_before >= top_p, -math.inf)
    return torch.full_like(logprobs, -math.inf).scatter(-1, order, sorted_lp)


def _forward(model, ids: torch.Tensor, attn: torch.Tensor, cache) -> torch.Tensor:
    """Last-position logits; `cache` (a DynamicCache) is extended in place."""
    positions = (attn.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                **{cache_keyword(model): cache})
    return out.logits[:, -1].float()


@torch.no_grad()
def sample_responses(student, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     pad_id: int, eos_id: int | None, teacher=None, teacher_mix: float = 0.0,
                     temperature: float = 1.0, top_p: float = 1.0,
                     generator: torch.Generator | None = None,
                     batch_size: int = 64, lockstep: Lockstep | None = None) -> list[Sample]:
    """Sample one response per prompt, in prompt order.

    With `teacher_mix` α > 0 each token is drawn from `(1 − α) q + α p` (MiniLLM); the teacher
    is also run (and its log probabilities returned) whenever it is given. With `lockstep`, a
    batch that has finished keeps running the models (writing nothing) until every process's
    batch has.
    """
    if not 0.0 <= teacher_mix <= 1.0:
        raise ValueError(f"teacher_mix must be in [0, 1], got {teacher_mix}")
    if teacher_mix > 0 and teacher is None:
        raise ValueError("teacher_mix > 0 needs a teacher")
    device = next(student.parameters()).device
    models = [student] if teacher is None else [student, teacher]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    out: list[Sample | None] = [None] * len(prompts)
    for _, idx, ids, attn in left_padded_batches(prompts, batch_size, pad_id, None):
        ids, attn = ids.to(device), attn.to(device)
        caches = [DynamicCache() for _ in models]
        step_ids = ids
        rows = len(idx)
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lq = torch.zeros(rows, max_new_tokens, device=device)
        lp = torch.zeros(rows, max_new_tokens, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
        finished = False
        for t in range(max_new_tokens):
            if finished:       # only keeping the other processes company (`lockstep`): the
                _forward(student, step_ids, attn, caches[0])   # student's forward is collective
                if lockstep.all(True):
                    break
                step_ids = torch.full_like(step_ids, pad_id)
                attn = torch.cat([attn, torch.zeros_like(attn[:, :1])], dim=1)
                continue
            logits = [_forward(m, step_ids, attn, caches[k]) for k, m in enumerate(models)]
            tau = temperature if temperature > 0 else 1.0
            logq = torch.log_softmax(logits[0] / tau, -1)
            logp = torch.log_softmax(logits[1] / tau, -1) if teacher is not None else None
            if teacher_mix > 0:
                mix = torch.logaddexp(logq + math.log1p(-teacher_mix) if teacher_mix < 1
                                      else torch.full_like(logq, -math.inf),
                                      logp + math.log(teacher_mix))
            else:
                mix = logq
            if temperature == 0:
                nxt = mix.argmax(-1)
            else:
                probs = _top_p_filter(mix, top_p).exp()
                # drawn where the generator lives (a CPU generator cannot draw on a GPU)
                on = generator.device if generator is not None else probs.device
                nxt = torch.multinomial(probs.to(on), 1, generator=generator)
                nxt = nxt.squeeze(-1).to(device)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens[:, t] = nxt
            lq[:, t] = logq.gather(-1, nxt[:, None]).squeeze(-1)
            if logp is not None:
                lp[:, t] = logp.gather(-1, nxt[:, None]).squeeze(-1)
            if eos_id is not None:
                newly = (nxt == eos_id) & ~done
                lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
                done |= newly
            finished = bool(done.all())
            if lockstep.all(finished) if lockstep is not None else finished:
                break
            step_ids = nxt[:, None]
            attn = torch.cat([attn, (~done | (nxt == eos_id) if eos_id is not None
                                     else torch.ones_like(done))[:, None].long()], dim=1)
        for row, i in enumerate(idx):
            n = int(lengths[row])
            out[i] = Sample(tokens[row, :n].tolist(), lq[row, :n].tolist(),
                            lp[row, :n].tolist() if teacher is not None else None)
    for m, mode in zip(models, modes):
        m.train(mode)
    return out  # type: ignore[return-value]
