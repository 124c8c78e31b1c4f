"""Empirical privacy of one model from its canaries and its membership scores (docs/methods.md §11).

The ε a DP model's accountant gives, then three labelled numbers: canary exposure (repeated canaries), the one-run ε lower bound
(once-inserted canaries, rigorous at 95%), and the heuristic ε estimate from member and
non-member scores (an estimate, not a bound).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from attacks.privacy import estimate_exposure, heuristic_epsilon, one_run_epsilon_lower_bound
from attacks.scoring import shared_prefix_stats, token_stats
from kdaudit.config import AuditConfig
from kdaudit.data.canaries import SECRET_DIGITS, Canary, random_secret
from kdaudit.data.records import Record
from kdaudit.data.template import encode_record
from kdaudit.store import read_json


def _total_nll(model, tokenizer, records: Sequence[Record], max_length: int,
               batch_size: int, *, shared_prefix: bool = False) -> np.ndarray:
    """Each record's total response NLL; `shared_prefix`: the records differ only near their
    end (a canary and its candidates), so their common prefix is run once."""
    enc = [encode_record(r, tokenizer, max_length) for r in records]
    stats = shared_prefix_stats if shared_prefix else token_stats
    s = stats(model, [e.input_ids for e in enc], [e.response_start for e in enc],
              pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    return s.total_nll()


def canary_rows(model_id: str, model, tokenizer, canaries: Sequence[Canary], cfg: AuditConfig,
                *, max_length: int, seed: int, delta: float = 0.0) -> list[dict]:
    """Exposure of repeated canaries (each ranked against `cfg.canary_candidates` random
    secrets) and the one-run ε lower bound of once-inserted ones (guessing
    `cfg.canary_guess_fraction` each way), at the model's δ (a DP model's; 0 for the others)."""
    candidates, k_fraction, batch_size = (cfg.canary_candidates, cfg.canary_guess_fraction,
                                          cfg.batch_size)
    rows = []
    repeated = [c for c in canaries if c.kind == "repeated"]
    if repeated and candidates > 0:
        rng = random.Random(seed)
        exposures = []
        for c in tqdm(repeated, desc=f"canaries {model_id}", unit="canary", mininterval=1.0):
            others = [random_secret(rng) for _ in range(candidates)]
            recs = [c.record] + [dataclasses.replace(
                c.record, response=c.record.response.replace(c.secret, o)) for o in others]
            nll = _total_nll(model, tokenizer, recs, max_length, batch_size, shared_prefix=True)
            # a skew-normal fit to the candidates' losses extrapolates the rank into the tail
            # (Carlini et al. 2019); plain counting could not resolve ranks below |R|/candidates
            exposures.append(estimate_exposure(nll[0], nll[1:], 10.0 ** SECRET_DIGITS,
                                               method="skewnorm"))
        rows += [_row(model_id, "exposure_mean", float(np.mean(exposures)),
                      f"mean over {len(repeated)} canaries inserted {repeated[0].repeats}× "
                      f"each, so each is one person with {repeated[0].repeats} records (a DP "
                      f"model protects it at its ε per person, or only at the ε of a "
                      f"{repeated[0].repeats}-record person under record-level DP); rank from a "
                      f"skew-normal fit to {candidates} random secrets; maximum "
                      f"{np.log2(10.0 ** SECRET_DIGITS):.1f} bits"),
                 _row(model_id, "exposure_max", float(np.max(exposures)), "")]
    once = [c for c in canaries if c.kind == "once"]
    if once:
        scores = -_total_nll(model, tokenizer, [c.record for c in once], max_length, batch_size)
        k = max(1, int(k_fraction * len(once)))
        bound = one_run_epsilon_lower_bound(scores, np.array([c.included for c in once]),
                                            k_plus=k, k_minus=k, delta=delta)
        rows.append(_row(model_id, "epsilon_lower_bound_one_run", bound["epsilon_lb"],
                         f"rigorous 95% lower bound (Steinke et al. 2023, black box) on the ε "
                         f"of one person with one record (each canary is its own person): "
                         f"{bound['correct']} of {bound['guesses']} guesses correct over "
                         f"{len(once)} canaries included with probability 1/2" +
                         (f", at δ = {delta:.3g}" if delta else "")))
    return rows


def spent_privacy(source: object) -> dict | None:
    """The `privacy.json` kdaudit wrote beside a DP model (None for other models, hub names
    and loaded model objects)."""
    if not isinstance(source, (str, Path)) or not (Path(source) / "privacy.json").is_file():
        return None
    return read_json(Path(source) / "privacy.json")


def spent_rows(model_id: str, source: object) -> list[dict]:
    """What a model's DP training spent: the accounted ε (Gaussian DP-SGD), or LMO-DP's
    claimed ε beside a lower bound on its true ε; nothing for a model without privacy.json."""
    spent = spent_privacy(source)
    if spent is None:
        return []
    if spent.get("mechanism") == "lmo":
        holds = "holds" if spent.get("claim_holds") else "does NOT hold"
        return [_row(model_id, "epsilon_claimed_lmo", _num(spent.get("epsilon_claimed")),
                     f"LMO-DP's own accounting, not a guarantee: the claim {holds}"),
                _row(model_id, "epsilon_lower_bound_lmo_pld",
                     _num(spent.get("epsilon_pld_lower_bound")),
                     "lower bound on the true ε: PLD of the LMO noise as sampled, "
                     f"q = {spent['sample_rate']:.4g}, {spent['steps']} steps"),
                *dp_sgd_rows(model_id, spent)]
    if "epsilon" not in spent:
        return []
    return [accounted_row(model_id, spent), *dp_sgd_rows(model_id, spent)]


def _dp_runs(spent: dict) -> dict[str, dict]:
    """The DP-SGD runs behind a model's spend: itself, or its recipe's components."""
    return spent.get("components") or {"": spent}


def dp_sgd_rows(model_id: str, spent: dict) -> list[dict]:
    """Per DP-SGD run of the model: the white-box one-run bound from its gradient canaries
    and, at the record level, the ε of its largest person."""
    rows = []
    for part, run in _dp_runs(spent).items():
        of = f" of the {part}'s DP-SGD run" if part else ""
        audit = run.get("white_box_audit")
        if audit:
            rows.append(_row(model_id, "epsilon_lower_bound_white_box",
                             audit["epsilon_lower_bound"],
                             f"rigorous 95% lower bound{of} (Steinke et al. 2023, white box): "
                             f"{audit['correct']} of {audit['guesses']} guesses correct on "
                             f"{audit['canaries']} Dirac gradient canaries, each a {_unit(run)} "
                             f"drawn at the run's rate, at δ = {audit['delta']:.3g}; compare "
                             f"with the run's {_epsilon_of(run)}"))
        group = run.get("group_privacy")
        if group:
            rows.append(_row(model_id, "epsilon_person_record_level", group["epsilon"],
                             f"the ε{of} of a person with {group['records']} records under "
                             f"record-level DP-SGD, at δ = {group['delta']:.3g}"))
    return rows


def _epsilon_of(run: dict) -> str:
    if "epsilon" in run:
        return f"accounted ε = {run['epsilon']:.3f}"
    return f"claimed ε = {_num(run.get('epsilon_claimed')):.3f} (LMO-DP, not a guarantee)"


def _unit(spent: dict) -> str:
    return spent.get("unit", "record")


def unit_note(spent: dict | None) -> str:
    """What a model's ε protects and how secret its noise was, for the accounted row."""
    runs = list(_dp_runs(spent or {}).values())
    units = sorted({_unit(r) for r in runs if "epsilon" in r})
    if not units:
        return ""
    note = f"per {' and '.join(units)}"
    if any(r.get("noise") == "reproducible" for r in runs):
        note += ("; noise REPRODUCIBLE from the run's seed: no guarantee against anyone who "
                 "knows it")
    return note


def spent_delta(source: object) -> float:
    """The δ a kdaudit DP model was trained at (0 for a model without privacy.json)."""
    return float((spent_privacy(source) or {}).get("delta") or 0.0)


def _num(x) -> float:
    return float("inf") if x is None else float(x)


def accounted_row(model_id: str, spent: dict) -> dict:
    """The ε a DP model's training spent by the accountant (`privacy.json` beside it)."""
    parts = [f"{spent.get('accountant', 'prv').upper()} accountant, δ = {spent['delta']:.3g}"]
    if unit_note(spent):
        parts.append(unit_note(spent))
    if "epsilon_pld" in spent:
        parts.append(f"PLD {spent['epsilon_pld']:.3f}, RDP {spent['epsilon_rdp']:.3f}")
    if "noise_multiplier" in spent:
        parts.append(f"σ = {spent['noise_multiplier']:.4f}, q = {spent['sample_rate']:.4g}, "
                     f"{spent['steps']} steps")
    if "composition" in spent:
        parts.append(spent["composition"])
    return _row(model_id, "epsilon_accounted", float(spent["epsilon"]), "; ".join(parts))


def heuristic_row(model_id: str, scores: np.ndarray, labels: np.ndarray, seed: int,
                  signal: str) -> dict:
    h = heuristic_epsilon(scores, labels, seed=seed)
    return _row(model_id, "epsilon_estimate_heuristic", h["epsilon_estimate"],
                f"estimate, not a bound: Clopper-Pearson rates of the {signal} signal at a "
                f"threshold chosen on a held-out half of members and non-members")


def _row(model: str, metric: str, value: float, note: str) -> dict:
    return {"model": model, "metric": metric, "value": value, "note": note}
