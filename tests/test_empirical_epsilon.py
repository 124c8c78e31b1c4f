"""The one-run empirical ε lower bounds (docs/methods.md §11) against the accounted ε of DP-SGD (§5).

Black box (canary records) and white box (gradient canaries, below the black-box tests).

What a user relies on: on once-inserted canaries, the rigorous lower bound of Steinke, Nasr and
Jagielski (2023) never exceeds the ε that the accountant reports for a DP-SGD teacher, while the
same audit of a teacher trained the same way without DP finds a clearly positive ε.

Smoke-sized: 200 builtin member records plus 100 once-inserted canaries (each in with
probability ½), a 1-layer GPT-2, no pretraining. 40 epochs (each included canary seen 40 times)
at lr 1e-2 make the non-private teacher separate included from excluded canaries perfectly
(40 of 40 guesses at k = 20: a bound of 2.55 at δ = 0, 2.44 at δ = 1/(10 N); measured on five
seeds; 30 epochs were not enough on one of three). The DP teacher uses ε = 1 so that the check
is not vacuous: the largest bound this audit can return (every guess right) is above 1.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from attacks.privacy import max_epsilon_for_guesses, one_run_epsilon_lower_bound
from attacks.scoring import token_stats
from kdaudit.config import AuditConfig
from kdaudit.config import DPConfig, TrainConfig
from kdaudit.data.canaries import make_canaries, training_records
from kdaudit.data.corpus import generate_records
from kdaudit.dp.dpsgd import plan
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.audit.privacy import canary_rows
from kdaudit.train import loop
from kdaudit.train.methods import METHODS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

N_MEMBERS = 200
N_ONCE = 100
K_FRACTION = 0.2                 # k+ = k- = 20 guesses each, fixed before any score is seen
MAX_LENGTH = 96                  # canaries are ~75 tokens; longer members lose prompt text
DP_EPSILON = 1.0
DP_SEEDS = (0, 1, 2)
NONPRIVATE_MIN_BOUND = 1.5       # measured 2.553 (40/40 correct); the DP teacher is at ε = 1
CFG = TrainConfig(epochs=40, batch_size=32, lr=1e-2, checkpoint_every=0, log_every=1000)



@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(300, seed=41)], 512)
    members = generate_records(N_MEMBERS, seed=42)
    names = frozenset(r.secrets[0] for r in members if r.secrets)
    return tok, members, names


def _audit(setup, tmp_path_factory, seed: int, dp: DPConfig | None) -> dict:
    """Train a teacher on members + this seed's canaries; audit its once-inserted canaries."""
    tok, members, names = setup
    canaries = make_canaries(0, 1, N_ONCE, seed=1000 + seed, exclude_names=names)
    examples = [encode_record(r, tok, MAX_LENGTH) for r in members + training_records(canaries)]
    model = build_zoo_model("gpt2-smoke-student", tok, seed=seed)
    out = tmp_path_factory.mktemp(f"teacher-{'dp' if dp else 'plain'}-{seed}") / "model"
    result = loop.train(loop.TrainJob(
        model, examples, METHODS["sft"], CFG, out_dir=out, seed=seed, pad_id=tok.pad_token_id,
        desc=None, dp=plan(len(examples), CFG.batch_size, CFG.epochs, dp) if dp else None))
    model.eval()

    once = [c for c in canaries if c.kind == "once"]
    enc = [encode_record(c.record, tok, MAX_LENGTH) for c in once]
    scores = -token_stats(model, [e.input_ids for e in enc], [e.response_start for e in enc],
                          pad_id=tok.pad_token_id, batch_size=64).total_nll()
    included = np.array([c.included for c in once])
    k = max(1, int(K_FRACTION * len(once)))
    delta = result.privacy["delta"] if result.privacy else 1 / (10 * len(examples))
    cfg = AuditConfig(canary_candidates=0, canary_guess_fraction=K_FRACTION, batch_size=64)
    rows = canary_rows("teacher", model, tok, canaries, cfg, max_length=MAX_LENGTH, seed=seed)
    saved = json.loads((out / "privacy.json").read_text()) if dp else None
    return {"privacy": result.privacy, "saved": saved, "delta": delta, "m": len(once), "k": k,
            "row": {r["metric"]: r for r in rows}["epsilon_lower_bound_one_run"],
            "bound_delta0": one_run_epsilon_lower_bound(scores, included, k_plus=k, k_minus=k),
            "bound": one_run_epsilon_lower_bound(scores, included, k_plus=k, k_minus=k,
                                                 delta=delta)}


@pytest.fixture(scope="module")
def audits(setup, tmp_path_factory):
    plain = _audit(setup, tmp_path_factory, DP_SEEDS[0], None)
    private = [_audit(setup, tmp_path_factory, s, DPConfig(epsilon=DP_EPSILON)) for s in DP_SEEDS]
    for name, a in [("non-private", plain)] + [(f"dp seed {s}", a)
                                              for s, a in zip(DP_SEEDS, private)]:
        eps = a["privacy"]["epsilon"] if a["privacy"] else float("inf")
        print(f"{name}: accounted ε {eps:.4f}, one-run lower bound "
              f"{a['bound_delta0']['epsilon_lb']} (δ = 0) / {a['bound']['epsilon_lb']} "
              f"(δ = {a['delta']:.2e}), {a['bound']['correct']}/{a['bound']['guesses']} correct, "
              f"m = {a['m']}, k = {a['k']}")
    return plain, private


def test_dp_teacher_bound_never_exceeds_its_accounted_epsilon(audits):
    _, private = audits
    for a in private:
        eps = a["privacy"]["epsilon"]   # the accountant's ε, as written to privacy.json
        assert a["saved"]["epsilon"] == eps and a["saved"]["delta"] == a["delta"]
        assert eps == pytest.approx(DP_EPSILON, rel=1e-3)
        m, guesses = a["m"], a["bound"]["guesses"]
        # the check has teeth: had every guess been right, the bound would exceed ε
        assert max_epsilon_for_guesses(guesses, guesses, m, a["delta"], 0.95) > eps
        # the theorem's bound at the accounted δ, and the δ = 0 value the report shows
        assert 0.0 <= a["bound"]["epsilon_lb"] <= a["bound_delta0"]["epsilon_lb"] <= eps
        assert a["row"]["value"] == a["bound_delta0"]["epsilon_lb"]


def test_non_private_teacher_gives_a_clearly_positive_bound(audits):
    plain, private = audits
    assert plain["privacy"] is None and plain["saved"] is None
    bound = plain["bound"]["epsilon_lb"]   # at δ = 1/(10 N), below the δ = 0 value
    assert bound > NONPRIVATE_MIN_BOUND
    assert bound > max(a["privacy"]["epsilon"] for a in private)
    assert plain["row"]["value"] == plain["bound_delta0"]["epsilon_lb"] >= bound
    assert f"{plain['bound_delta0']['correct']} of {plain['bound_delta0']['guesses']} guesses" \
        in plain["row"]["note"]


# -- the white-box audit (gradient canaries), with its negative controls ---------------------------
# 64 persons, batch 16 (q = 1/4), 10 epochs (40 steps), δ = 1e-5, accounted ε = 1: the noise is
# then σ ≈ 6.2. 4000 Dirac canaries, 200 guesses each way. Noise secretly scaled by 0.3 while the
# accountant still says ε = 1 must be caught (bound > 1); the true noise must not be. Measured
# with the seeded noise used here: × 1 gave 0.312, 0.354, 0.375 on three seeds; × 0.3 1.568,
# × 0.1 4.362, × 0 4.781 (the most 400 guesses can show at this δ). One run with secret noise:
# 0.128, 0.344, 0.439; 1.646; 4.093; 4.781.
WB_PERSONS, WB_BATCH, WB_EPOCHS, WB_DELTA = 64, 16, 10.0, 1e-5
WB_DP = DPConfig(epsilon=DP_EPSILON, delta=WB_DELTA, gradient_canaries=4000,
                 canary_guess_fraction=0.05, reproducible_noise=True)   # the same draw in CI


@pytest.fixture(scope="module")
def white_box(setup, tmp_path_factory):
    """The white-box bound of each run: noise × 1 on three seeds, × 0.3, × 0.1 and × 0."""
    tok, *_ = setup
    examples = [encode_record(r, tok, 32) for r in generate_records(WB_PERSONS, seed=43)]
    cfg = TrainConfig(epochs=WB_EPOCHS, batch_size=WB_BATCH, lr=1e-3, checkpoint_every=0,
                      log_every=1000)
    out = {}
    for scale, seed in [(1.0, 0), (1.0, 1), (1.0, 2), (0.3, 0), (0.1, 0), (0.0, 0)]:
        honest = plan(WB_PERSONS, WB_BATCH, WB_EPOCHS, WB_DP)
        # the noise actually added; the accounting stays the honest plan's (ε = 1)
        secret = dataclasses.replace(honest, noise_multiplier=honest.noise_multiplier * scale)
        result = loop.train(loop.TrainJob(
            build_zoo_model("gpt2-smoke-student", tok, seed=seed), examples, METHODS["sft"],
            cfg, out_dir=tmp_path_factory.mktemp(f"wb-{scale}-{seed}") / "m", seed=seed,
            pad_id=tok.pad_token_id, desc=None, dp=secret))
        out[(scale, seed)] = result.privacy
        a = result.privacy["white_box_audit"]
        print(f"noise × {scale} (seed {seed}): accounted ε {result.privacy['epsilon']:.3f}, "
              f"white-box lower bound {a['epsilon_lower_bound']} ({a['correct']}/{a['guesses']} "
              f"correct, {a['canaries']} canaries, δ = {a['delta']:g})")
    return out


def test_white_box_bound_stays_below_the_accounted_epsilon(white_box):
    for seed in (0, 1, 2):
        spent = white_box[(1.0, seed)]
        assert spent["epsilon"] == pytest.approx(DP_EPSILON, rel=1e-3)
        assert 0.0 <= spent["white_box_audit"]["epsilon_lower_bound"] <= spent["epsilon"]


@pytest.mark.parametrize("scale", [0.3, 0.1, 0.0])
def test_white_box_audit_catches_noise_secretly_scaled_down(white_box, scale):
    spent = white_box[(scale, 0)]
    assert spent["epsilon"] == pytest.approx(DP_EPSILON, rel=1e-3)   # what the accountant says
    assert spent["white_box_audit"]["epsilon_lower_bound"] > DP_EPSILON


def test_the_dp_teachers_white_box_bounds_stay_below_their_epsilon(audits):
    _, private = audits
    for a in private:
        audit = a["privacy"]["white_box_audit"]
        assert audit["canaries"] == 4000 and audit["delta"] == a["delta"]
        assert 0.0 <= audit["epsilon_lower_bound"] <= a["privacy"]["epsilon"]
