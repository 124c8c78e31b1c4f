"""audit_models on a tiny model: every signal runs when its inputs are given and says why not
when they are missing; extra passes agree with direct computations."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from attacks.scoring import token_stats
from kdaudit import audit_models
from kdaudit.config import AuditConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record
from kdaudit.models import build_zoo_model


@pytest.fixture(scope="module")
def full_audit(tiny_lm):
    model, tok, records, _ = tiny_lm
    members, nonmembers = records[:30], records[30:60]
    ids = [r.id for r in members + nonmembers]
    rng = random.Random(0)
    halves = []
    for _ in range(2):     # each record IN for two references and OUT for two
        half = set(rng.sample(ids, len(ids) // 2))
        halves += [half, set(ids) - half]
    refs = [(build_zoo_model("gpt2-smoke-teacher", tok, seed=s).eval(), half)
            for s, half in enumerate(halves, start=1)]
    cfg = AuditConfig(signals=["loss", "lowercase", "mope", "lira", "lira_offline", "rmia",
                               "blind", "ref_base"], perturbations=2, block_risk=True,
                      n_bootstrap=50, memorization_records=5, batch_size=16)
    result = audit_models({"teacher": model}, members, nonmembers, tokenizer=tok, config=cfg,
                          references={"teacher": refs},
                          population=generate_records(20, seed=99), max_length=160)
    return result, model, tok, members + nonmembers


def test_every_signal_with_its_inputs_runs(full_audit):
    result, *_ = full_audit
    auc = result.mia[result.mia.metric == "auc"].set_index(["model", "signal"]).value
    for signal in ("loss", "lowercase", "mope", "lira", "lira_offline", "rmia"):
        assert 0 <= auc[("teacher", signal)] <= 1
    assert ("data", "blind") in auc.index
    missing = result.signals.set_index("signal").not_run_for
    assert "reference model 'ref_base'" in missing["ref_base"]      # no base was given
    assert missing["lira"] == "" and missing["mope"] == ""
    assert list(result.blocks.block) == [1, 2] and set(result.blocks.model) == {"teacher"}


def test_lowercase_signal_is_nll_ratio_of_two_passes(full_audit):
    result, model, tok, records = full_audit
    def nll(recs):
        enc = [encode_record(r, tok, 160) for r in recs]
        return token_stats(model, [e.input_ids for e in enc], [e.response_start for e in enc],
                           pad_id=tok.pad_token_id).nll()
    lower = [dataclasses.replace(r, response=r.response.lower()) for r in records]
    want = -nll(records) / nll(lower)
    np.testing.assert_allclose(result.scores["teacher"]["lowercase"], want, rtol=1e-6)


def test_missing_references_are_reported_not_faked(tiny_lm):
    model, tok, records, _ = tiny_lm
    cfg = AuditConfig(signals=["loss", "lira", "rmia"], n_bootstrap=20, memorization_records=2)
    result = audit_models({"kd": model}, records[:10], records[10:20], tokenizer=tok,
                          config=cfg, max_length=160)
    assert set(result.mia.signal) == {"loss"}
    reasons = result.signals.set_index("signal").not_run_for
    assert "reference models with inclusion masks" in reasons["lira"]
    assert "reference models" in reasons["rmia"]
    with pytest.raises(ValueError, match="unknown signal"):
        audit_models({"kd": model}, records[:10], records[10:20], tokenizer=tok,
                     signals=["loss", "tarot"])


def test_targeted_extraction_prompts_with_text_before_the_secret(tiny_lm, monkeypatch):
    """The prompt ends right before the record's first hidden secret; a continuation that
    starts with the secret counts as extracted, anything else does not."""
    import kdaudit.audit.passes as audit
    from kdaudit.audit import compute_extraction, hidden_secrets

    model, tok, records, _ = tiny_lm
    recs = [r for r in records if hidden_secrets(r)][:3]
    seen = []

    def fake_greedy(model, prompts, **kw):
        seen.extend(tok.decode(p) for p in prompts)
        first = [min((r.response.find(s), s) for s in hidden_secrets(r)
                     if r.response.find(s) >= 0)[1] for r in recs]
        return [tok(" " + first[0], add_special_tokens=False)["input_ids"],
                tok("nothing", add_special_tokens=False)["input_ids"],
                tok(first[2][:-1], add_special_tokens=False)["input_ids"]]

    monkeypatch.setattr(audit, "greedy_generate", fake_greedy)
    frame = compute_extraction(model, tok, recs, AuditConfig(), max_length=400)
    assert frame.targeted.tolist() == [1.0, 0.0, 0.0]
    assert frame.sampled.isna().all()                 # sampling is off by default
    for text, r in zip(seen, recs):
        assert text.startswith("Below is an instruction") and r.instruction in text
        assert not any(s in text for s in hidden_secrets(r))


def test_sampled_extraction_runs_when_asked(tiny_lm):
    from kdaudit.audit import compute_extraction

    model, tok, records, _ = tiny_lm
    cfg = AuditConfig(extraction_samples=2, memorization_tokens=8, batch_size=4)
    frame = compute_extraction(model, tok, records[:4], cfg, max_length=160)
    assert set(frame.sampled) <= {0.0, 1.0} and not frame.sampled.isna().any()


def test_single_pass_signals_share_one_forward_pass_per_batch(tiny_lm):
    """loss, zlib, mink, minkpp and ref_base read one pass; lowercase adds exactly one more.
    A pass is one forward per batch, plus one on its first batch: the model's own logits, to
    check that the LM head can run on the scored positions alone."""
    from attacks.scoring import default_batch_tokens, scoring_batches
    from kdaudit.audit import compute_pass
    from kdaudit.data.template import encode_record

    model, tok, records, _ = tiny_lm
    enc = [encode_record(r, tok, 160) for r in records]
    n_batches = len(scoring_batches([e.input_ids for e in enc], [e.response_start for e in enc],
                                    tok.pad_token_id, 16, "cpu", default_batch_tokens("cpu")))
    calls = []
    handle = model.transformer.h[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        cfg = AuditConfig(signals=["loss", "zlib", "mink", "minkpp", "ref_base"], batch_size=16)
        compute_pass(model, tok, records, cfg, max_length=160)
        assert len(calls) == n_batches + 1
        calls.clear()
        compute_pass(model, tok, records, dataclasses.replace(cfg, signals=["loss", "lowercase"]),
                     max_length=160)
        assert n_batches + 1 < len(calls) <= 2 * (n_batches + 1) + 1
    finally:
        handle.remove()


def test_blind_baseline_flags_a_shifted_split(tmp_path):
    """Non-members drawn from other categories than members: the model-free classifier
    separates them, and the report warns that the split is confounded."""
    from kdaudit.audit import AuditContext, AuditSet, assemble
    from kdaudit.data.corpus import CATEGORIES

    pool = generate_records(1600, seed=21)
    first = set(CATEGORIES[:4])
    members = [r for r in pool if r.category in first][:300]
    nonmembers = [r for r in pool if r.category not in first][:300]
    cfg = AuditConfig(signals=["blind"], n_bootstrap=50)
    result = assemble(AuditContext(AuditSet(members, nonmembers), None, cfg, 64), [], {})
    assert result.split_check["blind"] > 0.6
    paths = result.write_report(tmp_path)
    assert "Warning: the model-free blind baseline" in paths["md"].read_text()

    mixed = pool[:600]
    random.Random(0).shuffle(mixed)           # one random split of one pool: no shift
    sound = assemble(AuditContext(AuditSet(mixed[:300], mixed[300:]), None, cfg, 64), [], {})
    assert 0.42 <= sound.split_check["blind"] <= 0.58


def test_ref_ext_compares_nll_per_byte_with_an_independent_tokenizer(tiny_lm, tmp_path):
    from kdaudit.data.template import format_text
    from kdaudit.models import train_tokenizer

    model, tok, records, _ = tiny_lm
    other = train_tokenizer([format_text(r) for r in generate_records(200, seed=77)], 350)
    external = build_zoo_model("gpt2-smoke-student", other, seed=4)
    external.save_pretrained(tmp_path / "ext")
    other.save_pretrained(tmp_path / "ext")
    members, nonmembers = records[:20], records[20:40]
    cfg = AuditConfig(n_bootstrap=20, memorization_records=2, signals=["loss"])
    result = audit_models({"teacher": model}, members, nonmembers, tokenizer=tok, config=cfg,
                          external=tmp_path / "ext", max_length=160)
    assert "ref_ext" in set(result.mia.signal)

    def total_nll(m, t):
        enc = [encode_record(r, t, 160) for r in members + nonmembers]
        return token_stats(m, [e.input_ids for e in enc], [e.response_start for e in enc],
                           pad_id=t.pad_token_id).total_nll()

    nbytes = np.array([len(r.response.encode("utf-8")) for r in members + nonmembers])
    want = -(total_nll(model, tok) - total_nll(external.eval(), other)) / nbytes
    np.testing.assert_allclose(result.scores["teacher"]["ref_ext"], want, rtol=1e-5)
    with pytest.raises(ValueError, match="external"):
        audit_models({"teacher": model}, members, nonmembers, tokenizer=tok,
                     signals=["loss", "ref_ext"])
