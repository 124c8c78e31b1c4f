"""Memorization: batched greedy continuation of prompts, compared token by token."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from attacks import parallel


def left_padded_batches(prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                        desc: str | None, *, shared: bool = False):
    """Length-sorted batches of prompts, left-padded for generation: (batch number, indices,
    ids, mask). `shared`: only this process's share of them (`attacks.parallel`)."""
    order = np.argsort([len(p) for p in prompts], kind="stable")
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    numbered = parallel.my_batches(batches) if shared else list(enumerate(batches))
    for k, idx in tqdm(numbered, desc=desc, disable=desc is None or not parallel.is_first(),
                       unit="batch", mininterval=1.0):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.as_tensor(list(prompts[i]))
            attn[row, width - len(prompts[i]):] = 1
        yield k, idx, ids, attn


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                    pad_id: int, eos_id: int | None, batch_size: int = 64,
                    device: torch.device | str | None = None,
                    desc: str | None = None) -> list[list[int]]:
    """Greedy continuations (KV cache, left padding), cut after the first EOS (kept)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[int, list[int]] = {}
    for _, idx, ids, attn in left_padded_batches(prompts, batch_size, pad_id, desc, shared=True):
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False,
                             num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id) + 1]
            out[int(i)] = new
    model.train(was_training)
    return parallel.in_order(out, len(prompts))


def match_metrics(generated: Sequence[Sequence[int]], references: Sequence[Sequence[int]],
                  n: int = 32) -> dict[str, np.ndarray]:
    """Per record: position-wise match rate over the first min(n, len(reference)) tokens,
    the longest exact prefix, and whether all of those tokens were reproduced."""
    if len(generated) != len(references):
        raise ValueError("generated and references differ in length")
    rate = np.zeros(len(references))
    prefix = np.zeros(len(references), dtype=np.int64)
    for i, (g, r) in enumerate(zip(generated, references)):
        m = min(n, len(r))
        if m == 0:
            raise ValueError(f"reference {i} is empty")
        hits = [j < len(g) and g[j] == r[j] for j in range(m)]
        rate[i] = sum(hits) / m
        prefix[i] = next((j for j, h in enumerate(hits) if not h), m)
    window = np.array([min(n, len(r)) for r in references])
    return {"match_rate": rate, "longest_prefix": prefix, "fully_extracted": prefix == window}


def secret_hits(texts: Sequence[str], secrets: Sequence[Sequence[str]]) -> np.ndarray:
    """Per record: True when any of its secrets appears verbatim in the generated text."""
    return np.array([any(s and s in t for s in ss) for t, ss in zip(texts, secrets)], dtype=bool)


@torch.no_grad()
def sample_generate(model, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int,
                    pad_id: int, eos_id: int | None, top_k: int = 40, batch_size: int = 64,
                    seed: int = 0, desc: str | None = None) -> list[list[tuple[list[int], float]]]:
    """n top-k samples per prompt, each with the model's own mean log-likelihood of it,
    sorted most likely first (Carlini et al. 2021 rank extraction candidates this way). Batch
    k samples from seed (seed, k), so a batch's samples do not depend on the batches before."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[int, list[tuple[list[int], float]]] = {}
    for k, idx, ids, attn in left_padded_batches(prompts, batch_size, pad_id, desc, shared=True):
        torch.manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max_new_tokens, do_sample=True, top_k=top_k,
                             top_p=1.0, temperature=1.0, num_return_sequences=n,
                             pad_token_id=pad_id, eos_token_id=eos_id, output_scores=True,
                             return_dict_in_generate=True)
        new = gen.sequences[:, width:]
        # the model's own (untruncated) log-probabilities of the sampled tokens
        full = model(input_ids=gen.sequences, attention_mask=torch.cat(
            [attn.to(device).repeat_interleave(n, 0), torch.ones_like(new)], 1)).logits
        logp = torch.log_softmax(full[:, width - 1:-1].float(), -1).gather(
            2, new[..., None]).squeeze(2)
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            end = toks.index(eos_id) + 1 if eos_id is not None and eos_id in toks else len(toks)
            out.setdefault(int(idx[row // n]), []).append(
                (toks[:end], float(logp[row, :end].mean())))
    model.train(was_training)
    return parallel.in_order({i: sorted(c, key=lambda c: -c[1]) for i, c in out.items()},
                             len(prompts))
