"""Utility beside privacy: ROUGE-L against hand-computed LCS values, greedy answers."""
from __future__ import annotations

import numpy as np
import pytest

from kdaudit.utility import greedy_responses, rouge_l, utility_rows


def test_rouge_l_is_the_lcs_f_measure():
    got = rouge_l(["the cat sat on the mat", "a b c", "x y z w"],
                  ["the cat sat on the mat", "d e f", "x z w q r"])
    # third pair: LCS "x z w" = 3; precision 3/4, recall 3/5, F = 2PR/(P+R) = 2/3
    np.testing.assert_allclose(got, [1.0, 0.0, 2 * 0.75 * 0.6 / (0.75 + 0.6)])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_l(["a", "b"], ["a"])
    assert utility_rows("kd", ["a b"], ["a b"]) == [
        {"model": "kd", "metric": "rouge_l", "split": "nonmembers", "value": 1.0}]


def test_greedy_answers_do_not_depend_on_batching(tiny_lm):
    model, tok, records, _ = tiny_lm
    batched = greedy_responses(model, tok, records[:6], max_new_tokens=12, batch_size=6,
                               max_length=160)
    alone = [greedy_responses(model, tok, [r], max_new_tokens=12, batch_size=1,
                              max_length=160)[0] for r in records[:6]]
    assert batched == alone and len(batched) == 6
    assert all(isinstance(a, str) for a in batched)
    # deterministic (greedy), and in a different batching (3 + 3) the same again
    assert greedy_responses(model, tok, records[:6], max_new_tokens=12, batch_size=3,
                            max_length=160) == batched
    # only the new tokens: no part of the prompt template comes back
    assert not any("### Response:" in a or "Below is an instruction" in a for a in batched)


def test_utility_rows_are_a_fraction_and_empty_input_gives_no_row():
    rows = utility_rows("gkd", ["the cat sat", "a dog"], ["the cat sat down", "a dog"])
    assert rows[0]["metric"] == "rouge_l" and rows[0]["split"] == "nonmembers"
    # (2·1·0.75/1.75 + 1) / 2: the mean F-measure, as a fraction, not a percentage
    assert rows[0]["value"] == pytest.approx((2 * 0.75 / 1.75 + 1.0) / 2)
    assert utility_rows("gkd", [], []) == []
    assert rouge_l([], []).shape == (0,)
    assert rouge_l([""], ["some words"])[0] == 0.0
