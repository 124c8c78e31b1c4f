"""The one training loop: seeded batching, method losses, checkpoints and exact resume."""
from __future__ import annotations

import pytest
import torch

from kdaudit.config import KDConfig, TrainConfig, load_config
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, load_model, train_tokenizer
from kdaudit.train import loop, objectives
from kdaudit.train.batching import batch_order, collate
from kdaudit.train.methods import METHODS, method_params


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(200, seed=11)], 300)
    examples = [encode_record(r, tok, 96) for r in generate_records(40, seed=12)]
    return tok, examples


def test_batch_order_is_seeded_and_covers_each_epoch():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10]
    a = batch_order(lengths, 3, epochs=2, seed=1)
    assert a == batch_order(lengths, 3, epochs=2, seed=1)
    assert a != batch_order(lengths, 3, epochs=2, seed=2)
    assert len(a) == 8
    assert sorted(i for b in a[:4] for i in b) == list(range(10))
    assert len(batch_order(lengths, 3, epochs=0.5, seed=1)) == 2


def test_collate_masks_response_tokens_only(setup):
    tok, examples = setup
    b = collate(examples[:3], tok.pad_token_id)
    for row, e in enumerate(examples[:3]):
        n = len(e.input_ids)
        assert b.attention_mask[row].sum() == n
        assert b.target_mask[row].nonzero().squeeze(1).tolist() == list(
            range(e.response_start, n))


def test_kd_loss_mixes_ce_and_tempered_forward_kl(setup):
    tok, examples = setup
    b = collate(examples[:4], tok.pad_token_id)
    torch.manual_seed(0)
    v = len(tok)
    s, t = torch.randn(*b.input_ids.shape, v), torch.randn(*b.input_ids.shape, v)
    ce, _ = METHODS["nokd"].loss(s, None, b, method_params(METHODS["nokd"]))
    kl = objectives.forward_kl(s[:, :-1], t[:, :-1], b.target_mask[:, 1:], temperature=2.0)
    params = method_params(METHODS["kd"], KDConfig(kd_ratio=0.3, temperature=2.0))
    loss, parts = METHODS["kd"].loss(s, t, b, params)
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * 4.0 * kl)
    assert parts["forward_kl"] == pytest.approx(kl.item())


def test_interrupted_training_resumes_to_the_same_weights(setup, tmp_path):
    tok, examples = setup
    cfg = TrainConfig(epochs=2, batch_size=8, lr=3e-3, checkpoint_every=3)

    def fresh():
        return build_zoo_model("gpt2-smoke-student", tok, seed=0)

    straight = loop.train(loop.TrainJob(fresh(), examples, METHODS["sft"], cfg,
                                        out_dir=tmp_path / "a", seed=0,
                                        pad_id=tok.pad_token_id, run_key="k", desc=None))

    class Crash(Exception):
        pass

    def crash_at_7(step, record):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        loop.train(loop.TrainJob(fresh(), examples, METHODS["sft"], cfg, out_dir=tmp_path / "b",
                                 seed=0, pad_id=tok.pad_token_id, run_key="k", desc=None,
                                 callbacks=[crash_at_7]))
    assert not (tmp_path / "b").exists() and (tmp_path / "b.ckpt").exists()
    resumed = loop.train(loop.TrainJob(fresh(), examples, METHODS["sft"], cfg,
                                       out_dir=tmp_path / "b", seed=0,
                                       pad_id=tok.pad_token_id, run_key="k", desc=None))
    assert resumed.resumed_from == 6 and resumed.steps == straight.steps == 10
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "b" / "train_log.jsonl").exists()
    assert not (tmp_path / "b.ckpt").exists()


def test_checkpoint_of_other_inputs_is_discarded(setup, tmp_path):
    tok, examples = setup
    cfg = TrainConfig(epochs=1, batch_size=8, lr=3e-3, checkpoint_every=2)

    def stop_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    with pytest.raises(KeyboardInterrupt):
        loop.train(loop.TrainJob(model, examples, METHODS["sft"], cfg, out_dir=tmp_path / "m",
                                 seed=0, pad_id=tok.pad_token_id, run_key="old", desc=None,
                                 callbacks=[stop_at_3]))
    again = loop.train(loop.TrainJob(build_zoo_model("gpt2-smoke-student", tok, seed=0),
                                     examples, METHODS["sft"], cfg, out_dir=tmp_path / "m",
                                     seed=0, pad_id=tok.pad_token_id, run_key="new", desc=None))
    assert again.resumed_from == 0


def test_kd_refuses_mismatched_vocabularies(setup, tmp_path):
    tok, examples = setup
    other = train_tokenizer([format_text(r) for r in generate_records(50, seed=13)], 280)
    student = build_zoo_model("gpt2-smoke-student", tok)
    teacher = build_zoo_model("gpt2-smoke-teacher", other)
    with pytest.raises(ValueError, match="vocabularies differ"):
        loop.train(loop.TrainJob(student, examples, METHODS["kd"], TrainConfig(),
                                 out_dir=tmp_path / "x", seed=0, pad_id=tok.pad_token_id,
                                 teacher=teacher, desc=None))


def test_pretrained_bases_are_cached_per_machine(monkeypatch):
    from kdaudit.models import bases

    cfg = load_config("smoke", data={"pretrain_records": 40}, pretrain={"epochs": 0.5})
    texts = [format_text(r) for r in bases.pretraining_records(cfg)]
    tok = bases.cached_tokenizer(cfg, texts)
    calls = []
    real = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = bases.cached_base(cfg, "gpt2-smoke-student", tok, texts)
    second = bases.cached_base(cfg, "gpt2-smoke-student", tok, texts)
    assert first == second and (first / "model.safetensors").exists() and len(calls) == 1
    other = load_config("smoke", data={"pretrain_records": 40}, pretrain={"epochs": 1.0})
    assert bases.base_key(other, "gpt2-smoke-student") != bases.base_key(cfg,
                                                                           "gpt2-smoke-student")
