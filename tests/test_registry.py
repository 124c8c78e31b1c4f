"""The signal registry is the single source of truth: a signal added there alone (its function
and its entry) is scored, tabled and reported, and the extra passes it declares are run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attacks.mia import SIGNALS, Signal, SignalInputs
from kdaudit import audit_models
from kdaudit.config import AuditConfig


def toy_signal(x: SignalInputs) -> np.ndarray:
    """Members look like records the model finds easy, lowercased or not."""
    return -(x.stats.nll() + x.lowercase_stats.nll())


@pytest.fixture
def toy_registry(monkeypatch):
    """A test-local registry: the real one plus "toy", removed again after the test."""
    monkeypatch.setitem(SIGNALS, "toy", Signal(
        "toy", toy_signal, ("token_stats", "lowercase_pass"), "token log-probabilities",
        "toy: NLL of the text plus NLL of its lowercased form", "toy access"))


def test_a_registered_signal_flows_to_scores_tables_and_report(tiny_lm, toy_registry,
                                                               tmp_path):
    model, tok, records, _ = tiny_lm
    cfg = AuditConfig(signals=["loss", "toy"], n_bootstrap=20, memorization_records=2,
                      utility_records=0)
    result = audit_models({"teacher": model}, records[:30], records[30:60], tokenizer=tok,
                          config=cfg, max_length=160)
    scores = result.scores["teacher"]
    assert "toy" in scores and scores["toy"].notna().all()
    assert not np.allclose(scores["toy"], 2 * scores["loss"])   # not a copy of loss
    result.write_tables(tmp_path / "tables")
    mia = pd.read_csv(tmp_path / "tables" / "mia.csv")
    assert {"auc", "tpr_at_1pct"} <= set(mia[mia.signal == "toy"].metric)
    signals = pd.read_csv(tmp_path / "tables" / "signals.csv").set_index("signal")
    assert signals.loc["toy", "description"].startswith("toy: NLL")
    paths = result.write_report(tmp_path / "report")
    md = paths["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| teacher | toy |"))
    assert "toy access" in row          # the access column comes from the registry


def test_a_signal_without_its_declared_pass_is_reported_not_run(tiny_lm, toy_registry):
    """The extra pass is decided from what a signal declares: with no signal declaring the
    lowercase pass, none runs, and a registered signal needing one says so."""
    from kdaudit.audit import compute_pass, extra_passes

    model, tok, records, _ = tiny_lm
    assert extra_passes(["loss", "toy"]) == {"lowercase_pass"}
    assert extra_passes(["loss", "zlib"]) == frozenset()
    bare = compute_pass(model, tok, records[:4], AuditConfig(signals=["loss"]), max_length=160)
    assert bare.lowercase is None and bare.mope is None
    inputs = SignalInputs(stats=bare.stats)
    assert SIGNALS["toy"].missing(inputs) == ["a second pass on lowercased text"]
