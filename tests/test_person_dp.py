"""Person-level DP-SGD (docs/methods.md §5): one clip bounds a person's records, persons are
what the Poisson sampler draws and what the accountant counts, the noise is secret unless
asked otherwise, and nothing un-noised lands in the model's folder."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from kdaudit.config import DPConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.dp.accounting import default_delta, group_epsilon
from kdaudit.dp.dpsgd import plan_for
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.train import dp as opacus_dp, loop
from kdaudit.train.batching import collate
from kdaudit.train.methods import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [3, 1, 2, 1, 4, 1, 2, 1, 1, 3, 1, 2]     # records per person: 22 records, 12 persons


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(200, seed=51)], 300)
    records = generate_records(sum(SIZES), seed=52)
    people = [f"p{i}" for i, n in enumerate(SIZES) for _ in range(n)]
    random.Random(0).shuffle(people)          # a person's records are not adjacent
    for r, person in zip(records, people):
        r.group = person
    return tok, [encode_record(r, tok, 40) for r in records]


def _persons(examples):
    return [e.person for e in examples]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def test_the_per_person_clipped_sum_is_the_brute_force_one(setup):
    """Sum each person's per-record gradients, clip the sum to C, add the persons up: the
    optimizer's clipped sum is exactly that; clipping records one by one is not."""
    tok, examples = setup
    C = 0.05                                   # small enough that every person is clipped
    plan = opacus_dp.DPPlan(noise_multiplier=0.0, sample_rate=0.5, steps=1, delta=1e-3,
                            max_grad_norm=C, reproducible_noise=True)
    strategy = loop.DPSGD(plan, _persons(examples))
    drawn = [0, 2, 4, 9]                       # four of the twelve persons
    idx = [i for u in drawn for i in strategy.units[u]]
    random.Random(1).shuffle(idx)              # rows need not be grouped by person

    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    model.train()
    module, optimizer, _, _ = opacus_dp.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), len(strategy.units), plan, seed=0)
    b = collate([examples[i] for i in idx], tok.pad_token_id)
    opacus_dp.per_sequence_ce(module(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                     position_ids=b.position_ids).logits,
                              b.input_ids, b.target_mask).backward()
    strategy.before_step(optimizer, idx)
    optimizer.pre_step()
    got = {n: p.summed_grad for n, p in module._module.named_parameters()}

    ref = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    ref.train()

    def record_grad(i: int) -> dict[str, torch.Tensor]:
        ref.zero_grad()
        one = collate([examples[i]], tok.pad_token_id)
        opacus_dp.per_sequence_ce(ref(input_ids=one.input_ids, attention_mask=one.attention_mask,
                                      position_ids=one.position_ids).logits,
                                  one.input_ids, one.target_mask).backward()
        return _grads(ref)

    def clipped(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        return {n: v * min(1.0, C / (float(norm) + 1e-6)) for n, v in g.items()}

    per_record = {i: record_grad(i) for i in idx}
    want = {n: torch.zeros_like(v) for n, v in got.items()}
    by_record = {n: torch.zeros_like(v) for n, v in got.items()}
    for u in drawn:
        person = {n: sum(per_record[i][n] for i in strategy.units[u]) for n in want}
        for n, v in clipped(person).items():
            want[n] += v
        for i in strategy.units[u]:
            for n, v in clipped(per_record[i]).items():
                by_record[n] += v
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)
    gap = max(float((got[n] - by_record[n]).abs().max()) for n in want)
    assert gap > 1e-3 * max(float(v.abs().max()) for v in want.values())


def test_persons_are_sampled_at_the_accounted_rate_with_all_their_records(setup, tmp_path):
    tok, examples = setup
    n = len(SIZES)
    p = plan_for(_persons(examples), 4, 400.0, DPConfig(epsilon=8.0, reproducible_noise=True,
                                                        gradient_canaries=0))
    assert (p.n_units, p.unit) == (n, "person")
    assert p.sample_rate == 1 / 3 and p.delta == default_delta(n) == 1 / (10 * n)
    strategy = loop.DPSGD(p, _persons(examples))
    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    accelerator = SimpleNamespace(num_processes=1, process_index=0)
    strategy.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda o: None,
                  accelerator, len(examples), seed=3)
    assert len(strategy.order) == p.steps == 1200
    draws = 0
    for batch in strategy.order:
        persons = {examples[i].person for i in batch}
        # every drawn person brings all of their records, once
        assert sorted(batch) == sorted(i for u in strategy.units
                                       if examples[u[0]].person in persons for i in u)
        draws += len(persons)
    rate, sd = draws / (p.steps * n), (p.sample_rate * (1 - p.sample_rate) / (p.steps * n)) ** .5
    assert abs(rate - p.sample_rate) < 5 * sd


def _train(examples, tok, out, dp: DPConfig, seed: int = 0, steps_epochs: float = 1.0):
    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    cfg = TrainConfig(epochs=steps_epochs, batch_size=4, lr=1e-3, log_every=1)
    return loop.train(loop.TrainJob(
        model, examples, METHODS["sft"], cfg, out_dir=out, seed=seed, pad_id=tok.pad_token_id,
        desc=None, tokenizer=tok, dp=plan_for(_persons(examples), 4, steps_epochs, dp)))


def test_privacy_json_states_the_unit_and_the_largest_person(setup, tmp_path):
    """Person level: N and δ count persons. Record level: the ε of the largest person (4
    records) is reported beside the per-record ε, and it is much larger."""
    tok, examples = setup
    person = _train(examples, tok, tmp_path / "person", DPConfig(epsilon=2.0)).privacy
    assert (person["unit"], person["units"], person["records"], person["largest_unit"]) == \
        ("person", 12, 22, 4)
    assert person["delta"] == 1 / 120 and person["noise"] == "secret"
    assert "group_privacy" not in person
    record = _train(examples, tok, tmp_path / "record", DPConfig(epsilon=2.0, unit="record"))
    r = record.privacy
    assert (r["unit"], r["units"], r["largest_unit"], r["delta"]) == ("record", 22, 1, 1 / 220)
    g = r["group_privacy"]
    assert g["records"] == 4 and g["epsilon"] == pytest.approx(group_epsilon(
        r["noise_multiplier"], r["sample_rate"], r["steps"], r["delta"], 4))
    assert g["epsilon"] > 2.5 * r["epsilon"]
    saved = json.loads((tmp_path / "record" / "privacy.json").read_text())
    assert saved["group_privacy"] == g


def test_group_epsilon_of_one_record_is_the_pld_epsilon():
    from kdaudit.dp.accounting import epsilon

    assert group_epsilon(1.2, 0.1, 20, 1e-4, 1) == pytest.approx(
        epsilon(1.2, 0.1, 20, 1e-4, accountant="pld"), rel=1e-4)
    assert group_epsilon(1.2, 0.1, 20, 1e-4, 3) > 2 * group_epsilon(1.2, 0.1, 20, 1e-4, 1)


def test_noise_is_secret_unless_reproducible_noise(setup, tmp_path):
    """Same seed, same data: different weights by default, identical with
    reproducible_noise, and privacy.json says which."""
    tok, examples = setup
    weights = {}
    for name, reproducible in (("a", False), ("b", False), ("c", True), ("d", True)):
        result = _train(examples, tok, tmp_path / name,
                        DPConfig(epsilon=4.0, reproducible_noise=reproducible))
        assert result.privacy["noise"] == ("reproducible" if reproducible else "secret")
        weights[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert weights["a"] != weights["b"]
    assert weights["c"] == weights["d"]


def test_no_private_loss_lands_in_the_model_folder(setup, tmp_path):
    """The per-step losses and batch sizes of a DP run go to the private log beside the
    folder; no file of the folder holds any of them."""
    tok, examples = setup
    out = tmp_path / "dp"
    result = _train(examples, tok, out, DPConfig(epsilon=4.0), steps_epochs=3.0)
    log = [json.loads(x) for x in loop.private_log_path(out).read_text().splitlines()]
    losses = {repr(r["loss"]) for r in log}   # as any JSON or table would write it
    assert len(log) >= result.steps - 2 and "batch_size" in log[0]
    assert not (out / "train_log.jsonl").exists()
    for f in out.rglob("*"):
        if f.is_file():
            text = f.read_bytes().decode("utf-8", "replace")
            assert not any(x in text for x in losses), f
            assert "batch_size" not in text or f.name == "config.json", f


def test_privacy_command_gives_a_persons_epsilon_under_record_level_dp(capsys):
    from kdaudit.cli import main

    assert main(["privacy", "--noise-multiplier", "1.2", "--sample-rate", "0.1", "--steps",
                 "20", "--delta", "1e-4", "--group-size", "3"]) == 0
    out = capsys.readouterr().out
    want = group_epsilon(1.2, 0.1, 20, 1e-4, 3)
    assert f"a person with 3 records, under record-level DP-SGD: epsilon {want:.4f}" in out


@pytest.mark.parametrize("field, value, phrase", [
    ("unit", "family", "dp.unit: expected 'person' or 'record'"),
    ("reproducible_noise", "yes", "dp.reproducible_noise: expected true or false"),
    ("gradient_canaries", -1, "dp.gradient_canaries: expected an integer ≥ 0"),
    ("canary_guess_fraction", 0.7, "dp.canary_guess_fraction: expected 0 < f ≤ 0.5"),
])
def test_dp_options_are_checked_in_a_run_config_before_any_work(field, value, phrase):
    from kdaudit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=phrase):
        DPConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"dp\.{field}: expected"):   # the field, named
        load_config("smoke", dp={field: value})
