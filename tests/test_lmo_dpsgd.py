"""DP-SGD with LMO-DP noise: the noise added, the labelled numbers of a run, clear errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import kdaudit.dp
from kdaudit.cli import main
from kdaudit.config import DPConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.dp import dpsgd, lmo
from kdaudit.train import dp as opacus_dp
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.train import loop
from kdaudit.train.methods import METHODS

REFERENCE = Path(kdaudit.dp.__file__).parent / "lmo_reference.toml"   # clip = 1


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(200, seed=31)], 300)
    examples = [encode_record(r, tok, 64) for r in generate_records(48, seed=32)]
    return tok, examples


def _train(tok, examples, out, seed=0):
    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    cfg = TrainConfig(epochs=0.5, batch_size=8, lr=1e-3, log_every=1)
    return loop.train(loop.TrainJob(
        model, examples, METHODS["sft"], cfg, out_dir=out, seed=seed, pad_id=tok.pad_token_id,
        desc=None, tokenizer=tok,
        dp=dpsgd.plan(len(examples), 8, 0.5, DPConfig(mechanism="lmo", lmo_params=str(REFERENCE),
                                                       max_grad_norm=1.0))))


def test_lmo_training_reports_the_labelled_numbers_of_the_run(setup, tmp_path):
    tok, examples = setup
    result = _train(tok, examples, tmp_path / "a")
    q, delta = 8 / 48, 1 / 480
    assert result.steps == 3                                   # ceil(0.5 epoch / q)
    privacy = json.loads((tmp_path / "a" / "privacy.json").read_text())
    assert privacy == result.privacy
    assert privacy["mechanism"] == "lmo" and "epsilon" not in privacy
    assert privacy["sample_rate"] == pytest.approx(q) and privacy["steps"] == 3
    assert privacy["delta"] == pytest.approx(delta) and privacy["max_grad_norm"] == 1.0
    run = dataclasses.replace(lmo.load_lmo_params(REFERENCE), sample_rate=q, steps=3,
                              delta=delta, clip=1.0)
    assert privacy["epsilon_claimed"] == pytest.approx(lmo.claimed_epsilon(run), rel=1e-9)
    assert privacy["epsilon_pld_lower_bound"] == pytest.approx(lmo.pld_lower_bound(run),
                                                               rel=1e-9)
    assert privacy["claim_holds"] == (privacy["epsilon_pld_lower_bound"]
                                      <= privacy["epsilon_claimed"])
    assert privacy["lmo_params"]["exp_rate"] == 5.0
    assert (tmp_path / "a" / "model.safetensors").exists()

    # an audit of the checkpoint labels both numbers and says the claim fails
    from kdaudit import audit_models
    from kdaudit.config import AuditConfig

    records = generate_records(20, seed=33)
    audit = audit_models({"teacher": tmp_path / "a"}, records[:10], records[10:],
                         config=AuditConfig(signals=["loss"], n_bootstrap=20,
                                            memorization_records=2, utility_records=0),
                         max_length=64)
    rows = audit.privacy.set_index("metric").value
    assert rows["epsilon_claimed_lmo"] == pytest.approx(privacy["epsilon_claimed"])
    assert rows["epsilon_lower_bound_lmo_pld"] == pytest.approx(
        privacy["epsilon_pld_lower_bound"])
    md = Path(audit.write_report(tmp_path / "report")["md"]).read_text()
    assert "The LMO-DP privacy claim does not hold" in md


def test_the_noise_is_lmo_noise_on_the_summed_gradients(setup):
    """Clipping off (C huge, the file's clip too): grad = (Σ per-sample grads + z) / B, with z
    the LMO sampler's draw from the run's noise generator (here seeded from the run's
    seed: `reproducible_noise`), not Gaussian and not scaled by C."""
    tok, examples = setup
    from kdaudit.train.batching import collate

    b = collate(examples[:6], tok.pad_token_id)
    ref = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    ref.train()
    opacus_dp.per_sequence_ce(ref(input_ids=b.input_ids, attention_mask=b.attention_mask,
                              position_ids=b.position_ids).logits, b.input_ids,
                          b.target_mask).backward()
    mean_grad = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}

    C = 1e6
    params = dataclasses.replace(lmo.load_lmo_params(REFERENCE), clip=C)
    noise = lambda shape, gen, dtype: lmo.sample_noise(shape, params, gen, dtype=dtype)  # noqa
    plan = opacus_dp.DPPlan(noise_multiplier=0.0, sample_rate=6 / 48, steps=1, delta=1e-3,
                            max_grad_norm=C, mechanism="lmo", noise=noise,
                            reproducible_noise=True)
    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    model.train()
    module, dp_opt, _, _ = opacus_dp.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0), 48, plan, seed=3)
    opacus_dp.per_sequence_ce(module(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                 position_ids=b.position_ids).logits, b.input_ids,
                          b.target_mask).backward()
    dp_opt.pre_step()
    assert dp_opt.expected_batch_size == 6
    gen = opacus_dp.dp_generator(plan, 3, opacus_dp.NOISE)
    names = {id(p): n for n, p in module._module.named_parameters()}
    for p in dp_opt.params:   # the generator is drawn parameter by parameter, in this order
        z = lmo.sample_noise(p.shape, params, gen)
        want = (mean_grad[names[id(p)]] * 6 + z) / 6
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5, msg=names[id(p)])


def test_a_clip_other_than_the_files_is_an_error(tmp_path):
    dp = DPConfig(mechanism="lmo", lmo_params=str(REFERENCE), max_grad_norm=0.5)
    with pytest.raises(ValueError, match=r"clip 1 .*max_grad_norm is 0\.5"):
        dpsgd.plan(48, 8, 1.0, dp)


@pytest.mark.parametrize("flags, phrase", [
    (["--dp", "--mechanism", "lmo"], "--mechanism lmo needs --lmo-params"),
    (["--mechanism", "lmo", "--lmo-params", str(REFERENCE)], "add --dp"),
    (["--dp", "--mechanism", "lmo", "--lmo-params", str(REFERENCE), "--epsilon", "2"],
     "--epsilon does not apply to --mechanism lmo"),
    (["--dp", "--lmo-params", str(REFERENCE)], "--lmo-params goes with --mechanism lmo"),
])
def test_cli_lmo_flags_are_checked(tmp_path, capsys, flags, phrase):
    assert main(["teacher", "--base", "nowhere", "--data", "nothing.jsonl", *flags,
                 "--out", str(tmp_path / "t")]) == 2
    assert phrase in capsys.readouterr().err


def test_cli_lmo_teacher_prints_the_labelled_numbers(setup, tmp_path, capsys):
    from kdaudit.data.records import write_jsonl

    tok, _ = setup
    base = tmp_path / "base"
    build_zoo_model("gpt2-smoke-student", tok, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "members.jsonl"
    write_jsonl(generate_records(40, seed=33), data)
    out = tmp_path / "lmo_teacher"
    assert main(["teacher", "--base", str(base), "--data", str(data), "--dp", "--mechanism",
                 "lmo", "--lmo-params", str(REFERENCE), "--preset", "smoke", "--epochs", "0.4",
                 "--batch-size", "8", "--max-length", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    spent = json.loads((out / "privacy.json").read_text())
    assert spent["steps"] == 2 and spent["sample_rate"] == pytest.approx(0.2)
    assert "LMO-DP claimed epsilon" in text and "not a guarantee" in text
    assert f"{spent['epsilon_claimed']:.4f}" in text
    assert f"{spent['epsilon_pld_lower_bound']:.4f}" in text
    assert ("claim does not hold" in text) == (not spent["claim_holds"])
