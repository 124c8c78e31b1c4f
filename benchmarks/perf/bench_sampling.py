"""Generation, measured side by side on the same model and prompts:
  on-policy sampling (kdaudit.train.sampling): the batched KV-cache token loop vs recomputing
  the whole prefix at every token;
  memorization (attacks.memorization.greedy_generate): batched generation vs one prompt at a
  time, both with the KV cache.

    .venv/bin/python benchmarks/perf/bench_sampling.py [--prompts 32] [--new-tokens 64]

Prints new tokens per second of each path, the ratios, and whether the greedy outputs agree
(they must).
"""
from __future__ import annotations

import argparse
import time

import torch

from attacks.memorization import greedy_generate
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_prompt, format_text
from kdaudit.models import build_zoo_model, compute_device, train_tokenizer
from kdaudit.train.sampling import sample_responses


@torch.no_grad()
def no_cache_greedy(model, prompts, max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy decoding that runs the full left-padded sequence again for every new token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    out = []
    for _ in range(max_new_tokens):
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        nxt = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1]
        nxt = nxt.argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        attn = torch.cat([attn, torch.ones_like(nxt)[:, None]], 1)
    return torch.stack(out, 1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--preset", default="gpt2-tiny-student")
    args = ap.parse_args()

    records = generate_records(args.prompts + 400, seed=1)
    tok = train_tokenizer([format_text(r) for r in records[args.prompts:]], 2048)
    model = build_zoo_model(args.preset, tok).eval().to(compute_device())
    prompts = [encode_prompt(r, tok, 96) for r in records[:args.prompts]]
    n = args.prompts * args.new_tokens

    sample_responses(model, prompts[:4], max_new_tokens=4, pad_id=tok.pad_token_id,
                     eos_id=None, temperature=0)                     # warm-up
    t0 = time.perf_counter()
    cached = sample_responses(model, prompts, max_new_tokens=args.new_tokens,
                              pad_id=tok.pad_token_id, eos_id=None, temperature=0)
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = no_cache_greedy(model, prompts, args.new_tokens, tok.pad_token_id)
    t_plain = time.perf_counter() - t0

    same = [s.tokens for s in cached] == plain
    print(f"{args.preset} on {compute_device()}, {args.prompts} prompts × {args.new_tokens} "
          f"new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"  KV cache:    {n / t_cache:8.0f} tokens/s ({t_cache:.2f} s)")
    print(f"  no cache:    {n / t_plain:8.0f} tokens/s ({t_plain:.2f} s)")
    print(f"  speed-up:    {t_plain / t_cache:.2f}×   greedy outputs equal: {same}")

    memorize = {}
    for batch_size in (args.prompts, 1):
        t0 = time.perf_counter()
        memorize[batch_size] = (greedy_generate(model, prompts, max_new_tokens=args.new_tokens,
                                                pad_id=tok.pad_token_id, eos_id=None,
                                                batch_size=batch_size),
                                time.perf_counter() - t0)
    (batched, t_batched), (single, t_single) = memorize[args.prompts], memorize[1]
    print(f"memorization (greedy_generate), {args.prompts} prompts × {args.new_tokens} tokens")
    print(f"  batched ({args.prompts}):  {n / t_batched:8.0f} tokens/s ({t_batched:.2f} s)")
    print(f"  one at a time: {n / t_single:8.0f} tokens/s ({t_single:.2f} s)")
    print(f"  batched speed-up: {t_single / t_batched:.2f}×   outputs equal: {batched == single}")


if __name__ == "__main__":
    main()
