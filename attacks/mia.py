"""Membership-inference signals and their registry; higher score = more likely a member.

A signal declares what it needs and the access it assumes, and turns those inputs into one
score per sequence. Signals that need only the target's token statistics share one forward
pass (`attacks.scoring.token_stats`).
"""
from __future__ import annotations

import math
import zlib as _zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from attacks.scoring import TokenStats


@dataclass
class ReferenceModels:
    """K reference models' mean response log-probabilities on the audited records, with the
    inclusion mask of their training sets, and (for RMIA) on a population of other records."""

    logq: np.ndarray                     # (K, N)
    included: np.ndarray                 # (K, N) bool
    population_target_logq: np.ndarray | None = None   # (M,) the target on the population
    population_logq: np.ndarray | None = None          # (K, M)
    approximate: bool = False            # e.g. reference teachers standing in for students


@dataclass
class SignalInputs:
    """Everything a signal may use. `texts` are the scored (response) texts."""

    stats: TokenStats | None = None
    texts: list[str] | None = None
    labels: np.ndarray | None = None                   # only the blind baseline sees these
    lowercase_stats: TokenStats | None = None          # a second pass on lowercased responses
    mope: np.ndarray | None = None                     # from perturbed copies of the model
    references: dict[str, TokenStats] = field(default_factory=dict)
    # per reference name: True when its tokenizer differs from the target's → compare per byte
    reference_per_byte: dict[str, bool] = field(default_factory=dict)
    reference_models: ReferenceModels | None = None
    mink_k: float = 0.2
    seed: int = 0


# need → (SignalInputs field, what to say when it is missing)
NEEDS: dict[str, tuple[str, str]] = {
    "token_stats": ("stats", "the target's token statistics"),
    "text": ("texts", "the response texts"),
    "labels": ("labels", "member / non-member labels"),
    "lowercase_pass": ("lowercase_stats", "a second pass on lowercased text"),
    "perturbations": ("mope", "perturbed copies of the model (audit.perturbations > 0)"),
    "reference_models": ("reference_models", "reference models with inclusion masks"),
}


@dataclass(frozen=True)
class Signal:
    name: str
    fn: Callable[[SignalInputs], np.ndarray]
    needs: tuple[str, ...]       # "token_stats", "text", "reference:<name>"
    access: str                  # what an attacker must have
    description: str = ""
    access_short: str = ""       # the same, as the report's access column says it

    def missing(self, inputs: SignalInputs) -> list[str]:
        """What this signal needs that `inputs` lacks (empty when it can run)."""
        out = []
        for need in self.needs:
            if need.startswith("reference:"):
                if need.split(":", 1)[1] not in inputs.references:
                    out.append(f"reference model '{need.split(':', 1)[1]}'")
            elif need == "population":
                refs = inputs.reference_models
                if refs is None or refs.population_logq is None:
                    out.append("a population of other records scored by target and references")
            elif getattr(inputs, NEEDS[need][0]) is None:
                out.append(NEEDS[need][1])
        return out

    def __call__(self, inputs: SignalInputs) -> np.ndarray:
        missing = self.missing(inputs)
        if missing:
            raise ValueError(f"signal '{self.name}' cannot run without {', '.join(missing)}")
        return np.asarray(self.fn(inputs), dtype=np.float64)


def lowest_k_mean(values: np.ndarray, offsets: np.ndarray, k: float) -> np.ndarray:
    """Per sequence: mean of its lowest max(1, ⌊k·T⌋) values."""
    out = np.empty(len(offsets) - 1)
    for i in range(len(out)):
        v = np.sort(values[offsets[i]:offsets[i + 1]])
        out[i] = v[:max(1, math.floor(k * len(v)))].mean()
    return out


def loss_signal(x: SignalInputs) -> np.ndarray:
    return -x.stats.nll()


def zlib_signal(x: SignalInputs) -> np.ndarray:
    sizes = np.array([len(_zlib.compress(t.encode("utf-8"))) for t in x.texts], dtype=np.float64)
    return -x.stats.nll() / sizes


def mink_signal(x: SignalInputs) -> np.ndarray:
    return lowest_k_mean(x.stats.logprob, x.stats.offsets, x.mink_k)


def minkpp_signal(x: SignalInputs) -> np.ndarray:
    s = x.stats
    z = (s.logprob - s.mean) / np.sqrt(np.maximum(s.var, 1e-12))
    return lowest_k_mean(z, s.offsets, x.mink_k)


def reference_signal(name: str) -> Callable[[SignalInputs], np.ndarray]:
    """−(NLL_target − NLL_ref); per UTF-8 byte of the response when the tokenizers differ."""

    def fn(x: SignalInputs) -> np.ndarray:
        ref = x.references[name]
        if x.reference_per_byte.get(name, False):
            if x.texts is None:
                raise ValueError(f"signal '{name}': per-byte comparison needs the response texts")
            nbytes = np.array([max(1, len(t.encode("utf-8"))) for t in x.texts], dtype=np.float64)
            return -(x.stats.total_nll() - ref.total_nll()) / nbytes
        return -(x.stats.nll() - ref.nll())

    return fn


def lowercase_signal(x: SignalInputs) -> np.ndarray:
    return -x.stats.nll() / x.lowercase_stats.nll()


def mope_signal(x: SignalInputs) -> np.ndarray:
    return x.mope


def lira_signal(online: bool) -> Callable[[SignalInputs], np.ndarray]:
    def fn(x: SignalInputs) -> np.ndarray:
        from attacks.reference import lira_scores

        r = x.reference_models
        return lira_scores(-x.stats.nll(), r.logq, r.included, online=online)

    return fn


def rmia_signal(x: SignalInputs) -> np.ndarray:
    from attacks.reference import rmia_scores

    r = x.reference_models
    return rmia_scores(-x.stats.nll(), r.logq, r.included, r.population_target_logq,
                       r.population_logq, offline=True)


def blind_signal(x: SignalInputs) -> np.ndarray:
    from attacks.blind import blind_scores

    return blind_scores(x.texts, x.labels, seed=x.seed)


SIGNALS: dict[str, Signal] = {
    "loss": Signal("loss", loss_signal, ("token_stats",), "token log-probabilities",
                   "−NLL of the response (Yeom et al. 2018)", "token log-probs"),
    "zlib": Signal("zlib", zlib_signal, ("token_stats", "text"), "token log-probabilities",
                   "−NLL / zlib-compressed size of the response (Carlini et al. 2021)",
                   "token log-probs"),
    "mink": Signal("mink", mink_signal, ("token_stats",), "token log-probabilities",
                   "mean of the lowest 20% token log-probabilities (Shi et al. 2024)",
                   "token log-probs"),
    "minkpp": Signal("minkpp", minkpp_signal, ("token_stats",), "full next-token distributions",
                     "Min-K% of log-probabilities standardised by the model's own "
                     "distribution (Zhang et al. 2024)", "full distributions"),
    "ref_base": Signal("ref_base", reference_signal("ref_base"),
                       ("token_stats", "reference:ref_base"),
                       "token log-probabilities of the target and of its base model",
                       "−(NLL_target − NLL_base): calibrated by the pre-fine-tuning base",
                       "token log-probs + base model"),
    "ref_ext": Signal("ref_ext", reference_signal("ref_ext"),
                      ("token_stats", "reference:ref_ext"),
                      "token log-probabilities of the target and of an independent model",
                      "−(NLL_target − NLL_external): calibrated by a model trained "
                      "independently (per UTF-8 byte when the tokenizers differ)",
                      "token log-probs + reference model"),
    "lowercase": Signal("lowercase", lowercase_signal, ("token_stats", "lowercase_pass"),
                        "token log-probabilities (two passes)",
                        "−NLL(text) / NLL(lowercased text) (Carlini et al. 2021)",
                        "token log-probs (2 passes)"),
    "mope": Signal("mope", mope_signal, ("perturbations",), "model weights",
                   "mean NLL increase under Gaussian weight perturbations (Li et al. 2023)",
                   "weights"),
    "lira": Signal("lira", lira_signal(online=True), ("token_stats", "reference_models"),
                   "token log-probabilities + reference models trained with and without "
                   "each record", "online LiRA, one global variance per side (Carlini et al. "
                   "2022)", "reference models"),
    "lira_offline": Signal("lira_offline", lira_signal(online=False),
                           ("token_stats", "reference_models"),
                           "token log-probabilities + reference models trained without "
                           "each record", "offline LiRA: Φ((s − μ_out)/σ_out)",
                           "reference models"),
    "rmia": Signal("rmia", rmia_signal, ("token_stats", "reference_models", "population"),
                   "token log-probabilities + reference models + population records",
                   "offline RMIA, γ = 1 (Zarifzadeh et al. 2024)", "reference models"),
    "blind": Signal("blind", blind_signal, ("text", "labels"), "text only (no model)",
                    "model-free TF-IDF classifier: checks the split, not a model (Das et al. "
                    "2024)", "text only (no model)"),
}

# Signals that look at the data only: one score for the whole audit, not per model.
MODEL_FREE = ("blind",)
