"""Canaries: seeded, planted in members only, and audited with three labelled numbers."""
from __future__ import annotations

import numpy as np
import pytest

from kdaudit.data.canaries import make_canaries, read_canaries, training_records, write_canaries
from kdaudit.audit.privacy import canary_rows, heuristic_row
from kdaudit.config import AuditConfig


def test_canaries_are_seeded_half_included_and_fresh(tmp_path):
    a = make_canaries(3, 4, 400, seed=1, exclude_names=frozenset({"Nobody Here"}))
    b = make_canaries(3, 4, 400, seed=1)
    assert [c.record for c in a] == [c.record for c in b]
    once = [c for c in a if c.kind == "once"]
    assert 0.4 < np.mean([c.included for c in once]) < 0.6
    assert all(c.secret in c.record.response and len(c.secret) == 10 for c in a)
    assert len({c.record.secrets[0] for c in a}) == len(a)
    planted = training_records(a)
    assert len(planted) == 3 * 4 + sum(c.included for c in once)
    assert not any(c.record in planted for c in once if not c.included)
    write_canaries(a, tmp_path / "c.jsonl")
    assert read_canaries(tmp_path / "c.jsonl") == a
    (tmp_path / "bad.jsonl").write_text('{"record": {}}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1"):
        read_canaries(tmp_path / "bad.jsonl")


def test_model_that_never_saw_canaries_has_no_epsilon(tiny_lm):
    model, tok, records, _ = tiny_lm
    canaries = make_canaries(2, 10, 200, seed=5)
    rows = {r["metric"]: r for r in canary_rows(
        "m", model, tok, canaries, AuditConfig(canary_candidates=50, canary_guess_fraction=0.1,
                                               batch_size=32), max_length=96, seed=0)}
    assert rows["epsilon_lower_bound_one_run"]["value"] == 0.0        # consistent with 0
    assert "rigorous 95% lower bound" in rows["epsilon_lower_bound_one_run"]["note"]
    assert 0 <= rows["exposure_mean"]["value"] <= np.log2(1e10)
    rng = np.random.default_rng(0)
    h = heuristic_row("m", rng.normal(size=200), np.r_[np.ones(100), np.zeros(100)], 0, "loss")
    assert h["value"] < 0.5 and "not a bound" in h["note"]
