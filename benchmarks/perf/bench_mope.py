"""Per-block MoPe: kdaudit's fast path against the naive full recomputation, side by side.

    .venv/bin/python benchmarks/perf/bench_mope.py [--records 40] [--perturbations 10]

Naive: perturb block b, run the whole model on every batch, restore (blocks × perturbations
full forward passes). Fast (`attacks.blocks.block_mope_scores`): one clean pass per batch
keeps each block's input, and each perturbation of block b reruns only blocks b..L−1, the
final norm and the LM head; the head and the last block's MLP on the scored positions only.
Both draw the same noise; their scores must agree. Run on the tiny teacher (3 blocks) and on
an 8-block model of the same width, where the saving of skipping the blocks upstream grows:
for L blocks the fast path runs (L + 1) / 2L of the naive block calls, 0.67 for 3 blocks,
0.56 for 8, plus one clean pass per batch, which more perturbations amortise: the default is
kdaudit's own (`audit.perturbations`, 10). Trimming the last block's MLP takes the 3-block
case below that count.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from attacks.blocks import (_add_noise_, _block_key, _gaussian, _mean_nll, _restore_,
                            block_mope_scores, find_blocks)
from attacks.scoring import default_batch_tokens, scoring_batches
from kdaudit.config import AuditConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, compute_device, train_tokenizer


@torch.no_grad()
def naive_block_mope(model, ids, starts, *, pad_id, sigma, n_perturbations, seed, batch_size):
    device = next(model.parameters()).device
    batches = scoring_batches(ids, starts, pad_id, batch_size, device,
                              default_batch_tokens(device))

    def nll() -> np.ndarray:
        out = np.zeros(len(ids))
        for b in batches:
            logits = model(input_ids=b.ids, attention_mask=b.attn, position_ids=b.pos).logits
            out[b.idx] = _mean_nll(logits[:, :-1][b.score[:, 1:]], b)
        return out

    clean = nll()
    blocks = find_blocks(model)
    scores = np.zeros((len(blocks), len(ids)))
    for r, block in enumerate(blocks):
        params = list(block.parameters())
        originals = [p.detach().clone() for p in params]
        for j in range(n_perturbations):
            _add_noise_(params, list(_gaussian(params, _block_key(seed, r, j))), sigma)
            scores[r] += nll()
            _restore_(params, originals)
    return scores / n_perturbations - clean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--perturbations", type=int, default=AuditConfig.perturbations)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternating runs of each path; the best time of each is kept")
    args = ap.parse_args()

    device = compute_device()
    tok = train_tokenizer([format_text(r) for r in generate_records(2000, seed=1)], 2048)
    enc = [encode_record(r, tok, 192) for r in generate_records(args.records, seed=2)]
    ids, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    kw = dict(pad_id=tok.pad_token_id, sigma=0.01, n_perturbations=args.perturbations, seed=0,
              batch_size=args.batch_size)
    print(f"{args.records} records ({sum(map(len, ids))} tokens), {args.perturbations} "
          f"perturbations per block, on {device}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats} alternating runs")
    for label, layers in (("gpt2-tiny-teacher", None), ("gpt2-tiny-teacher, 8 blocks", 8)):
        model = build_zoo_model("gpt2-tiny-teacher", tok).eval().to(device)
        if layers:
            from transformers import GPT2LMHeadModel

            config = model.config
            config.n_layer = layers
            model = GPT2LMHeadModel(config).eval().to(device)
        best = {"fast": float("inf"), "naive": float("inf")}
        scores = {}
        paths = {"fast": block_mope_scores, "naive": naive_block_mope}
        for k in range(args.repeats):   # alternating, each first in turn: a slow spell hits both
            for name in (("fast", "naive") if k % 2 == 0 else ("naive", "fast")):
                t = time.perf_counter()
                scores[name] = paths[name](model, ids, starts, **kw)
                best[name] = min(best[name], time.perf_counter() - t)
        t_fast, t_naive = best["fast"], best["naive"]
        fast, naive = scores["fast"], scores["naive"]
        print(f"{label}: {len(find_blocks(model))} blocks")
        print(f"  naive (full forward per perturbation): {t_naive:7.2f} s")
        print(f"  fast  (clean prefix once per block)  : {t_fast:7.2f} s")
        print(f"  ratio fast / naive: {t_fast / t_naive:.2f}×   "
              f"max |Δ score| = {np.abs(fast - naive).max():.1e}")


if __name__ == "__main__":
    main()
