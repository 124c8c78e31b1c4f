"""Canary exposure: each canary's candidates scored on one KV cache of their shared prefix
(`shared_prefix_stats`) against every candidate scored in full (`token_stats`), side by side.

    python benchmarks/perf/bench_canaries.py [--canaries 10] [--candidates 200] [--rounds 3]

The tiny preset's base teacher (from the machine's cache; pretrained here when missing) and
its canaries: each repeated canary is ranked against `--candidates` random secrets, and its
record differs from theirs only in the secret, near the end. Prints the seconds of both
(the best of alternating rounds), the ratio, and the largest differences in total NLL and
in exposure (bits).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import time

import numpy as np
import torch

from attacks.privacy import estimate_exposure
from attacks.scoring import shared_prefix_stats, token_stats
from kdaudit.config import load_config
from kdaudit.data.canaries import SECRET_DIGITS, make_canaries, random_secret
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import compute_device, load_model
from kdaudit.models.bases import cached_base, cached_tokenizer, pretraining_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    cfg = load_config("tiny")
    texts = [format_text(r) for r in pretraining_records(cfg)]
    tok = cached_tokenizer(cfg, texts)
    model = load_model(cached_base(cfg, cfg.models.teacher, tok, texts)).eval()
    model.to(compute_device())
    rng = random.Random(0)
    sets = []
    for c in make_canaries(args.canaries, cfg.data.canary_repeats, 0, seed=0):
        recs = [c.record] + [dataclasses.replace(
            c.record, response=c.record.response.replace(c.secret, random_secret(rng)))
            for _ in range(args.candidates)]
        enc = [encode_record(r, tok, cfg.data.max_length) for r in recs]
        sets.append(([e.input_ids for e in enc], [e.response_start for e in enc]))
    tokens = sum(len(s) for seqs, _ in sets for s in seqs)
    print(f"tiny base teacher on {compute_device()}, {args.canaries} canaries × "
          f"{args.candidates + 1} candidates ({tokens} tokens), batch {cfg.audit.batch_size}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} alternating rounds")

    paths = {"every candidate in full": token_stats, "shared prefix once": shared_prefix_stats}
    best = dict.fromkeys(paths, float("inf"))
    nll: dict[str, list[np.ndarray]] = {}
    for _ in range(args.rounds):
        for name, stats in paths.items():
            t0 = time.perf_counter()
            nll[name] = [stats(model, seqs, starts, pad_id=tok.pad_token_id,
                               batch_size=cfg.audit.batch_size).total_nll()
                         for seqs, starts in sets]
            best[name] = min(best[name], time.perf_counter() - t0)
    full, shared = (nll[name] for name in paths)
    exposure = [[estimate_exposure(v[0], v[1:], 10.0 ** SECRET_DIGITS, method="skewnorm")
                 for v in values] for values in (full, shared)]
    for name, seconds in best.items():
        print(f"  {name:24s}: {seconds:6.2f} s ({tokens / seconds:7.0f} tokens/s)")
    ratio = best["shared prefix once"] / best["every candidate in full"]
    print(f"ratio shared prefix / in full: {ratio:.2f}×   "
          f"max |Δ total NLL| = {max(np.abs(a - b).max() for a, b in zip(full, shared)):.1e}   "
          f"max |Δ exposure| = {np.abs(np.subtract(*exposure)).max():.1e} bits")


if __name__ == "__main__":
    main()
