"""Off-policy KD: the teacher run every step against the teacher cache, side by side.

    .venv/bin/python benchmarks/perf/bench_teacher_cache.py [--examples 128] [--topk 256,2048]

Trains the same kd student from the same start on the same batches: the teacher run on every
step (the paper's code), and with `teacher_cache_topk` = k for each k given (the teacher runs
in the first epoch only; k = 2048, the whole vocabulary, is exact), in alternating rounds. The teacher and the student are the tiny preset's pretrained bases (from the
machine's cache; pretrained here when missing), so the teacher's distributions are peaked as a
trained model's are. Prints the seconds per epoch of both runs, the ratio of a cached epoch
(after the first) to an uncached one, the cache's memory, the teacher's mass beyond its top k,
and the exact KD loss (forward KL to the real teacher) of the two trained students.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from kdaudit.config import KDConfig, load_config
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import compute_device, load_model
from kdaudit.models.bases import cached_base, cached_tokenizer, pretraining_records
from kdaudit.train import loop
from kdaudit.train.batching import collate
from kdaudit.train.methods import METHODS, method_params


@torch.no_grad()
def exact_kd(student, teacher, examples, pad_id: int, topk: int) -> tuple[float, float]:
    """(mean forward KL(teacher ‖ student) over response tokens, mean teacher mass beyond
    its top-k), on the real teacher."""
    kl = tail = n = 0.0
    for i in range(0, len(examples), 32):
        batch = collate(examples[i:i + 32], pad_id)
        kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids)
        mask = batch.target_mask[:, 1:].bool()
        p = torch.log_softmax(teacher(**kw).logits[:, :-1][mask].float(), -1)
        q = torch.log_softmax(student.eval()(**kw).logits[:, :-1][mask].float(), -1)
        kl += float((p.exp() * (p - q)).sum())
        tail += float((1 - p.exp().topk(topk, -1).values.sum(-1)).sum())
        n += len(p)
    return kl / n, tail / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--topk", default="256,2048", help="comma-separated k")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds over the runs, in alternating order; each keeps its faster")
    args = ap.parse_args()

    cfg = load_config("tiny")
    texts = [format_text(r) for r in pretraining_records(cfg)]
    tok = cached_tokenizer(cfg, texts)
    bases = {role: cached_base(cfg, getattr(cfg.models, role), tok, texts)
             for role in ("teacher", "student")}
    teacher = load_model(bases["teacher"]).eval().to(compute_device())
    examples = [encode_record(r, tok, cfg.data.max_length)
                for r in generate_records(args.examples, seed=5)]
    train_cfg = dataclasses.replace(cfg.student, epochs=args.epochs, checkpoint_every=0)
    runs: dict[int, tuple[list[float], float, float]] = {}
    ks = [int(k) for k in args.topk.split(",")]
    order = [0, *ks]
    for topk in [*order, *reversed(order)][:len(order) * args.rounds]:
        records, stamps = [], []
        job = loop.TrainJob(
            load_model(bases["student"]), examples, METHODS["kd"], train_cfg,
            tempfile.mkdtemp(prefix="kdaudit-bench-"), seed=0, pad_id=tok.pad_token_id,
            teacher=teacher, desc=None,
            params=method_params(METHODS["kd"], KDConfig(teacher_cache_topk=topk)),
            callbacks=[lambda step, rec: (records.append(rec),
                                          stamps.append(time.perf_counter()))])
        start = time.perf_counter()
        loop.train(job)
        final = exact_kd(job.model, teacher, examples, tok.pad_token_id, topk or 1)
        steps = len(records) // args.epochs
        ends = [stamps[(e + 1) * steps - 1] for e in range(args.epochs)]
        times = [b - a for a, b in zip([start, *ends], ends)]
        if topk not in runs or statistics.mean(times[1:]) < statistics.mean(runs[topk][0][1:]):
            runs[topk] = (times, *final)          # the faster round of each, by epochs 2+
    plain_t, plain_kl, _ = runs[0]
    later = slice(1, None)
    tokens = sum(len(e.input_ids) - e.response_start for e in examples)
    print(f"kd, tiny bases on {compute_device()}, {args.examples} examples ({tokens} response "
          f"tokens), {args.epochs} epochs, {torch.get_num_threads()} threads, the faster of "
          f"{args.rounds} alternating rounds")
    for k, (times, _, _) in runs.items():
        label = f"cache, top-{k}" if k else "teacher every step"
        print(f"  {label:20s}: epochs {', '.join(f'{t:.1f}' for t in times)} s")
    for k in ks:
        cached_t, cached_kl, tail = runs[k]
        width = 4 if k >= len(tok) else 8     # log-probability, and its token id unless all kept
        print(f"top-{k}: cached epoch / uncached epoch (epochs 2+): "
              f"{statistics.mean(cached_t[later]) / statistics.mean(plain_t[later]):.2f}×; "
              f"first epoch {cached_t[0] / plain_t[0]:.2f}×; cache memory "
              f"{tokens * k * width / 2 ** 20:.1f} MiB ({k} × {width} bytes per response token)")
        print(f"top-{k}: teacher mass beyond the top k {tail:.3f} per response token; trained "
              f"student's exact KD loss (forward KL to the teacher) {cached_kl:.4f} against "
              f"{plain_kl:.4f} with the teacher every step ({(cached_kl - plain_kl) / plain_kl:+.1%})")


if __name__ == "__main__":
    main()
