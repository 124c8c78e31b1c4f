"""Canary candidates scored on one KV cache of their common prefix (`shared_prefix_stats`)
give `token_stats`'s statistics, for every model family kdaudit scores."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from attacks.scoring import common_prefix_length, shared_prefix_stats, token_stats
from kdaudit.data.canaries import make_canaries, random_secret
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, train_tokenizer

FAMILIES = ("gpt2-smoke-teacher", "opt-smoke-teacher", "llama-smoke-teacher", "neox")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([format_text(r) for r in generate_records(200, seed=3)], 400)


def _model(name: str, tok):
    if name != "neox":
        model = build_zoo_model(name, tok, seed=0)
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=256, pad_token_id=tok.pad_token_id))
    with torch.no_grad():   # a wider spread than a fresh init: distributions far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08, generator=torch.Generator().manual_seed(p.numel()))
    return model.eval()


def _candidates(tok, n: int = 40) -> tuple[list[list[int]], list[int]]:
    """A canary and n − 1 others with random secrets (of differing token counts)."""
    canary = make_canaries(1, 5, 0, seed=0)[0]
    rng = random.Random(1)
    records = [canary.record] + [dataclasses.replace(
        canary.record, response=canary.record.response.replace(canary.secret, random_secret(rng)))
        for _ in range(n - 1)]
    enc = [encode_record(r, tok, 160) for r in records]
    return [e.input_ids for e in enc], [e.response_start for e in enc]


@pytest.mark.parametrize("name", FAMILIES)
def test_candidates_on_the_shared_prefix_score_as_one_by_one(name, tok):
    model = _model(name, tok)
    seqs, starts = _candidates(tok)
    n = common_prefix_length(seqs)
    assert 2 * n >= min(map(len, seqs)) and len({len(s) for s in seqs}) > 1
    starts[1] = n + 2           # a sequence scored from inside its own tokens only
    widths = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    got = shared_prefix_stats(model, seqs, starts, pad_id=tok.pad_token_id, batch_size=16)
    hook.remove()
    want = token_stats(model, seqs, starts, pad_id=tok.pad_token_id, batch_size=16)
    assert sorted(widths)[-2] < min(map(len, seqs))   # one full pass only: the check's
    assert np.array_equal(got.offsets, want.offsets)
    for field in ("logprob", "mean", "var"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=2e-5,
                                   err_msg=field)


def test_sequences_without_a_long_shared_prefix_are_scored_as_by_token_stats(tok):
    model = _model(FAMILIES[0], tok)
    enc = [encode_record(r, tok, 160) for r in generate_records(12, seed=5)]
    seqs, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    got = shared_prefix_stats(model, seqs, starts, pad_id=tok.pad_token_id, batch_size=4)
    want = token_stats(model, seqs, starts, pad_id=tok.pad_token_id, batch_size=4)
    assert np.array_equal(got.logprob, want.logprob) and np.array_equal(got.var, want.var)


def test_the_common_prefix_leaves_every_sequence_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix_length([[7, 1], [8, 1]]) == 0


class _ForgetsItsCache(torch.nn.Module):
    """A causal LM that takes a KV cache and ignores it, as a model without one would."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        kw.pop("past_key_values", None)
        kw.pop("cache", None)
        if "attention_mask" in kw:    # the mask spans prefix + own tokens: keep the own part
            kw["attention_mask"] = kw["attention_mask"][:, -kw["input_ids"].shape[1]:]
        return self.model(**kw)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def test_a_model_whose_cache_does_not_reproduce_its_logits_is_scored_in_full(tok):
    model = _ForgetsItsCache(_model(FAMILIES[0], tok)).eval()
    seqs, starts = _candidates(tok, n=9)
    got = shared_prefix_stats(model, seqs, starts, pad_id=tok.pad_token_id, batch_size=4)
    want = token_stats(model, seqs, starts, pad_id=tok.pad_token_id, batch_size=4)
    assert np.array_equal(got.logprob, want.logprob) and np.array_equal(got.var, want.var)
