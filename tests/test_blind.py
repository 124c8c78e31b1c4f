"""Tests for attacks.blind: the model-free split check (docs/methods.md §8)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from attacks.blind import blind_classifier, blind_folds, blind_scores

_TEMPLATES = (
    "the {a} asked the {b} about the {c} yesterday",
    "please send the {a} report to {b} before the {c} meeting",
    "my {a} said that the {b} was near the {c}",
    "we moved the {a} and the {b} into the {c} room",
)
_SHARED = ("river", "table", "garden", "letter", "doctor", "window", "market", "teacher",
           "engine", "coffee", "bridge", "island", "pencil", "forest", "camera", "violin")
_VOCAB_A = ("invoice", "ledger", "audit", "payroll", "budget", "receipt", "tariff", "credit")
_VOCAB_B = ("meadow", "sparrow", "willow", "pebble", "lantern", "harbor", "thistle", "comet")


def _sentences(rng: np.random.Generator, n: int, vocab: tuple[str, ...]) -> list[str]:
    out = []
    for _ in range(n):
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        a, b, c = rng.choice(vocab, size=3)
        out.append(template.format(a=a, b=b, c=c))
    return out


def _same_distribution(n: int = 1000, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return _sentences(rng, n, _SHARED), (rng.random(n) < 0.5).astype(int)


def test_same_distribution_gives_chance_auc():
    texts, labels = _same_distribution()
    scores = blind_scores(texts, labels, seed=0)
    assert scores.shape == (len(texts),)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert 0.4 <= roc_auc_score(labels, scores) <= 0.6


def test_vocabulary_shift_is_detected():
    rng = np.random.default_rng(1)
    n = 150
    texts = _sentences(rng, n, _SHARED + _VOCAB_A) + _sentences(rng, n, _SHARED + _VOCAB_B)
    labels = np.r_[np.ones(n, dtype=int), np.zeros(n, dtype=int)]
    perm = rng.permutation(2 * n)
    texts, labels = [texts[i] for i in perm], labels[perm]
    assert roc_auc_score(labels, blind_scores(texts, labels)) > 0.9


def test_deterministic_for_a_seed_and_label_dtype():
    texts, labels = _same_distribution(n=150, seed=2)
    first = blind_scores(texts, labels, seed=5)
    np.testing.assert_array_equal(first, blind_scores(texts, labels.astype(bool), seed=5))
    np.testing.assert_array_equal(blind_folds(labels, seed=5), blind_folds(labels, seed=5))
    assert not np.array_equal(blind_folds(labels, seed=5), blind_folds(labels, seed=6))


def test_scores_are_out_of_fold():
    """Unique random tokens are memorisable but carry no signal: an in-sample classifier
    separates them perfectly, out-of-fold scores cannot."""
    rng = np.random.default_rng(3)
    n = 200
    texts = [f"record {''.join(rng.choice(list('abcdefghij'), size=12))}" for _ in range(n)]
    labels = (rng.random(n) < 0.5).astype(int)
    in_sample = blind_classifier().fit(np.array(texts, dtype=object), labels)
    leaked = in_sample.predict_proba(np.array(texts, dtype=object))[:, 1]
    assert roc_auc_score(labels, leaked) > 0.95  # the check below could fail
    assert 0.4 <= roc_auc_score(labels, blind_scores(texts, labels)) <= 0.6


def test_each_record_scored_by_a_model_not_trained_on_it():
    texts, labels = _same_distribution(n=120, seed=4)
    folds = blind_folds(labels, folds=4, seed=9)
    assert set(folds) == {0, 1, 2, 3}
    for f in range(4):  # stratified: each fold holds about a quarter of each class
        for c in (0, 1):
            assert abs((folds[labels == c] == f).sum() - (labels == c).sum() / 4) <= 1
    scores = blind_scores(texts, labels, folds=4, seed=9)
    text_arr = np.array(texts, dtype=object)
    for f in range(4):
        held_out = folds == f
        model = blind_classifier().fit(text_arr[~held_out], labels[~held_out])
        np.testing.assert_allclose(scores[held_out], model.predict_proba(text_arr[held_out])[:, 1],
                                   rtol=1e-10)


def test_input_validation():
    texts, labels = _same_distribution(n=40, seed=6)
    with pytest.raises(ValueError, match="shape"):
        blind_scores(texts, labels[:-1])
    with pytest.raises(ValueError, match="binary"):
        blind_scores(texts, labels * 2)
    with pytest.raises(ValueError, match="NaN"):
        blind_scores(texts, np.where(labels == 1, 1.0, np.nan))
    with pytest.raises(ValueError, match="strings"):
        blind_scores(texts[:-1] + [3], labels)
    with pytest.raises(ValueError, match="at least 2"):
        blind_scores(texts, labels, folds=1)
    few = np.zeros(40, dtype=int)
    few[:3] = 1
    with pytest.raises(ValueError, match="at least 5 records"):
        blind_scores(texts, few)
