"""One model's passes over the audited records: the shared forward pass and the extra passes
its signals declare, greedy generations, and targeted / sampled extraction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from attacks.blocks import block_mope_scores, mope_scores
from attacks.memorization import greedy_generate, sample_generate
from attacks.mia import SIGNALS
from attacks.scoring import TokenStats, token_stats
from kdaudit.config import AuditConfig
from kdaudit.data.records import Record
from kdaudit.data.template import encode_prompt, encode_record, format_prompt

@dataclass
class ModelPass:
    """What one model yields on the audited records; signals and tables derive from it."""

    stats: TokenStats                       # the one shared forward pass
    lowercase: TokenStats | None = None     # responses lowercased (the `lowercase` signal)
    mope: np.ndarray | None = None          # (N,) whole-model MoPe
    blocks: np.ndarray | None = None        # (n_blocks, N) per-block MoPe

    def save(self, path: str | Path) -> None:
        arrays = {f"stats_{k}": v for k, v in self.stats.__dict__.items()}
        if self.lowercase is not None:
            arrays.update({f"lower_{k}": v for k, v in self.lowercase.__dict__.items()})
        for name in ("mope", "blocks"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        path = Path(path)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "ModelPass":
        with np.load(path) as z:
            def stats(prefix):
                keys = ("logprob", "mean", "var", "offsets")
                if f"{prefix}_logprob" not in z:
                    return None
                return TokenStats(*(z[f"{prefix}_{k}"] for k in keys))
            return cls(stats("stats"), stats("lower"), z["mope"] if "mope" in z else None,
                       z["blocks"] if "blocks" in z else None)


def extra_passes(signals: Sequence[str]) -> frozenset[str]:
    """The passes beyond the shared one that `signals` declare they need (`Signal.needs`):
    "lowercase_pass" and / or "perturbations"."""
    return frozenset(n for s in signals for n in SIGNALS[s].needs) & EXTRA_PASSES


EXTRA_PASSES = frozenset({"lowercase_pass", "perturbations"})


def compute_pass(model, tokenizer, records: Sequence[Record], cfg: AuditConfig, *,
                 max_length: int, desc: str = "") -> ModelPass:
    """Score `records` under `model`: the shared token statistics, plus the extra passes that
    the configured signals declare (lowercased text, weight perturbations) and per-block risk."""
    def encode(recs):
        enc = [encode_record(r, tokenizer, max_length) for r in recs]
        return [e.input_ids for e in enc], [e.response_start for e in enc]

    ids, starts = encode(records)
    kw = dict(pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size)
    out = ModelPass(token_stats(model, ids, starts, desc=f"score {desc}", **kw))
    extra = extra_passes(cfg.signals)
    if "lowercase_pass" in extra:
        lower = [dataclasses.replace(r, response=r.response.lower()) for r in records]
        out.lowercase = token_stats(model, *encode(lower), desc=f"lowercase {desc}", **kw)
    if "perturbations" in extra:
        out.mope = mope_scores(model, ids, starts, sigma=cfg.perturbation_sigma,
                               n_perturbations=cfg.perturbations, **kw)
    if cfg.block_risk:
        out.blocks = block_mope_scores(model, ids, starts, sigma=cfg.perturbation_sigma,
                                       n_perturbations=cfg.perturbations, **kw)
    return out


def compute_generations(model, tokenizer, records: Sequence[Record], cfg: AuditConfig, *,
                        max_length: int, desc: str | None = None) -> list[list[int]]:
    prompts = [encode_prompt(r, tokenizer, max_length - cfg.memorization_tokens)
               for r in records]
    return greedy_generate(model, prompts, max_new_tokens=cfg.memorization_tokens,
                           pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                           batch_size=cfg.batch_size, desc=desc)


def hidden_secrets(record: Record) -> list[str]:
    """The record's secrets that its prompt does not already show."""
    prompt = format_prompt(record)
    return [s for s in record.secrets if s and s not in prompt]


def compute_extraction(model, tokenizer, records: Sequence[Record], cfg: AuditConfig, *,
                       max_length: int, seed: int = 0, desc: str = "") -> pd.DataFrame:
    """Per record: targeted extraction (greedy continuation of the text that precedes its
    first hidden secret) and, when `cfg.extraction_samples` > 0, sampled extraction (the most
    likely of n top-k samples reveals a hidden secret)."""
    rows = {r.id: {"record_id": r.id, "targeted": np.nan, "sampled": np.nan} for r in records}
    targets = []
    for r in records:
        secrets = hidden_secrets(r)
        at = [(r.response.find(s), s) for s in secrets if r.response.find(s) >= 0]
        if at:
            pos, secret = min(at)
            targets.append((r, secret, r.response[:pos]))
    if targets:
        # tokenized as in training (prompt and response apart); the space before the secret
        # is left for the model, as training text never ends a token sequence with it
        lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 2
                   for _, s, _ in targets]
        room = max(1, max_length - max(cfg.memorization_tokens, *lengths))
        prompts = [(encode_prompt(r, tokenizer, max_length) +
                    tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"]
                    )[-room:] for r, _, prefix in targets]
        gen = greedy_generate(model, prompts, max_new_tokens=max(lengths),
                              pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                              batch_size=cfg.batch_size, desc=f"targeted {desc}")
        for (r, secret, _), g in zip(targets, gen):
            rows[r.id]["targeted"] = float(tokenizer.decode(g, skip_special_tokens=True)
                                           .lstrip().startswith(secret.lstrip()))
    if cfg.extraction_samples > 0:
        prompts = [encode_prompt(r, tokenizer, max_length - cfg.memorization_tokens)
                   for r in records]
        samples = sample_generate(model, prompts, n=cfg.extraction_samples,
                                  max_new_tokens=cfg.memorization_tokens,
                                  pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                  batch_size=cfg.batch_size, seed=seed, desc=f"sample {desc}")
        for r, cands in zip(records, samples):
            best = tokenizer.decode(cands[0][0], skip_special_tokens=True)
            rows[r.id]["sampled"] = float(any(s in best for s in hidden_secrets(r)))
    return pd.DataFrame(list(rows.values()), columns=["record_id", "targeted", "sampled"])
