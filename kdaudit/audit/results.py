"""The tables of an audit, as pure functions of every model's `ModelAudit`: signals, ROC
metrics, per-block risk, memorization, privacy, utility and the riskiest records."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from attacks.memorization import match_metrics, secret_hits
from attacks.metrics import FPR_TARGETS, roc_metrics
from attacks.mia import MODEL_FREE, SIGNALS, ReferenceModels, SignalInputs
from attacks.scoring import TokenStats
from kdaudit.audit.context import AuditContext, AuditSet, ModelAudit, ModelInfo
from kdaudit.audit.passes import ModelPass, hidden_secrets
from kdaudit.data.records import Record
from kdaudit.data.template import encode_record
from kdaudit.report.contents import ReportTables

PRIVACY_COLUMNS = ["model", "metric", "value", "note"]

@dataclass
class AuditResult(ReportTables):
    """The tidy tables of one audit (the fields of `ReportTables`) and each model's
    per-record scores (`scores`: record_id, label, category, one column per signal).
    `training` is empty for models audited without their training logs."""

    scores: dict[str, pd.DataFrame] = field(default_factory=dict)
    blocks: pd.DataFrame = field(default_factory=pd.DataFrame)
    privacy: pd.DataFrame = field(default_factory=pd.DataFrame)
    riskiest: pd.DataFrame = field(default_factory=pd.DataFrame)
    training: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["model", "step", "loss"]))
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def write_tables(self, out_dir: str | Path) -> None:
        """The tidy tables as CSV files: mia, models, memorization, utility, signals, blocks,
        privacy and training (the per-step training logs behind the report's training
        curves)."""
        from kdaudit.store import atomic_write_frame

        out_dir = Path(out_dir)
        for name in ("mia", "models", "memorization", "utility", "signals", "blocks",
                     "privacy", "training"):
            atomic_write_frame(out_dir / f"{name}.csv", getattr(self, name))

    def write_report(self, out_dir: str | Path, *, title: str = "kdaudit risk report",
                     run_info: dict[str, Any] | None = None, redact: bool = True,
                     show_secrets_hint: str | None = None) -> dict[str, Path]:
        """report.html, report.md and figures; `show_secrets_hint` is the command that writes
        this report without redaction (named in the redacted one)."""
        from kdaudit.report import write_report

        return write_report(out_dir, self, title=title, run_info=run_info, redact=redact,
                            show_secrets_hint=show_secrets_hint)

    def summary(self) -> pd.DataFrame:
        """Model × signal AUC, the short table printed at the end of a run (model-free checks
        such as the blind baseline are in `split_check`)."""
        auc = self.mia[(self.mia.metric == "auc") & (self.mia.model != "data")]
        table = auc.pivot(index="model", columns="signal", values="value")
        order = [m for m in self.models.model if m in table.index]
        return table.loc[order, [s for s in self.signals.signal if s in table.columns]]

    @property
    def split_check(self) -> dict[str, float]:
        """AUC of each model-free signal: ≈ 0.5 on a sound split, > 0.6 flags a shift."""
        rows = self.mia[(self.mia.model == "data") & (self.mia.metric == "auc")]
        return dict(zip(rows.signal, rows.value))


def _mia_rows(model: str, signal: str, scores: np.ndarray, labels: np.ndarray,
              n_bootstrap: int, seed: int) -> tuple[list[dict], tuple[np.ndarray, np.ndarray]]:
    m = roc_metrics(scores, labels, n_bootstrap=n_bootstrap, seed=seed)
    rows = []
    for metric, fpr_label in (("auc", None), *((k, label) for k, _, label in FPR_TARGETS)):
        value, ci = m[metric], m[f"{metric}_ci"]
        note = "" if value is not None or fpr_label is None else (
            f"FPR {fpr_label} not reachable with {m['n_nonmembers']} non-members; smallest "
            f"reachable FPR {m['min_fpr']:.2%}")
        rows.append({"model": model, "signal": signal, "metric": metric,
                     "value": np.nan if value is None else value,
                     "ci_low": np.nan if ci is None else ci[0],
                     "ci_high": np.nan if ci is None else ci[1],
                     "n_members": m["n_members"], "n_nonmembers": m["n_nonmembers"],
                     "note": note})
    return rows, (np.asarray(m["fpr"]), np.asarray(m["tpr"]))


def assemble(ctx: AuditContext, models: Sequence[ModelInfo], audits: Mapping[str, ModelAudit],
             *, references: Mapping[str, ReferenceModels] | None = None,
             external: tuple[TokenStats, bool] | None = None,
             config: dict[str, Any] | None = None) -> AuditResult:
    """Every model's audit into the tables: signals, metrics, memorization, per-block risk,
    privacy and utility. No model is loaded.

    `references` maps a model id to its LiRA/RMIA reference models, where there are any;
    `external` is an independent model's statistics (`ref_ext`) and whether to compare per
    byte (`external_pass`). Model-free signals (the blind baseline) are computed once and
    reported as model "data".
    """
    aset, cfg = ctx.audit_set, ctx.cfg
    passes = {k: a.scored for k, a in audits.items()}
    if any(s in MODEL_FREE for s in cfg.signals):
        models = [*models, ModelInfo("data", "data", None,
                                     "the split itself, no model (blind baseline)")]
    mia_rows, roc, scores, status = [], {}, {}, []
    for info in tqdm(models, desc="tables", unit="model", mininterval=1.0):
        inputs = _signal_inputs(ctx, info, passes, (references or {}).get(info.id), external)
        scores[info.id], roc[info.id] = _scored_frame(aset), {}
        for name in cfg.signals:
            if (name in MODEL_FREE) == (info.id == "data"):
                rows, status_row = _run_signal(ctx, info.id, name, inputs, scores[info.id],
                                               roc[info.id])
                mia_rows += rows
                status += status_row
    trained = [i for i in models if i.id != "data"]
    memo, examples = _memorization(trained, ctx, audits)
    mia = pd.DataFrame(mia_rows)
    result = AuditResult(
        mia=mia, memorization=memo, utility=_utility(ctx, trained, audits),
        signals=_signal_table(cfg.signals, status), scores=scores, roc=roc, examples=examples,
        models=pd.DataFrame([{"model": i.id, "role": i.role, "base": i.base or "",
                              "description": i.description, "method": i.method or i.id,
                              "epsilon": i.epsilon, "private": i.private} for i in models]),
        blocks=_block_rows(trained, passes, aset.labels, cfg.n_bootstrap, ctx.seed),
        riskiest=_riskiest(mia, scores, aset.records), config=config or {},
        secrets=sorted({s for r in aset.records for s in r.secrets}))
    result.privacy = pd.DataFrame([row for i in trained for row in audits[i.id].privacy],
                                  columns=PRIVACY_COLUMNS)
    return result


def _scored_frame(aset: AuditSet) -> pd.DataFrame:
    """One row per audited record; each signal adds its score column."""
    return pd.DataFrame({"record_id": [r.id for r in aset.records], "label": aset.labels,
                         "category": [r.category for r in aset.records]})


def _signal_inputs(ctx: AuditContext, info: ModelInfo, passes: Mapping[str, ModelPass],
                   references: ReferenceModels | None,
                   external: tuple[TokenStats, bool] | None) -> SignalInputs:
    """What the signals may use for one model (only texts and labels for model "data")."""
    texts = [r.response for r in ctx.audit_set.records]
    if info.id == "data":
        return SignalInputs(texts=texts, labels=ctx.audit_set.labels, seed=ctx.seed)
    p = passes[info.id]
    inputs = SignalInputs(stats=p.stats, texts=texts, lowercase_stats=p.lowercase, mope=p.mope,
                          reference_models=references, mink_k=ctx.cfg.mink_k, seed=ctx.seed)
    if info.base is not None and info.base in passes:
        inputs.references["ref_base"] = passes[info.base].stats
        inputs.reference_per_byte["ref_base"] = False
    if external is not None:
        inputs.references["ref_ext"], inputs.reference_per_byte["ref_ext"] = external
    return inputs


def _run_signal(ctx: AuditContext, model: str, name: str, inputs: SignalInputs,
                frame: pd.DataFrame, roc: dict) -> tuple[list[dict], list[dict]]:
    """Score one signal into `frame` and `roc`: (its metric rows, its status rows)."""
    signal = SIGNALS[name]
    missing = signal.missing(inputs)
    if missing:
        return [], [{"model": model, "signal": name, "status": "not run",
                     "reason": f"needs {', '.join(missing)}"}]
    frame[name] = signal(inputs)
    status = []
    ok = ~np.isnan(frame[name].to_numpy())     # LiRA: no IN/OUT reference → NaN
    if not ok.all():
        status.append({"model": model, "signal": name, "status": "partial",
                       "reason": f"{int((~ok).sum())} records lack IN or OUT "
                                 f"references and are left out"})
    rows, roc[name] = _mia_rows(model, name, frame[name].to_numpy()[ok],
                                ctx.audit_set.labels[ok], ctx.cfg.n_bootstrap, ctx.seed)
    return rows, status + [{"model": model, "signal": name, "status": "ran", "reason": ""}]


def _signal_table(signals: Sequence[str], status: list[dict]) -> pd.DataFrame:
    """Each configured signal: access, description and where (and why) it did not run."""
    table = pd.DataFrame([{"signal": s, "access": SIGNALS[s].access,
                           "description": SIGNALS[s].description} for s in signals])
    frame = pd.DataFrame(status, columns=["model", "signal", "status", "reason"])
    not_run = frame[frame.status != "ran"]
    table["not_run_for"] = [", ".join(f"{r.model} ({r.reason})" for r in
                                      not_run[not_run.signal == s].itertuples())
                            for s in table.signal]
    return table


def _utility(ctx: AuditContext, models: Sequence[ModelInfo],
             audits: Mapping[str, ModelAudit]) -> pd.DataFrame:
    """Perplexity on the non-members, then ROUGE-L of the greedy answers where there are."""
    from kdaudit.utility import utility_rows

    n = len(ctx.audit_set.members)
    perplexity = pd.DataFrame([
        {"model": i.id, "metric": "perplexity", "split": "nonmembers",
         "value": float(np.exp(-s.logprob[s.offsets[n]:].mean()))}
        for i in models for s in [audits[i.id].scored.stats]])
    references = [r.response for r in ctx.utility_records]
    return pd.concat([perplexity] + [
        pd.DataFrame(utility_rows(i.id, audits[i.id].responses, references))
        for i in models if audits[i.id].responses is not None], ignore_index=True)


def _riskiest(mia: pd.DataFrame, scores: Mapping[str, pd.DataFrame], records: Sequence[Record],
              n: int = 10) -> pd.DataFrame:
    """Per model, the n records its strongest signal (highest AUC) scores most member-like."""
    columns = ["model", "signal", "rank", "record_id", "member", "score", "category",
               "instruction", "response", "secrets"]
    if mia.empty:
        return pd.DataFrame(columns=columns)
    by_id = {r.id: r for r in records}
    auc = mia[(mia.metric == "auc") & (mia.model != "data")]
    rows = []
    for model, group in auc.groupby("model", sort=False):
        signal = group.loc[group.value.idxmax(), "signal"]
        frame = scores[model].dropna(subset=[signal]).nlargest(n, signal)
        for rank, r in enumerate(frame.itertuples(), start=1):
            rec = by_id[r.record_id]
            rows.append({"model": model, "signal": signal, "rank": rank,
                         "record_id": r.record_id, "member": bool(r.label),
                         "score": float(getattr(r, signal)), "category": rec.category,
                         "instruction": rec.instruction, "response": rec.response,
                         "secrets": list(rec.secrets)})
    return pd.DataFrame(rows, columns=columns)


def _block_rows(models: Sequence[ModelInfo], passes: Mapping[str, ModelPass],
                labels: np.ndarray, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """AUC of the per-block MoPe statistic, per model and block (depth 1 = first block)."""
    rows = []
    for info in models:
        blocks = passes[info.id].blocks
        if blocks is None:
            continue
        for depth, values in enumerate(blocks, start=1):
            m = roc_metrics(values, labels, n_bootstrap=n_bootstrap, seed=seed)
            rows.append({"model": info.id, "block": depth, "n_blocks": len(blocks),
                         "auc": m["auc"], "ci_low": m["auc_ci"][0], "ci_high": m["auc_ci"][1]})
    return pd.DataFrame(rows, columns=["model", "block", "n_blocks", "auc", "ci_low", "ci_high"])


def _memorization(models: Sequence[ModelInfo], ctx: AuditContext,
                  audits: Mapping[str, ModelAudit]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Match rate / gap, longest prefix, full extraction, secrets and teacher-conditional rate."""
    columns = ["model", "metric", "split", "value", "n"]
    generations = {i.id: audits[i.id].generations for i in models
                   if audits[i.id].generations is not None}
    if not generations:
        return pd.DataFrame(columns=columns), pd.DataFrame()
    cfg, tokenizer, audit_set = ctx.cfg, ctx.tokenizer, ctx.audit_set
    subset = audit_set.memorization_subset(cfg.memorization_records)
    records = [audit_set.records[i] for i in subset]
    is_member = np.array([i < len(audit_set.members) for i in subset])
    refs = [encode_record(r, tokenizer, ctx.max_length) for r in records]
    refs = [e.input_ids[e.response_start:] for e in refs]
    hidden = [hidden_secrets(r) for r in records]   # a secret the prompt shows is no leak
    rows, example_rows, per_model = [], [], {}
    for info in models:
        if info.id not in generations:
            continue
        gen = generations[info.id]
        if len(gen) != len(records):
            raise ValueError(f"{info.id}: {len(gen)} generations for {len(records)} records")
        m = match_metrics(gen, refs, n=cfg.memorization_tokens)
        decoded = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
        m["secret_extraction"] = secret_hits(decoded, hidden).astype(float)
        m["longest_prefix"] = m["longest_prefix"].astype(float)
        m["fully_extracted"] = m["fully_extracted"].astype(float)
        per_model[info.id] = m
        if audits[info.id].extraction is not None:
            ex = audits[info.id].extraction.set_index("record_id").reindex([r.id for r in records])
            m["targeted_extraction"] = ex["targeted"].to_numpy(dtype=float)
            m["sampled_extraction"] = ex["sampled"].to_numpy(dtype=float)
        for metric in ("match_rate", "longest_prefix", "fully_extracted", "secret_extraction",
                       "targeted_extraction", "sampled_extraction"):
            if metric in m and not np.isnan(m[metric]).all():
                rows += _split_rows(info.id, metric, m[metric], is_member)
        best = np.argsort(-np.where(is_member, m["match_rate"], -1), kind="stable")[:3]
        for i in best:
            if not is_member[i]:
                continue
            r = records[i]
            example_rows.append({"model": info.id, "record_id": r.id, "split": "members",
                                 "instruction": r.instruction, "reference": r.response,
                                 "generation": decoded[i], "match_rate": m["match_rate"][i],
                                 "secrets": list(r.secrets)})
    teacher = next((i.id for i in models if i.role == "teacher" and i.id in per_model), None)
    if teacher is not None:
        reproduced = per_model[teacher]["match_rate"] >= cfg.teacher_threshold
        for info in models:
            if info.id in per_model and info.id != teacher and info.role != "base":
                rate = np.where(reproduced, per_model[info.id]["match_rate"], np.nan)
                rows += _split_rows(info.id, "teacher_conditional_rate", rate, is_member)
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(example_rows)


def _split_rows(model: str, metric: str, values: np.ndarray, is_member: np.ndarray) -> list[dict]:
    """Mean over members, over non-members (NaNs left out) and their gap."""
    out = {}
    for split, sel in (("members", is_member), ("nonmembers", ~is_member)):
        v = values[sel]
        v = v[~np.isnan(v)]
        out[split] = (float(v.mean()) if len(v) else math.nan, len(v))
    gap = out["members"][0] - out["nonmembers"][0]
    return [{"model": model, "metric": metric, "split": s, "value": v, "n": n}
            for s, (v, n) in out.items()] + [
        {"model": model, "metric": metric, "split": "gap", "value": gap,
         "n": out["members"][1] + out["nonmembers"][1]}]
