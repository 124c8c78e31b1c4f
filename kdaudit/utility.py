"""Utility beside every privacy number (METHODS §9): greedy answers to held-out prompts and
their ROUGE-L against the reference responses."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from attacks.memorization import greedy_generate
from kdaudit.data.records import Record
from kdaudit.data.template import encode_prompt


def greedy_responses(model, tokenizer, records: Sequence[Record], *, max_new_tokens: int,
                     batch_size: int, max_length: int) -> list[str]:
    """Each record's prompt answered greedily (KV cache, left padding), new tokens only."""
    prompts = [encode_prompt(r, tokenizer, max(1, max_length - max_new_tokens))
               for r in records]
    tokens = greedy_generate(model, prompts, max_new_tokens=max_new_tokens,
                             pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                             batch_size=batch_size)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F-measure per (prediction, reference) pair (Google's `rouge_score`)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions for {len(references)} "
                         f"references")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return np.array([scorer.score(ref, pred)["rougeL"].fmeasure
                     for pred, ref in zip(predictions, references)], dtype=np.float64)


def utility_rows(model_id: str, predictions: Sequence[str], references: Sequence[str]
                 ) -> list[dict]:
    """The utility table's ROUGE-L row for one model: the mean F-measure, as a fraction."""
    return [{"model": model_id, "metric": "rouge_l", "split": "nonmembers",
             "value": float(rouge_l(predictions, references).mean())}]
