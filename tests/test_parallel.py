"""Scoring and generation shared out among processes (`attacks.parallel`) equal one process's.

Two threads stand in for two launched processes: each runs the same call inside `sharded`
with its rank, and their gather is a barrier that hands each thread both threads' parts, the
collective Accelerate's `gather_object` is under a launcher. The threads compute in turn (a
lock held until the gather), as processes with their own global RNG and their own model
would not interfere. Each result must equal the
unshared call's exactly, since every batch is the same padded tensor in both. The launched
two-process run (tests/test_launch.py) checks the same end to end.
"""
from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest

from attacks import parallel
from attacks.blocks import block_mope_scores, mope_scores
from attacks.memorization import greedy_generate, sample_generate
from attacks.scoring import common_prefix_length, shared_prefix_stats, token_stats
from kdaudit.data.template import encode_prompt, encode_record
from thread_ranks import Exchange, run_ranks


def run_sharded(fn, world: int = 2) -> list:
    """`fn(r)` in `world` threads, thread r inside `sharded` as rank r: every thread's result.
    The threads take turns: each holds `turn` until it reaches the gather."""
    exchange, turn = Exchange(world), threading.Lock()
    holding = [False] * world

    def gather_for(rank):
        def gather(obj):
            if holding[rank]:
                holding[rank] = False
                turn.release()
            return exchange.share(rank, obj)
        return gather

    def work(rank):
        turn.acquire()
        holding[rank] = True
        try:
            with parallel.sharded(parallel.Shard(rank, world, gather_for(rank))):
                return fn(rank)
        finally:
            if holding[rank]:
                holding[rank] = False
                turn.release()

    return run_ranks(work, exchange, world)


@pytest.fixture(scope="module")
def inputs(tiny_lm):
    model, tok, records, _ = tiny_lm
    enc = [encode_record(r, tok, 160) for r in records[:21]]
    return model, tok, records[:21], [e.input_ids for e in enc], [e.response_start for e in enc]


def test_shared_out_token_stats_equal_one_process(inputs):
    model, tok, _, ids, starts = inputs
    kw = dict(pad_id=tok.pad_token_id, batch_size=4)
    alone = token_stats(model, ids, starts, **kw)
    shared = run_sharded(lambda _: token_stats(model, ids, starts, **kw))
    for got in shared:
        for field in ("logprob", "mean", "var", "offsets"):
            np.testing.assert_array_equal(getattr(got, field), getattr(alone, field))


def test_shared_out_shared_prefix_stats_equal_one_process(inputs):
    model, tok, records, _, _ = inputs
    others = [dataclasses.replace(records[0], response=records[0].response + f" {k:05d}")
              for k in range(9)]
    enc = [encode_record(r, tok, 160) for r in others]
    ids, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    kw = dict(pad_id=tok.pad_token_id, batch_size=4)
    assert 2 * common_prefix_length(ids) >= min(map(len, ids))   # the shared-prefix path
    alone = shared_prefix_stats(model, ids, starts, **kw)
    shared = run_sharded(lambda _: shared_prefix_stats(model, ids, starts, **kw))
    for got in shared:
        for field in ("logprob", "mean", "var", "offsets"):
            np.testing.assert_array_equal(getattr(got, field), getattr(alone, field))


def test_each_process_takes_every_world_th_batch_and_alone_takes_all():
    def share(rank):
        with parallel.sharded(parallel.Shard(rank, 2, gather=None)):
            return [k for k, _ in parallel.my_batches("abcdefg")], parallel.is_first()
    assert share(0) == ([0, 2, 4, 6], True)
    assert share(1) == ([1, 3, 5], False)
    assert [k for k, _ in parallel.my_batches("abc")] == [0, 1, 2]
    with parallel.sharded(parallel.Shard(0, 1, gather=None)):      # a world of one
        assert parallel.merged({1: "x"}) == {1: "x"}


def test_shared_out_mope_and_block_mope_equal_one_process(inputs):
    model, tok, _, ids, starts = inputs
    kw = dict(pad_id=tok.pad_token_id, batch_size=4, n_perturbations=2, sigma=0.01)
    copies = [copy.deepcopy(model) for _ in range(2)]   # each process has its own
    alone = mope_scores(model, ids, starts, **kw)
    for got in run_sharded(lambda r: mope_scores(copies[r], ids, starts, **kw)):
        np.testing.assert_array_equal(got, alone)
    alone = block_mope_scores(model, ids, starts, **kw)
    for got in run_sharded(lambda r: block_mope_scores(copies[r], ids, starts, **kw)):
        np.testing.assert_array_equal(got, alone)


def test_shared_out_generation_equals_one_process(inputs):
    model, tok, records, _, _ = inputs
    prompts = [encode_prompt(r, tok, 96) for r in records]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, batch_size=4)
    alone = greedy_generate(model, prompts, max_new_tokens=8, **kw)
    for got in run_sharded(lambda _: greedy_generate(model, prompts, max_new_tokens=8, **kw)):
        assert got == alone
    alone = sample_generate(model, prompts, n=2, max_new_tokens=6, seed=3, **kw)
    for got in run_sharded(lambda _: sample_generate(model, prompts, n=2, max_new_tokens=6,
                                                   seed=3, **kw)):
        assert got == alone
