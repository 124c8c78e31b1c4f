"""Off-policy KD: the teacher run every step against the teacher cache, side by side.

    .venv/bin/python benchmarks/perf/bench_teacher_cache.py [--examples 128] [--topk 256,2048]

Trains the same kd student from the same start on the same batches: the teacher run on every
step (the paper's code), and with `teacher_cache_topk` = k for each k given (the teacher runs
in the first epoch only; k = 2048, the whole vocabulary, is exact), in alternating rounds.
The teacher and the student are the tiny preset's pretrained bases (from the machine's cache;
pretrained here when missing), so the teacher's distributions are peaked as a trained
model's are. Prints the seconds per epoch of both runs, the ratio of a cached epoch
(after the first) to an uncached one, the cache's memory, the teacher's mass beyond its top k,
and the exact KD loss (forward KL to the real teacher) of the two trained students.

A cached epoch is the student's own step, so the ratio is the student's share of an uncached
epoch: on the tiny pair (teacher 3 × 192, student 2 × 128) that share is large. The paper's
pairs have a teacher whose forward is ~12× the student's (gpt2-xl to gpt2), so the same
comparison is then run, exact cache only, with a 6-block, 320-wide GPT-2 teacher of random
weights (speed does not depend on them) in the tiny teacher's place.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time

import torch
from transformers import GPT2LMHeadModel

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


def compare(teacher, student_dir, examples, tok, train_cfg, ks: list[int], rounds: int
            ) -> dict[int, tuple[list[float], float, float]]:
    """{k: (seconds per epoch, exact KD loss, teacher mass beyond the top k)}, k = 0 the
    teacher every step; the runs in alternating rounds, each keeping its faster round."""
    runs: dict[int, tuple[list[float], float, float]] = {}
    order = [0, *ks]
    for topk in [*order, *reversed(order)][:len(order) * rounds]:
        records, stamps = [], []
        job = loop.TrainJob(
            load_model(student_dir), examples, METHODS["kd"], train_cfg,
            tempfile.mkdtemp(prefix="kdaudit-bench-"), seed=0, pad_id=tok.pad_token_id,
            teacher=teacher, desc=None,
            params=method_params(METHODS["kd"], KDConfig(teacher_cache_topk=topk)),
            callbacks=[lambda step, rec: (records.append(rec),
                                          stamps.append(time.perf_counter()))])
        start = time.perf_counter()
        loop.train(job)
        final = exact_kd(job.model, teacher, examples, tok.pad_token_id, topk or 1)
        epochs = train_cfg.epochs
        steps = len(records) // epochs
        ends = [stamps[(e + 1) * steps - 1] for e in range(epochs)]
        times = [b - a for a, b in zip([start, *ends], ends)]
        if topk not in runs or statistics.mean(times[1:]) < statistics.mean(runs[topk][0][1:]):
            runs[topk] = (times, *final)
    return runs


def report(runs, ks: list[int], vocab: int, tokens: int) -> None:
    plain_t, plain_kl, _ = runs[0]
    later = slice(1, None)
    for k, (times, _, _) in runs.items():
        label = f"cache, top-{k}" if k else "teacher every step"
        print(f"  {label:20s}: epochs {', '.join(f'{t:.1f}' for t in times)} s")
    for k in ks:
        cached_t, cached_kl, tail = runs[k]
        width = 4 if k >= vocab else 8     # log-probability, and its token id unless all kept
        print(f"top-{k}: cached epoch / uncached epoch (epochs 2+): "
              f"{statistics.mean(cached_t[later]) / statistics.mean(plain_t[later]):.2f}×; "
              f"first epoch {cached_t[0] / plain_t[0]:.2f}×; cache memory "
              f"{tokens * k * width / 2 ** 20:.1f} MiB ({k} × {width} bytes per response token)")
        print(f"top-{k}: teacher mass beyond the top k {tail:.3f} per response token; trained "
              f"student's exact KD loss (forward KL to the teacher) {cached_kl:.4f} against "
              f"{plain_kl:.4f} with the teacher every step ({(cached_kl - plain_kl) / plain_kl:+.1%})")


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
    ks = [int(k) for k in args.topk.split(",")]
    tokens = sum(len(e.input_ids) - e.response_start for e in examples)
    print(f"kd, tiny bases on {compute_device()}, {args.examples} examples ({tokens} response "
          f"tokens), {args.epochs} epochs, {torch.get_num_threads()} threads, the faster of "
          f"{args.rounds} alternating rounds")
    report(compare(teacher, bases["student"], examples, tok, train_cfg, ks, args.rounds),
           ks, len(tok), tokens)

    # the paper's pairs: gpt2-xl's forward is ~12× gpt2's; here a 6-block, 320-wide GPT-2
    # (random weights: speed does not depend on them) against the same tiny student
    big = copy.deepcopy(teacher.config)
    big.n_layer, big.n_embd, big.n_head = 6, 320, 5
    torch.manual_seed(0)
    wide = GPT2LMHeadModel(big).eval().to(compute_device())
    exact = [k for k in ks if k >= len(tok)]
    print(f"a teacher {big.n_layer} blocks × {big.n_embd} wide (random weights; its forward "
          f"{forward_flops(wide) / forward_flops(load_model(bases['student'])):.0f}× the "
          f"student's per token, as gpt2-xl to gpt2), exact cache only")
    report(compare(wide, bases["student"], examples, tok, train_cfg, exact, args.rounds),
           exact, len(tok), tokens)


def forward_flops(model) -> int:
    """2 × the weights a token passes through (matrices only; attention scores left out)."""
    return 2 * sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() == 2 and "wpe" not in n)


if __name__ == "__main__":
    main()
