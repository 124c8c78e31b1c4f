"""Utility beside every privacy number (docs/methods.md §13): greedy answers to held-out prompts and
their ROUGE-L against the reference responses."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from attacks.memorization import greedy_generate
from kdaudit.data.records import Record
from kdaudit.data.template import encode_prompt


def greedy_responses(model, tokenizer, records: Sequence[Record], *, max_new_tokens: int,
                     batch_size: int, max_length: int, desc: str | None = None) -> list[str]:
    """Each record's prompt answered greedily, one string per record, in order.

    Batched with left padding and a KV cache (`attacks.memorization.greedy_generate`, the
    memorization stage's generator), so the answer does not depend on the batch it is in.
    The prompt is cut to leave room for `max_new_tokens` within `max_length`; decoding stops
    at EOS and only the new tokens are decoded (special tokens dropped, ends stripped).
    """
    prompts = [encode_prompt(r, tokenizer, max(1, max_length - max_new_tokens))
               for r in records]
    tokens = greedy_generate(model, prompts, max_new_tokens=max_new_tokens,
                             pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                             batch_size=batch_size, desc=desc)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F-measure per (prediction, reference) pair, with Google's `rouge_score`
    (its default tokenizer: lowercased alphanumeric words, no stemming). 0 where either text
    has no words. Raises ValueError when the two lists differ in length."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions for {len(references)} "
                         f"references")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return np.array([scorer.score(ref, pred)["rougeL"].fmeasure
                     for pred, ref in zip(predictions, references)], dtype=np.float64)


def utility_rows(model_id: str, predictions: Sequence[str], references: Sequence[str]
                 ) -> list[dict]:
    """The utility table's ROUGE-L row for one model (tidy: model, metric, split, value).

    The value is the mean F-measure over the non-member records as a fraction in [0, 1],
    not a percentage, so it reads on the same scale as AUC and match rates in the other
    tables. No row when there are no records (a mean over nothing is not a measurement).
    """
    if not len(predictions) and not len(references):
        return []
    return [{"model": model_id, "metric": "rouge_l", "split": "nonmembers",
             "value": float(rouge_l(predictions, references).mean())}]
