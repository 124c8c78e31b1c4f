"""Scoring: kdaudit's shared pass against the floor and against one pass per signal per record.

    .venv/bin/python benchmarks/perf/bench_scoring.py [--records 400] [--preset gpt2-tiny-teacher]

Four paths on the same model and records, each run `--repeats` times in rotation (the best
time of each is kept, so a busy moment hurts every path alike):
  floor      a bare batched forward pass: the same batches, logits computed, nothing else;
  shared     kdaudit: one batched pass gives every single-pass signal (token_stats, then
             loss, zlib, mink and minkpp from its statistics);
  one-by-one the shared pass with one record per batch;
  per-signal one forward pass per signal per record, full logits, as MIMIR-style tools do.
Prints the ratios and the largest difference between the signals of `shared` and `per-signal`
(they must agree).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from attacks.mia import SIGNALS, SignalInputs
from attacks.scoring import (TokenStats, default_batch_tokens, scoring_batches, stats_of_logits,
                             token_stats)
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, compute_device, train_tokenizer

SINGLE_PASS = ("loss", "zlib", "mink", "minkpp")


def signals_of(stats: TokenStats, texts: list[str], names=SINGLE_PASS) -> dict[str, np.ndarray]:
    inputs = SignalInputs(stats=stats, texts=texts)
    return {name: SIGNALS[name](inputs) for name in names}


@torch.inference_mode()
def per_signal_per_record(model, ids, starts, texts) -> dict[str, np.ndarray]:
    """One full forward pass for each (signal, record), each signal from its own pass."""
    out = {name: np.zeros(len(ids)) for name in SINGLE_PASS}
    for name in SINGLE_PASS:
        for i, (seq, start, text) in enumerate(zip(ids, starts, texts)):
            x = torch.tensor([seq], device=model.device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
            logits = logits[0, start - 1:-1]
            lp, mu, var = (t.double().cpu().numpy()
                           for t in stats_of_logits(logits, x[0, start:], torch.float32))
            one = TokenStats(lp, mu, var, np.array([0, len(lp)]))
            out[name][i] = signals_of(one, [text], (name,))[name][0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--preset", default="gpt2-tiny-teacher")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    device = compute_device()
    tok = train_tokenizer([format_text(r) for r in generate_records(2000, seed=1)], 2048)
    model = build_zoo_model(args.preset, tok).eval().to(device)
    records = generate_records(args.records, seed=2)
    enc = [encode_record(r, tok, 192) for r in records]
    ids, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    texts = [r.response for r in records]
    n_tokens = sum(len(i) for i in ids)
    pad, bs = tok.pad_token_id, args.batch_size
    batches = scoring_batches(ids, starts, pad, bs, device, default_batch_tokens(device))

    @torch.inference_mode()
    def floor():
        for b in batches:
            model(input_ids=b.ids, attention_mask=b.attn, position_ids=b.pos).logits

    def shared(batch_size=bs):
        return signals_of(token_stats(model, ids, starts, pad_id=pad, batch_size=batch_size),
                          texts)

    paths = {"floor": floor, "shared": shared, "one-by-one": lambda: shared(1),
             "per-signal": lambda: per_signal_per_record(model, ids, starts, texts)}
    token_stats(model, ids[:8], starts[:8], pad_id=pad)       # warm-up
    best, results = {name: float("inf") for name in paths}, {}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)

    diff = max(float(np.max(np.abs(results["shared"][s] - results["per-signal"][s])))
               for s in SINGLE_PASS)
    print(f"model {args.preset} on {device}, {args.records} records, {n_tokens} tokens, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}; "
          f"{len(SINGLE_PASS)} single-pass signals {', '.join(SINGLE_PASS)}")
    for name, seconds in best.items():
        print(f"  {name:11s}: {n_tokens / seconds:9.0f} tokens/s ({seconds:.2f} s)")
    print(f"shared pass / bare forward (floor)      : {best['shared'] / best['floor']:.2f}×")
    print(f"speed-up over per-signal per-record loop: {best['per-signal'] / best['shared']:.1f}× "
          f"for {len(SINGLE_PASS)} signals; max |Δ signal| = {diff:.1e}")
    print(f"speed-up of batching (one-by-one / shared): {best['one-by-one'] / best['shared']:.2f}×")


if __name__ == "__main__":
    main()
