"""The six KD techniques: each draws the data its definition says and optimises its objective."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attacks.memorization import greedy_generate
from kdaudit.config import KDConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, encode_text, format_text
from kdaudit.models import build_zoo_model, load_model, train_tokenizer
from kdaudit.train import loop, objectives, sources
from kdaudit.train.batching import collate
from kdaudit.train.config import KDParams
from kdaudit.train.methods import METHODS, lm_term, method_params, minillm_loss, \
    minillm_returns, whiten
from kdaudit.train.sampling import sample_responses
from kdaudit.train.sources import AdaptiveSchedule, BatchSource, fresh_share

KD_METHODS = ["kd", "seqkd", "imitkd", "gkd", "minillm", "distillm"]


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(200, seed=21)], 300)
    examples = [encode_record(r, tok, 80) for r in generate_records(24, seed=22)]
    validation = [encode_record(r, tok, 80) for r in generate_records(8, seed=23)]
    return tok, examples, validation


@pytest.fixture(scope="module")
def lm_corpus(setup):
    tok = setup[0]
    return [encode_text(format_text(r), tok, 80) for r in generate_records(30, seed=24)]


def _params(method: str, **kd) -> KDParams:
    return method_params(METHODS[method], KDConfig(**{"max_new_tokens": 8, **kd}))


# -- sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_greedy_sampling_with_kv_cache_matches_generate(tiny_lm, family):
    model, tok, records, _ = tiny_lm
    if family != "gpt2":
        model = build_zoo_model(f"{family}-smoke-teacher", tok, seed=3)
    prompts = [encode_record(r, tok, 64).input_ids[:12 + 3 * i] for i, r in
               enumerate(records[:5])]
    expected = greedy_generate(model, prompts, max_new_tokens=10, pad_id=tok.pad_token_id,
                               eos_id=tok.eos_token_id)
    got = sample_responses(model, prompts, max_new_tokens=10, pad_id=tok.pad_token_id,
                           eos_id=tok.eos_token_id, temperature=0)
    assert [s.tokens for s in got] == expected


def test_sampled_log_probs_are_the_models_own(tiny_lm):
    model, tok, records, _ = tiny_lm
    teacher = build_zoo_model("gpt2-smoke-student", tok, seed=5).eval()
    prompts = [encode_record(r, tok, 64).input_ids[:20] for r in records[:3]]
    samples = sample_responses(model, prompts, max_new_tokens=6, pad_id=tok.pad_token_id,
                               eos_id=tok.eos_token_id, teacher=teacher, teacher_mix=0.2,
                               generator=torch.Generator().manual_seed(0))
    for p, s in zip(prompts, samples):
        ids = torch.tensor([p + s.tokens])
        for m, logged in ((model, s.student_logprob), (teacher, s.teacher_logprob)):
            lp = torch.log_softmax(m(ids).logits[0, len(p) - 1:-1].float(), -1)
            direct = lp.gather(-1, torch.tensor(s.tokens)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(logged), direct, rtol=1e-4, atol=1e-4)


# -- objectives on fixed logits ---------------------------------------------------------------
def _fixed_batch(vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 6, vocab, generator=g, dtype=torch.float64)
    t = torch.randn(3, 6, vocab, generator=g, dtype=torch.float64)
    ids = torch.randint(vocab, (3, 6), generator=g)
    target = torch.zeros(3, 6, dtype=torch.bool)
    target[0, 2:] = True
    target[1, 3:5] = True
    target[2, 1:] = True
    from kdaudit.train.batching import Batch

    return s, t, Batch(ids, torch.ones_like(ids), target)


def _brute(fn, s, t, batch):
    """Mean over response positions of a per-position divergence of the shifted logits."""
    vals = []
    for b in range(s.shape[0]):
        for pos in range(1, s.shape[1]):
            if batch.target_mask[b, pos]:
                p = torch.softmax(t[b, pos - 1], -1)
                q = torch.softmax(s[b, pos - 1], -1)
                vals.append(fn(p, q))
    return torch.stack(vals).mean()


def _kl(a, b):
    return (a * (a.log() - b.log())).sum()


@pytest.mark.parametrize("method,fn", [
    ("kd", lambda p, q: _kl(p, q)),
    ("imitkd", lambda p, q: _kl(p, q)),
    ("gkd", lambda p, q: 0.1 * _kl(p, 0.1 * p + 0.9 * q) + 0.9 * _kl(q, 0.1 * p + 0.9 * q)),
    ("distillm", lambda p, q: _kl(q, 0.9 * p + 0.1 * q)),
])
def test_each_objective_matches_its_definition(method, fn):
    s, t, batch = _fixed_batch()
    loss, parts = METHODS[method].loss(s, t, batch, _params(method))
    expected = _brute(fn, s, t, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
    assert parts["objective"] == pytest.approx(expected.item(), rel=1e-6)


def test_recipe_defaults_per_method_and_family():
    """The paper's scripts: kd_ratio ½ for LLaMA kd / seqkd; the LM term where a script passes
    --lm-data-dir; DistiLLM's threshold 0.2 on LLaMA; MiniLLM's pt term half teacher CE."""
    lm = {fam: sorted(m for m in KD_METHODS
                      if method_params(METHODS[m], KDConfig(), fam).lm_coef == 1.0)
          for fam in ("gpt2", "opt", "llama")}
    assert lm == {"gpt2": ["distillm", "imitkd", "minillm"], "opt": sorted(KD_METHODS),
                  "llama": ["distillm", "gkd", "imitkd", "minillm"]}
    assert method_params(METHODS["kd"], KDConfig(), "llama").kd_ratio == 0.5
    assert method_params(METHODS["imitkd"], KDConfig(), "llama").kd_ratio == 1.0
    assert method_params(METHODS["kd"], KDConfig(), "gpt2").kd_ratio == 1.0
    assert method_params(METHODS["kd"], KDConfig(kd_ratio=0.3), "llama").kd_ratio == 0.3
    assert method_params(METHODS["distillm"], KDConfig(), "llama").distillm_init_prob == 0.2
    assert method_params(METHODS["distillm"], KDConfig(), "opt").distillm_init_prob == 0.0
    assert method_params(METHODS["gkd"], KDConfig()).on_policy_fraction == 0.5
    assert method_params(METHODS["imitkd"], KDConfig()).on_policy_fraction == 1.0
    assert method_params(METHODS["kd"]).on_policy_fraction == 0.0
    paper = method_params(METHODS["minillm"], KDConfig())
    assert (paper.lm_kd_ratio, paper.replay_size, paper.minillm_rollouts,
            paper.minillm_ppo_epochs, paper.minillm_reward_scaling, paper.minillm_reward_clip,
            paper.minillm_whiten, paper.max_new_tokens) == (0.5, 1000, 256, 4, 0.5, 100, True, 256)
    plain = method_params(METHODS["minillm"], KDConfig(recipe="loss_only"), "opt")
    assert (plain.lm_coef, plain.replay_size, plain.minillm_rollouts, plain.minillm_ppo_epochs,
            plain.minillm_reward_scaling, plain.minillm_reward_clip, plain.minillm_whiten) == \
        (0.0, 0, 0, 1, 1.0, 0.0, False)
    assert method_params(METHODS["imitkd"], KDConfig(recipe="loss_only",
                                                     lm_coef=0.5)).lm_coef == 0.5
    assert not method_params(METHODS["kd"]).per_sequence


def test_minillm_returns_include_the_current_reward_and_are_length_normalised():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    g = 0.5
    got = minillm_returns(r, m, g)[0]
    assert got[1].item() == pytest.approx((1 + g * 2 + g * g * 3) / 3)   # 3 tokens from t on
    assert got[2].item() == pytest.approx((2 + g * 3) / 2)
    assert got[3].item() == pytest.approx(3 / 1)
    assert got[0].item() == 0 and got[4].item() == 0


def test_whitening_counts_the_empty_cells_of_the_rollout_grid():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # grid of 2 × 4 cells: 1, 2, 3 and five zeros; mean 6/8, unbiased variance over 8 cells
    cells = torch.tensor([1.0, 2.0, 3.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    var, mean = torch.var_mean(cells)
    got = whiten(x, m, width=4)
    torch.testing.assert_close(got[m.bool()], (x[m.bool()] - mean) / torch.sqrt(var + 1e-8))
    assert got[~m.bool()].abs().sum() == 0


def _lmops_loss(s, t, batch, params):
    """LMOps's MiniLLM `ppo_loss` transcribed token by token in its own layout: a rollout grid
    of `max_new_tokens` cells per row, rewards (log p − log q_old) / scaling clipped, returns
    summed backwards from each token and divided by the tokens left, whitened over the whole
    grid with torch.var_mean, ratio·w clipped, plus the unweighted KL(q ‖ p) regulariser."""
    a, c, gamma = params.teacher_mix_alpha, params.minillm_clip, params.minillm_discount
    width = params.max_new_tokens
    lq_old, lp_old = batch.extras["student_logprob"], batch.extras["teacher_logprob"]
    rows = s.shape[0]
    pos = [[i for i in range(1, s.shape[1]) if batch.target_mask[b, i]] for b in range(rows)]
    rewards = torch.zeros(rows, width, dtype=torch.float64)
    mask = torch.zeros(rows, width, dtype=torch.float64)
    for b in range(rows):
        for j, i in enumerate(pos[b]):
            r = (float(lp_old[b, i]) - float(lq_old[b, i])) / params.minillm_reward_scaling
            rewards[b, j] = max(-params.minillm_reward_clip, min(params.minillm_reward_clip, r))
            mask[b, j] = 1.0
    returns = torch.zeros(rows, width, dtype=torch.float64)
    for b in range(rows):
        last = 0.0
        for j in reversed(range(width)):
            last = float(rewards[b, j]) + gamma * last
            left = float(mask[b, j:].sum()) if mask[b, j] else 1.0
            returns[b, j] = last / max(left, 1.0)
    var, mean = torch.var_mean(returns)
    adv = (returns - mean) * torch.rsqrt(var + 1e-8)
    pg_terms, reg_terms = [], []
    for b in range(rows):
        for j, i in enumerate(pos[b]):
            q = torch.log_softmax(s[b, i - 1], -1)
            p = torch.log_softmax(t[b, i - 1], -1)
            y = batch.input_ids[b, i]
            w = math.exp(lq_old[b, i]) / ((1 - a) * math.exp(lq_old[b, i])
                                          + a * math.exp(lp_old[b, i]))
            ratio = torch.exp(q[y] - lq_old[b, i]) * w
            pg_terms.append(torch.maximum(-adv[b, j] * ratio,
                                          -adv[b, j] * ratio.clamp(1 - c, 1 + c)))
            xent = -(q.exp() * p).sum()
            ent = -(q.exp() * q).sum()
            reg_terms.append(xent - ent)
    n = len(pg_terms)
    return torch.stack(pg_terms).sum() / n + torch.stack(reg_terms).sum() / n


def test_minillm_loss_and_gradient_equal_the_lmops_transcription():
    s, t, batch = _fixed_batch(vocab=5, seed=3)
    g = torch.Generator().manual_seed(9)
    # sampling-time log probs off the current ones so that w·ρ leaves [0.8, 1.2]: the clip bites
    lq_now = torch.log_softmax(s, -1)[:, :-1].gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    old = torch.zeros_like(batch.input_ids, dtype=torch.float64)
    old[:, 1:] = lq_now + 0.4 * torch.randn(lq_now.shape, generator=g, dtype=torch.float64)
    lp = torch.zeros_like(old)
    lp[:, 1:] = torch.log_softmax(t, -1)[:, :-1].gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    batch.extras = {"student_logprob": old, "teacher_logprob": lp}
    params = _params("minillm", minillm_reward_clip=0.9)   # a reward clip that bites too
    assert ((lp - old).abs()[batch.target_mask] / 0.5 > 0.9).any()
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    loss, parts = minillm_loss(s1, t, batch, params)
    ref = _lmops_loss(s2, t, batch, params)
    assert parts["clipped"] > 0.2
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-9)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-9)


def test_lm_term_is_ce_or_half_teacher_cross_entropy():
    s, t, batch = _fixed_batch(vocab=6, seed=4)
    y, m = batch.input_ids[:, 1:], batch.target_mask[:, 1:]
    lq = torch.log_softmax(s[:, :-1], -1)
    p = torch.softmax(t[:, :-1], -1)
    ce = -lq.gather(-1, y[..., None])[..., 0][m].mean()
    soft = -(p * lq).sum(-1)[m].mean()
    got, _ = lm_term(s, t, batch, _params("imitkd"))
    torch.testing.assert_close(got.double(), ce, rtol=1e-5, atol=1e-7)
    got, parts = lm_term(s, t, batch, _params("minillm"))      # lm_kd_ratio ½
    torch.testing.assert_close(got.double(), 0.5 * ce + 0.5 * soft, rtol=1e-5, atol=1e-7)


# -- DistiLLM's schedule ----------------------------------------------------------------------
def test_adaptive_schedule_rises_exactly_at_loss_eps_and_caps_at_one():
    s = AdaptiveSchedule(init=0.0, eps=0.1)
    assert not s.update(2.0) and s.prob == 0.0           # first value: the reference
    assert not s.update(2.0999) and s.prob == 0.0         # below eps
    assert not s.update(1.5) and s.prob == 0.0            # lower: no rise, reference kept
    assert s.update(2.1) and s.prob == pytest.approx(0.1)  # exactly eps above the reference
    assert not s.update(2.15) and s.prob == pytest.approx(0.1)  # reference is now 2.1
    for k in range(20):
        s.update(2.2 + 0.1 * k)
    assert s.prob == 1.0
    top = AdaptiveSchedule(init=0.95, eps=0.1)
    top.update(0.0)
    assert top.update(0.2) and top.prob == 1.0


def test_fresh_share_follows_the_replay_schedule():
    assert fresh_share(0.5, 10, 40, "decreasing") == pytest.approx(0.375)
    assert fresh_share(0.5, 10, 40, "constant") == pytest.approx(0.25)
    assert fresh_share(0.5, 10, 40, "increasing") == pytest.approx(0.125)


class _Draws:
    """A batch source's rng with scripted uniform draws (`random`), the rest real."""

    def __init__(self, values):
        self.values, self.real = list(values), __import__("random").Random(0)

    def random(self):
        return self.values.pop(0)

    def sample(self, population, k):
        return self.real.sample(population, k)


def _scripted_source(setup, method, draws, **kd):
    tok, examples, validation = setup
    src = BatchSource(METHODS[method], examples, _params(method, **kd), pad_id=tok.pad_token_id,
                      eos_id=tok.eos_token_id, seed=0, max_length=80, batch_size=2,
                      total_steps=10, validation=validation)
    src.rng = _Draws(draws)
    made = []

    def fake_sample(chosen, model, teacher=None, mix=0.0):
        rows = [type(e)(e.input_ids[:e.response_start] + [7, len(made)], e.response_start)
                for e in chosen]
        made.extend(rows)
        return rows, None

    src._sample = fake_sample
    return src, made


def _rows(batch):
    return [tuple(r[m].tolist()) for r, m in zip(batch.input_ids, batch.target_mask)]


def test_distillm_decision_table(setup):
    """θ 0.6, buffer of 4, T 10: fresh while filling; then fresh below θ(1 − step/T), replay
    up to θ, ground truth above."""
    src, made = _scripted_source(setup, "distillm", [0.5, 0.5, 0.3, 0.1, 0.7],
                                 replay_size=4)
    src.schedule.prob = 0.6
    truth = {tuple(e.input_ids[e.response_start:]) for e in setup[1]}
    b, o = src.next_batch(0, [0, 1], None, None)        # filling: fresh, into the buffer
    assert o == {"generated": 2} and len(src.buffer) == 2
    b, o = src.next_batch(1, [2, 3], None, None)
    assert o == {"generated": 2} and len(src.buffer) == 4
    b, o = src.next_batch(5, [4, 5], None, None)        # share 0.6·(1 − 6/10) = 0.24 ≤ 0.3
    assert o == {"generated": 0, "replayed": 2} and len(made) == 4
    assert set(_rows(b)) <= {tuple(e.input_ids[e.response_start:]) for e in src.buffer}
    b, o = src.next_batch(5, [6, 7], None, None)        # 0.1 < 0.24: fresh, oldest dropped
    assert o == {"generated": 2} and src.buffer == made[2:]
    b, o = src.next_batch(5, [8, 9], None, None)        # 0.7 ≥ θ: ground truth
    assert o == {"generated": 0} and set(_rows(b)) <= truth


def test_imitkd_and_gkd_train_on_a_draw_from_the_buffer(setup):
    src, made = _scripted_source(setup, "gkd", [0.4, 0.6, 0.2])
    b, o = src.next_batch(0, [0, 1], None, None)        # 0.4 < ½: generate, push, draw
    assert o == {"generated": 2, "replayed": 2} and len(src.buffer) == 2
    b, o = src.next_batch(1, [2, 3], None, None)        # 0.6 ≥ ½: ground truth
    assert o == {"generated": 0}
    b, o = src.next_batch(2, [4, 5], None, None)
    assert len(src.buffer) == 4 and len(made) == 4
    assert set(_rows(b)) <= {tuple(e.input_ids[e.response_start:]) for e in made}
    plain, made = _scripted_source(setup, "imitkd", [0.0], replay_size=0)
    b, o = plain.next_batch(0, [0, 1], None, None)      # no buffer: the fresh rows themselves
    assert o == {"generated": 2} and not plain.buffer and _rows(b) == [
        tuple(e.input_ids[e.response_start:]) for e in made]


def test_distillm_signal_is_the_validation_ce_as_mean_of_batch_means(setup):
    """70 validation rows: batches of 64 and 6, each a token mean, then averaged; the
    reference is taken before training (`prepare`)."""
    tok, examples, _ = setup
    val = [encode_record(r, tok, 80) for r in generate_records(70, seed=25)]
    src = BatchSource(METHODS["distillm"], examples, _params("distillm"),
                      pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=0, max_length=80,
                      validation=val)
    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    means = []
    for chunk in (val[:64], val[64:]):
        batch = collate(chunk, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits
        lq = torch.log_softmax(logits[:, :-1].float(), -1).gather(
            -1, batch.input_ids[:, 1:, None])[..., 0]
        means.append(-lq[batch.target_mask[:, 1:]].mean().item())
    assert src.validation_ce(model) == pytest.approx(sum(means) / 2, rel=1e-5)
    assert src.schedule.reference is None
    src.prepare(model, None)
    assert src.schedule.reference == pytest.approx(sum(means) / 2, rel=1e-5)


# -- each method draws its data ---------------------------------------------------------------
class SamplerSpy:
    def __init__(self, monkeypatch, step_of):
        self.calls = []
        self.step_of = step_of

        def spy(model, prompts, **kw):
            out = sample_responses(model, prompts, **kw)
            self.calls.append({"model": model, "teacher": kw.get("teacher"),
                               "mix": kw.get("teacher_mix", 0.0), "step": step_of[0],
                               "tokens": [s.tokens for s in out]})
            return out

        monkeypatch.setattr(sources, "sample_responses", spy)


def _train(method, setup, tmp_path, monkeypatch, epochs=1.0, lm=(), batch_size=8, **kd):
    tok, examples, validation = setup
    step = [0]
    spy = SamplerSpy(monkeypatch, step)
    seen = []
    real_collate = sources.collate

    def spy_collate(rows, pad_id, extras=None):
        seen.append((step[0], [list(e.input_ids[e.response_start:]) for e in rows]))
        return real_collate(rows, pad_id, extras)

    monkeypatch.setattr(sources, "collate", spy_collate)
    student = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    teacher = build_zoo_model("gpt2-smoke-teacher", tok, seed=1).eval()

    def count(s, record):
        step[0] = s

    result = loop.train(loop.TrainJob(student, examples, METHODS[method], TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=1e-3), out_dir=tmp_path / method, seed=0,
        pad_id=tok.pad_token_id, teacher=teacher if METHODS[method].needs_teacher else None,
        params=_params(method, **{"lm_coef": 0.0, **kd}), desc=None, callbacks=[count],
        validation=validation, max_length=80, lm_examples=lm))
    return student, teacher, spy.calls, [s for s in seen if s[0] >= 0], result


def test_ground_truth_methods_never_sample(setup, tmp_path, monkeypatch):
    for method in ("nokd", "kd"):
        *_, calls, seen, _ = _train(method, setup, tmp_path, monkeypatch)
        assert calls == []
        truth = {tuple(e.input_ids[e.response_start:]) for e in setup[1]}
        assert all(tuple(r) in truth for _, rows in seen for r in rows)


def test_seqkd_trains_on_teacher_samples_made_before_training(setup, tmp_path, monkeypatch):
    student, teacher, calls, seen, result = _train("seqkd", setup, tmp_path, monkeypatch)
    assert len(calls) == 1 and calls[0]["model"] is teacher and calls[0]["step"] == 0
    written = {tuple(t) for t in calls[0]["tokens"]}
    rows = [tuple(r) for _, rows in seen for r in rows]
    assert rows and all(r in written for r in rows)


def test_imitkd_trains_on_the_students_own_text_every_step(setup, tmp_path, monkeypatch):
    student, teacher, calls, seen, result = _train("imitkd", setup, tmp_path, monkeypatch,
                                                   epochs=2.0)
    steps = sorted({c["step"] for c in calls})
    assert steps == list(range(result.steps))       # a fresh generation at every step
    assert all(c["model"] is student and c["teacher"] is None for c in calls)
    written = {tuple(t) for c in calls for t in c["tokens"]}
    assert all(tuple(r) in written for _, rows in seen for r in rows)
    log = (tmp_path / "imitkd" / "train_log.jsonl").read_text()
    assert '"replayed": 8.0' in log                 # every batch is a draw from the buffer


def test_the_lm_term_adds_lm_coef_times_the_corpus_ce(setup, lm_corpus, tmp_path,
                                                      monkeypatch):
    *_, result = _train("imitkd", setup, tmp_path, monkeypatch, lm=lm_corpus, lm_coef=0.7)
    import json

    log = [json.loads(x) for x in (tmp_path / "imitkd" / "train_log.jsonl").open()]
    assert log and all(r["loss"] == pytest.approx(r["forward_kl"] + 0.7 * r["lm_ce"], rel=1e-5)
                       for r in log)


def test_a_method_with_the_lm_term_needs_a_corpus(setup, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no corpus"):
        _train("distillm", setup, tmp_path, monkeypatch, lm_coef=1.0)


def test_gkd_samples_about_half_of_its_batches(setup, tmp_path, monkeypatch):
    *_, calls, seen, result = _train("gkd", setup, tmp_path, monkeypatch, epochs=8.0)
    share = len({c["step"] for c in calls}) / result.steps
    assert result.steps == 24 and 0.25 <= share <= 0.75


def test_minillm_trains_ppo_epochs_over_each_round_of_mixture_rollouts(setup, tmp_path,
                                                                       monkeypatch):
    """24 prompts, batches of 4 (6 steps), rounds of 8 rollouts × 2 PPO epochs = 4 steps:
    rounds sampled at steps 0 and 4, each rollout trained on once per PPO epoch."""
    student, teacher, calls, seen, result = _train(
        "minillm", setup, tmp_path, monkeypatch, batch_size=4, minillm_rollouts=8,
        minillm_ppo_epochs=2)
    assert result.steps == 6 and [c["step"] for c in calls] == [0, 4]
    assert all(c["model"] is student and c["teacher"] is teacher and c["mix"] == 0.2
               and len(c["tokens"]) == 8 for c in calls)
    first = [r for step, rows in seen if step < 4 for r in rows]
    assert len(first) == 16 and all(first.count(r) % 2 == 0 for r in first)


def test_loss_only_minillm_samples_fresh_rollouts_every_step(setup, tmp_path, monkeypatch):
    """recipe "loss_only": a round is one batch and one PPO epoch, so every step samples."""
    *_, calls, seen, result = _train("minillm", setup, tmp_path, monkeypatch, batch_size=4,
                                     recipe="loss_only")
    assert [c["step"] for c in calls] == list(range(result.steps))
    assert all(len(c["tokens"]) == 4 for c in calls)


def test_distillm_checks_its_validation_ce_after_every_epoch(setup, tmp_path, monkeypatch):
    # a threshold of 1 with an unfilled buffer makes every batch a fresh student batch
    *_, calls, seen, result = _train("distillm", setup, tmp_path, monkeypatch, epochs=2.0,
                                     distillm_init_prob=1.0)
    import json

    log = [json.loads(x) for x in (tmp_path / "distillm" / "train_log.jsonl").open()]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert len({c["step"] for c in calls}) == result.steps


def _resumed_run_matches(setup, tmp_path, method: str, cfg: TrainConfig, params: KDParams,
                         crash_at: int) -> int:
    """Train `method` whole into a/, then crash after step `crash_at` into b/ and resume;
    assert both end on the same weights and return the step b/ resumed from."""
    tok, examples, _ = setup
    teacher = build_zoo_model("gpt2-smoke-teacher", tok, seed=1).eval()
    kw = dict(seed=0, pad_id=tok.pad_token_id, teacher=teacher, run_key="k", desc=None,
              params=params, max_length=80, lm_examples=examples)

    def job(out, callbacks=()):
        return loop.TrainJob(build_zoo_model("gpt2-smoke-student", tok, seed=0), examples,
                             METHODS[method], cfg, out_dir=tmp_path / out,
                             callbacks=callbacks, **kw)

    def crash(step, record):
        if step == crash_at:
            raise KeyboardInterrupt

    loop.train(job("a"))
    with pytest.raises(KeyboardInterrupt):
        loop.train(job("b", [crash]))
    resumed = loop.train(job("b"))
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    return resumed.resumed_from


def test_on_policy_training_resumes_to_the_same_weights(setup, tmp_path):
    """ImitKD with its buffer and LM term: the buffer, the draws and the corpus cursor are
    checkpointed, so a resumed run ends on the same weights."""
    cfg = TrainConfig(epochs=2, batch_size=8, lr=3e-3, checkpoint_every=2)
    assert _resumed_run_matches(setup, tmp_path, "imitkd", cfg, _params("imitkd"), 5) == 4


def test_minillm_resumes_mid_round_to_the_same_weights(setup, tmp_path):
    """The round's rollouts, the queue of PPO batches and the cursors are checkpointed."""
    cfg = TrainConfig(epochs=1, batch_size=4, lr=3e-3, checkpoint_every=3)
    params = _params("minillm", minillm_rollouts=8, minillm_ppo_epochs=2)
    assert _resumed_run_matches(setup, tmp_path, "minillm", cfg, params, 4) == 3


def test_adaptive_method_needs_validation(setup):
    tok, examples, _ = setup
    with pytest.raises(ValueError, match="validation"):
        BatchSource(METHODS["distillm"], examples, _params("distillm"), pad_id=0, eos_id=1,
                    seed=0, max_length=80)


class _Tracking(KDParams):
    """Method parameters that remember which of their fields were read (`read`)."""

    def __getattribute__(self, name):
        if name in KDParams.__dataclass_fields__:
            object.__getattribute__(self, "read").add(name)
        return object.__getattribute__(self, name)

    @property
    def read(self) -> set[str]:
        return self.__dict__.setdefault("_read", set())


@pytest.mark.parametrize("method", [*KD_METHODS, "nokd", "distildp"])
def test_a_method_reads_only_the_kd_fields_it_declares(setup, tmp_path, method):
    """What a run hashes for a method (`kd_fields`) covers every KD field its loss and data
    source read; DistiLLM starts at probability 1 so that its sampling path runs too."""
    from dataclasses import fields

    tok, examples, validation = setup
    spec = METHODS[method]
    kd = KDConfig(max_new_tokens=8, eval_every=2, distillm_init_prob=1.0, minillm_rollouts=8,
                  hidden_weight=0.5 if spec.hidden else 0.0)
    params = _Tracking(**dataclasses.asdict(method_params(spec, kd)))
    loop.train(loop.TrainJob(
        build_zoo_model("gpt2-smoke-student", tok, seed=0), examples[:16], spec,
        TrainConfig(epochs=2, batch_size=8, checkpoint_every=0), out_dir=tmp_path / "m",
        seed=0, pad_id=tok.pad_token_id, params=params, desc=None, max_length=80,
        teacher=build_zoo_model("gpt2-smoke-teacher", tok, seed=1).eval()
        if spec.needs_teacher else None,
        validation=validation if spec.adaptive else (), lm_examples=examples))
    kd_names = {f.name for f in fields(KDConfig)}
    assert params.read & kd_names <= set(spec.kd_fields)
    assert bool(params.read & kd_names) == (method != "nokd")   # the tracking sees reads


def test_a_distillm_knob_is_in_distillm_stage_inputs_only():
    changed = KDConfig(skew_alpha=0.3, loss_eps=0.2)
    moved = [name for name, m in METHODS.items()
             if m.kd_inputs(KDConfig()) != m.kd_inputs(changed)]
    assert moved == ["distillm"]
    assert METHODS["kd"].kd_inputs(KDConfig(kd_ratio=0.5)) != METHODS["kd"].kd_inputs(KDConfig())
