"""Blind (model-free) membership baseline: does the split itself leak membership? (kdaudit's docs/methods.md §8)

Das et al. (2024) showed that many MIA benchmarks can be "attacked" without any model, because
members and non-members come from shifted distributions.  This baseline trains a text
classifier — TF-IDF over word 1–2-grams and character 3–5-grams, then logistic regression — to
tell members from non-members, with stratified k-fold cross-validation: every record is scored
by a classifier that never saw it.  The AUC of these out-of-fold scores checks the split, not a
model: ≈ 0.5 on a sound split, > 0.6 means the split is confounded by distribution shift.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_union

__all__ = ["CONFOUND_AUC", "blind_classifier", "blind_folds", "blind_scores"]

CONFOUND_AUC = 0.6   # a blind AUC above this flags a split confounded by distribution shift


def blind_classifier() -> Pipeline:
    """A fresh TF-IDF (word 1–2-grams + char 3–5-grams) + logistic-regression pipeline."""
    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True),
    )
    return Pipeline([("tfidf", features), ("logreg", LogisticRegression(C=1.0, max_iter=2000))])


def _binary_labels(labels: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError("labels contain NaN")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("labels must be binary: 1 = member, 0 = non-member")
    return arr.astype(np.int64)


def blind_folds(labels: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index (0 … folds−1) of every record: stratified, shuffled with ``seed``."""
    y = _binary_labels(labels, len(labels))
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    smallest = int(min((y == 0).sum(), (y == 1).sum()))
    if smallest < folds:
        raise ValueError(f"each class needs at least {folds} records for {folds}-fold "
                         f"cross-validation; the smaller class has {smallest}")
    fold_of = np.empty(y.shape[0], dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, test_idx) in enumerate(splitter.split(np.zeros(y.shape[0]), y)):
        fold_of[test_idx] = fold
    return fold_of


def blind_scores(texts: Sequence[str], labels: np.ndarray, *, folds: int = 5,
                 seed: int = 0) -> np.ndarray:
    """Out-of-fold member probability of every record from a text-only classifier.

    Record i is scored by a classifier fitted on the other folds only (see :func:`blind_folds`).
    """
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must all be strings")
    y = _binary_labels(labels, len(texts))
    fold_of = blind_folds(y, folds=folds, seed=seed)
    text_arr = np.asarray(texts, dtype=object)
    scores = np.empty(len(texts), dtype=np.float64)
    for fold in range(folds):
        test = fold_of == fold
        model = blind_classifier().fit(text_arr[~test], y[~test])
        member_col = list(model.classes_).index(1)
        scores[test] = model.predict_proba(text_arr[test])[:, member_col]
    return scores
