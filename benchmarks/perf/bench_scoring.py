"""Batched, length-sorted scoring vs one sequence at a time, measured side by side.

    .venv/bin/python benchmarks/perf/bench_scoring.py [--records 400] [--preset gpt2-tiny-teacher]

Prints tokens per second of both paths on the same model and records, their ratio, and the
largest difference between their per-token log-probabilities (they must agree).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from attacks.scoring import token_stats
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, compute_device, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--preset", default="gpt2-tiny-teacher")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    tok = train_tokenizer([format_text(r) for r in generate_records(2000, seed=1)], 2048)
    model = build_zoo_model(args.preset, tok).eval().to(compute_device())
    enc = [encode_record(r, tok, 192) for r in generate_records(args.records, seed=2)]
    ids, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    n_tokens = sum(len(i) for i in ids)

    def timed(batch_size: int):
        t = time.perf_counter()
        s = token_stats(model, ids, starts, pad_id=tok.pad_token_id, batch_size=batch_size)
        return s, time.perf_counter() - t

    token_stats(model, ids[:8], starts[:8], pad_id=tok.pad_token_id)   # warm-up
    batched, t_batched = timed(args.batch_size)
    single, t_single = timed(1)
    diff = float(np.max(np.abs(batched.logprob - single.logprob)))
    print(f"model {args.preset} on {compute_device()}, {args.records} records, {n_tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"one at a time : {n_tokens / t_single:10.0f} tokens/s ({t_single:.2f} s)")
    print(f"batched ({args.batch_size:3d}) : {n_tokens / t_batched:10.0f} tokens/s "
          f"({t_batched:.2f} s)")
    print(f"speed-up      : {t_single / t_batched:.2f}x; max |Δ log p| = {diff:.2e}")


if __name__ == "__main__":
    main()
