"""Scoring, signals and memorization against straightforward per-sample implementations."""
from __future__ import annotations

import copy
import math
import zlib

import numpy as np
import pytest
import torch

from attacks.memorization import greedy_generate, match_metrics, secret_hits
from attacks.mia import SIGNALS, SignalInputs
from attacks.scoring import TokenStats, token_stats
from kdaudit.data.template import encode_prompt, encode_record

RTOL = 1e-4


def per_sample_stats(model, ids: list[int], start: int):
    """float64, one unpadded sequence at a time: (logprob, mean, var) of tokens ids[start:]."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([ids])).logits[0].double()
    lp, mu, var = [], [], []
    for t in range(start, len(ids)):
        logp = torch.log_softmax(logits[t - 1], -1)
        p = logp.exp()
        lp.append(logp[ids[t]].item())
        mean = float((p * logp).sum())
        mu.append(mean)
        var.append(float((p * logp ** 2).sum()) - mean ** 2)
    return np.array(lp), np.array(mu), np.array(var)


@pytest.fixture(scope="module")
def scored(tiny_lm):
    model, tok, records, _ = tiny_lm
    recs = records[:24]
    enc = [encode_record(r, tok, 160) for r in recs]
    stats = token_stats(model, [e.input_ids for e in enc], [e.response_start for e in enc],
                        pad_id=tok.pad_token_id, batch_size=7)
    reference = [per_sample_stats(model, e.input_ids, e.response_start) for e in enc]
    return recs, enc, stats, reference


def test_token_stats_match_per_sample_float64(scored):
    _, _, stats, reference = scored
    for got_lp, got_mu, got_var, (lp, mu, var) in zip(stats.split(stats.logprob),
                                                      stats.split(stats.mean),
                                                      stats.split(stats.var), reference):
        np.testing.assert_allclose(got_lp, lp, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(got_mu, mu, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=RTOL, atol=1e-6)


def test_padding_and_batch_size_do_not_change_stats(tiny_lm, scored):
    model, tok, _, _ = tiny_lm
    _, enc, stats, _ = scored
    one = token_stats(model, [e.input_ids for e in enc], [e.response_start for e in enc],
                      pad_id=tok.pad_token_id, batch_size=1)
    np.testing.assert_allclose(one.logprob, stats.logprob, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(one.offsets, stats.offsets)


def _lowest_k(values, k=0.2):
    v = sorted(values)
    return sum(v[:max(1, math.floor(k * len(v)))]) / max(1, math.floor(k * len(v)))


def test_signals_match_per_sample_definitions(tiny_lm, scored):
    model, tok, _, _ = tiny_lm
    recs, enc, stats, reference = scored
    # an independent "base" model: same architecture, other initialisation
    from kdaudit.models import build_zoo_model

    base = build_zoo_model("gpt2-smoke-teacher", tok, seed=123).eval()
    base_stats = token_stats(base, [e.input_ids for e in enc], [e.response_start for e in enc],
                             pad_id=tok.pad_token_id, batch_size=5)
    base_ref = [per_sample_stats(base, e.input_ids, e.response_start) for e in enc]
    texts = [r.response for r in recs]
    inputs = SignalInputs(stats=stats, texts=texts, references={"ref_base": base_stats})

    expected = {"loss": [], "zlib": [], "mink": [], "minkpp": [], "ref_base": []}
    for (lp, mu, var), (blp, _, _), text in zip(reference, base_ref, texts):
        nll = -lp.mean()
        expected["loss"].append(-nll)
        expected["zlib"].append(-nll / len(zlib.compress(text.encode("utf-8"))))
        expected["mink"].append(_lowest_k(list(lp)))
        expected["minkpp"].append(_lowest_k([(a - b) / math.sqrt(c)
                                             for a, b, c in zip(lp, mu, var)]))
        expected["ref_base"].append(-(nll - (-blp.mean())))
    for name, want in expected.items():
        np.testing.assert_allclose(SIGNALS[name](inputs), want, rtol=RTOL, err_msg=name)

    # different tokenizers: compare total NLL per UTF-8 byte of the response instead
    inputs.reference_per_byte["ref_base"] = True
    want = [-((-lp.sum()) - (-blp.sum())) / len(t.encode("utf-8"))
            for (lp, _, _), (blp, _, _), t in zip(reference, base_ref, texts)]
    np.testing.assert_allclose(SIGNALS["ref_base"](inputs), want, rtol=RTOL)


def test_signal_reports_what_it_misses(scored):
    _, _, stats, _ = scored
    inputs = SignalInputs(stats=stats, texts=None)
    assert SIGNALS["loss"].missing(inputs) == []
    assert "reference model 'ref_base'" in SIGNALS["ref_base"].missing(inputs)
    with pytest.raises(ValueError, match="ref_base"):
        SIGNALS["ref_base"](inputs)
    with pytest.raises(ValueError, match="response texts"):
        SIGNALS["zlib"](inputs)


def test_token_stats_rejects_unscorable_sequences(tiny_lm):
    model, tok, _, _ = tiny_lm
    with pytest.raises(ValueError, match="sequence 1"):
        token_stats(model, [[1, 2, 3], [4, 5]], [1, 2], pad_id=0)


def test_token_stats_roundtrip_and_subset(tmp_path, scored):
    _, _, stats, _ = scored
    stats.save(tmp_path / "s.npz")
    back = TokenStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.logprob, stats.logprob)
    sub = stats.subset([3, 1])
    np.testing.assert_array_equal(sub.nll(), stats.nll()[[3, 1]])


def test_match_metrics_position_by_position():
    refs = [[1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 0]]
    gens = [[1, 2, 9, 4], [5, 6, 7, 8, 9, 10], [2]]
    m = match_metrics(gens, refs, n=4)
    np.testing.assert_allclose(m["match_rate"], [3 / 4, 1.0, 0.0])
    np.testing.assert_array_equal(m["longest_prefix"], [2, 4, 0])
    np.testing.assert_array_equal(m["fully_extracted"], [False, True, False])
    with pytest.raises(ValueError, match="empty"):
        match_metrics([[1]], [[]])


def test_secret_hits():
    hits = secret_hits(["call 555-1234 now", "nothing here"], [["555-1234"], ["Jane Doe"]])
    assert hits.tolist() == [True, False]


def test_greedy_generate_matches_unbatched_argmax(tiny_lm):
    model, tok, records, _ = tiny_lm
    prompts = [encode_prompt(r, tok, 120) for r in records[:6]]
    got = greedy_generate(model, prompts, max_new_tokens=8, pad_id=tok.pad_token_id,
                          eos_id=tok.eos_token_id, batch_size=4)
    for prompt, gen in zip(prompts, got):
        ids = list(prompt)
        want = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                want.append(nxt)
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        assert gen == want


def test_sampled_generations_are_ranked_by_own_likelihood(tiny_lm):
    from attacks.memorization import sample_generate

    model, tok, records, _ = tiny_lm
    prompts = [encode_prompt(r, tok, 120) for r in records[:3]]
    out = sample_generate(model, prompts, n=3, max_new_tokens=6, pad_id=tok.pad_token_id,
                          eos_id=tok.eos_token_id, batch_size=2, seed=0)
    assert [len(c) for c in out] == [3, 3, 3]
    for prompt, cands in zip(prompts, out):
        assert [c[1] for c in cands] == sorted((c[1] for c in cands), reverse=True)
        toks, mean_logp = cands[0]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(prompt) + toks])).logits[0]
        lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(
            1, torch.tensor(toks)[:, None]).mean().item()
        assert mean_logp == pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("preset", ["gpt2-smoke-teacher", "opt-smoke-teacher",
                                    "llama-smoke-teacher"])
def test_the_head_runs_on_scored_positions_only_and_matches_the_full_logits(tiny_lm, preset):
    """The fast path (body, then the LM head on the scored rows) is taken for each family,
    and the statistics equal those of the model's own full logits."""
    from attacks.scoring import _checked_split, scored_logits, scoring_batches
    from kdaudit.models import build_zoo_model

    _, tok, records, _ = tiny_lm
    model = build_zoo_model(preset, tok, seed=1).eval()
    enc = [encode_record(r, tok, 120) for r in records[:10]]
    ids, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    batch = scoring_batches(ids, starts, tok.pad_token_id, 4, "cpu")[-1]
    with torch.no_grad():
        split, first = _checked_split(model, batch)
        assert split is not None
        fast, full = scored_logits(model, batch, split), scored_logits(model, batch, None)
    assert fast.shape == (int(batch.score[:, 1:].sum()), len(tok))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert first is not None and torch.equal(first, fast)


def test_a_model_that_rescales_its_logits_is_scored_from_its_own_logits(tiny_lm, scored):
    """Negative control: logits the head alone does not give (here ×0.5, as a temperature or
    softcap would) must not take the fast path."""
    model, tok, _, _ = tiny_lm
    recs, enc, stats, _ = scored

    class Rescaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.base_model = inner, inner.base_model

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = out.logits * 0.5
            return out

    ids, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    got = token_stats(Rescaled(model), ids, starts, pad_id=tok.pad_token_id, batch_size=7)
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([i])).logits[0, s - 1:-1] * 0.5
                  for i, s in zip(ids, starts)]
    want = torch.cat([torch.log_softmax(lg, -1).gather(1, torch.tensor(i[s:])[:, None])[:, 0]
                      for lg, i, s in zip(logits, ids, starts)])
    np.testing.assert_allclose(got.logprob, want.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(got.logprob - stats.logprob).max() > 0.01


def test_token_budget_batches(tiny_lm, scored):
    """A token budget caps each batch's padded size (a longer sequence goes alone) and does
    not change the statistics."""
    from attacks.scoring import scoring_batches

    model, tok, _, _ = tiny_lm
    _, enc, stats, _ = scored
    ids, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    budget = 2 * max(map(len, ids)) - 1
    batches = scoring_batches(ids, starts, tok.pad_token_id, 64, "cpu", max_tokens=budget)
    assert all(b.ids.numel() <= budget or len(b.idx) == 1 for b in batches)
    assert sorted(i for b in batches for i in b.idx) == list(range(len(ids)))
    assert len(batches) > len(ids) // 64 + 1
    capped = token_stats(model, ids, starts, pad_id=tok.pad_token_id, batch_size=64,
                         max_tokens=budget)
    np.testing.assert_allclose(capped.logprob, stats.logprob, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(capped.offsets, stats.offsets)


def test_token_statistics_of_masked_vocabulary_are_finite_and_exact():
    """A −inf logit (a token the model masks) has q = 0: it adds nothing to μ or σ² and
    makes nothing nan; very negative finite logits alike."""
    from attacks.scoring import stats_of_logits

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 4
    logits[:, 3] = -float("inf")
    logits[1, 7] = -1e30
    target = torch.tensor([0, 1, 2, 4, 5, 6])
    lp, mu, var = stats_of_logits(logits, target, torch.float32, chunk=4)
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    want_mu = torch.special.xlogy(p, p).sum(-1)
    want_var = (p * torch.where(p > 0, logp - want_mu[:, None], 0.0) ** 2).sum(-1)
    assert torch.isfinite(mu).all() and torch.isfinite(var).all()
    torch.testing.assert_close(lp.double(), logp.gather(1, target[:, None])[:, 0])
    torch.testing.assert_close(mu.double(), want_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-5)
