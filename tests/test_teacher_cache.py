"""The teacher cache of off-policy KD: exact when it keeps every log-probability, close when it
keeps the top k, and the teacher runs only until every example is cached. With the cache, kd
and seqkd compute their loss on the response positions alone (the student's LM head too): the
same loss as on the whole grid, up to the order of float sums."""
from __future__ import annotations

import pytest
import torch

from kdaudit.config import ConfigError, KDConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.train import loop
from kdaudit.train.batching import Batch, collate
from kdaudit.train.methods import METHODS, ResponseRows, kd_loss, kd_rows_loss, \
    method_params, shifted
from kdaudit.train.objectives import forward_kl
from kdaudit.train.teacher_cache import TeacherCache

EPOCHS = 3


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(200, seed=31)], 300)
    examples = [encode_record(r, tok, 80) for r in generate_records(24, seed=32)]
    teacher = build_zoo_model("gpt2-smoke-teacher", tok, seed=1).eval()
    return tok, examples, teacher


def _train(setup, tmp_path, method: str, topk: int, heads: list | None = None,
           student=None):
    """Per-step records and the number of teacher forward passes of a short run; `heads`
    collects the number of positions the student's LM head ran on, call by call."""
    tok, examples, teacher = setup
    calls, steps = [], []
    student = student or build_zoo_model("gpt2-smoke-student", tok, seed=2)
    handle = teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    spy = student.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: heads.append(args[0].shape[:-1].numel())) if heads is not None \
        else None
    try:
        job = loop.TrainJob(
            student, examples, METHODS[method],
            TrainConfig(epochs=EPOCHS, batch_size=8, lr=1e-3, checkpoint_every=0),
            tmp_path / f"{method}-{topk}", seed=0, pad_id=tok.pad_token_id, teacher=teacher,
            params=method_params(METHODS[method], KDConfig(teacher_cache_topk=topk,
                                                           max_new_tokens=8, lm_coef=0.0)),
            desc=None, callbacks=[lambda step, rec: steps.append(rec)])
        loop.train(job)
    finally:
        handle.remove()
        if spy is not None:
            spy.remove()
    return steps, len(calls)


def test_a_cache_of_every_log_probability_trains_exactly_as_without(setup, tmp_path):
    plain, plain_calls = _train(setup, tmp_path, "kd", 0)
    cached, cached_calls = _train(setup, tmp_path, "kd", 10 ** 6)
    assert len(plain) == len(cached) == plain_calls == 3 * EPOCHS
    assert cached_calls == 3                       # the first epoch only
    for a, b in zip(plain, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["forward_kl"] == pytest.approx(a["forward_kl"], rel=1e-5, abs=1e-6)


def test_top_k_keeps_the_teachers_largest_probabilities_and_the_tail_mass(tiny_lm):
    """Rebuilt: the k kept log-probabilities exactly, the rest of the mass spread evenly. The
    KD loss moves less as k grows, and not at all with every token kept. (How far it moves
    depends on the teacher's tail mass: benchmarks/perf/bench_teacher_cache.py reports it on
    the tiny teacher.)"""
    teacher, tok, records, _ = tiny_lm
    batch = collate([encode_record(r, tok, 120) for r in records[:8]], tok.pad_token_id)
    idx = list(range(8))
    with torch.no_grad():
        full = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    mask = batch.target_mask[:, 1:].bool()
    want = torch.log_softmax(full[:, :-1][mask], -1)
    student = torch.randn_like(full)
    s, _, m = shifted(student, batch)
    exact = forward_kl(s, full[:, :-1], m)
    moved = {}
    for k in (1, 8, 64, len(tok)):
        cache = TeacherCache(k)
        rebuilt = cache.logits(batch, idx, lambda: full)
        got = torch.log_softmax(rebuilt[:, :-1][mask], -1)
        top = want.topk(min(k, len(tok)), -1)
        torch.testing.assert_close(got.gather(1, top.indices), top.values, rtol=0, atol=1e-5)
        assert torch.allclose(got.exp().sum(-1), torch.ones(len(got)), atol=1e-5)
        again = cache.logits(batch, idx, lambda: pytest.fail("the teacher ran again"))
        assert torch.equal(again[:, :-1][mask], rebuilt[:, :-1][mask])   # the rows read
        moved[k] = abs(float(forward_kl(s, rebuilt[:, :-1], m) - exact)) / float(exact)
    assert moved[1] > moved[8] > moved[64] > 1e-3 > 1e-5 > moved[len(tok)]


def test_the_cache_is_for_off_policy_methods_only(setup, tmp_path):
    """ImitKD's batches are the student's own samples: the teacher runs every step."""
    _, imit_calls = _train(setup, tmp_path, "imitkd", 64)
    assert imit_calls == 3 * EPOCHS


def test_teacher_cache_topk_is_checked():
    with pytest.raises(ConfigError, match="teacher_cache_topk: expected an integer ≥ 0"):
        KDConfig(teacher_cache_topk=-1)


def test_the_cache_retrains_only_when_on_and_only_off_policy_methods():
    """At 0 the stage inputs and the suite fingerprint are those of runs made before the
    option existed (finished runs stay finished); on, it retrains kd but not imitkd."""
    import dataclasses

    from kdaudit.benchmark import _fingerprint
    from kdaudit.config import load_config
    from kdaudit.store import stable_hash

    off, on = KDConfig(), KDConfig(teacher_cache_topk=64)
    assert "teacher_cache_topk" not in METHODS["kd"].kd_inputs(off)
    assert METHODS["kd"].kd_inputs(on)["teacher_cache_topk"] == 64
    assert METHODS["imitkd"].kd_inputs(on) == METHODS["imitkd"].kd_inputs(off)
    cfg = load_config("smoke")
    before = cfg.to_dict()
    del before["kd"]["teacher_cache_topk"]
    assert _fingerprint(cfg) == stable_hash(before)
    assert _fingerprint(dataclasses.replace(cfg, kd=on)) != _fingerprint(cfg)


def test_the_cached_rows_are_the_rebuilt_logits_rows(tiny_lm):
    teacher, tok, records, _ = tiny_lm
    batch = collate([encode_record(r, tok, 120) for r in records[:6]], tok.pad_token_id)
    with torch.no_grad():
        full = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    mask = batch.target_mask[:, 1:].bool()
    for k in (8, len(tok)):
        cache = TeacherCache(k)
        rows = cache.rows(batch, list(range(6)), lambda: full)
        assert torch.equal(rows, cache.logits(batch, list(range(6)), None)[:, :-1][mask])


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_kd_loss_on_response_rows_is_the_whole_grid_s(per_sequence, temperature):
    """Value and gradient; the sequences' response lengths differ and one has none, so a
    per-sequence mean taken over tokens, or over the sequences that have some, fails."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 12), generator=gen)
    target = torch.zeros(4, 12, dtype=torch.bool)
    target[0, 3:], target[1, 9:], target[3, 5:8] = True, True, True      # row 2: none
    batch = Batch(ids, torch.ones_like(ids), target)
    params = method_params(METHODS["kd"], KDConfig(temperature=temperature, kd_ratio=0.3))
    params = type(params)(**{**params.__dict__, "per_sequence": per_sequence})
    student = torch.randn(4, 12, 50, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 12, 50, generator=gen)
    loss, parts = kd_loss(student, teacher, batch, params)
    loss.backward()
    mask = target[:, 1:]
    rows = student.detach()[:, :-1][mask].requires_grad_()
    got, got_parts = kd_rows_loss(ResponseRows.of(rows, teacher[:, :-1][mask], batch), params)
    got.backward()
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    assert got_parts == pytest.approx(parts, rel=1e-6)
    torch.testing.assert_close(rows.grad, student.grad[:, :-1][mask], rtol=1e-5, atol=1e-7)


def test_with_the_cache_the_student_s_head_runs_on_response_positions_only(setup, tmp_path):
    tok, _, teacher = setup
    examples = [encode_record(r, tok, 200) for r in generate_records(24, seed=32)]  # whole
    responses = sum(len(e.input_ids) - e.response_start for e in examples)
    plain, cached = [], []
    _train((tok, examples, teacher), tmp_path, "kd", 0, heads=plain)
    _train((tok, examples, teacher), tmp_path, "kd", 10 ** 6, heads=cached)
    # the first step's check runs the whole grid and the rows once; then each epoch the
    # head sees each example's response positions once. Without the cache: the whole grid.
    assert len(cached) == 2 + len(plain) == 2 + 3 * EPOCHS
    assert sum(cached[2:]) == EPOCHS * responses
    assert sum(plain) > 1.3 * sum(cached[2:])


def test_a_head_that_is_not_the_base_model_s_last_layer_keeps_the_whole_grid(setup, tmp_path):
    """A model whose logits are more than the head of its base model's output (here scaled by
    a hook, as some families scale or cap theirs): the first step's check sees it and the run
    is the one without the row form."""
    tok = setup[0]

    def scaled():
        student = build_zoo_model("gpt2-smoke-student", tok, seed=2)
        student.register_forward_hook(lambda m, a, out: out.__setitem__(
            "logits", out["logits"] * 1.5) or out)
        return student

    heads = []
    cached, _ = _train(setup, tmp_path, "kd", 10 ** 6, heads=heads, student=scaled())
    plain, _ = _train(setup, tmp_path, "kd", 0, student=scaled())
    assert len(heads) == 2 + 3 * EPOCHS and len(set(heads[2:])) == 1   # check, then grid
    for a, b in zip(plain, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
