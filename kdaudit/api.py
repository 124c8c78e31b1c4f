"""The Python API beyond `run`: audit any models a user brings; rebuild a run's report."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
from typing import Mapping, Sequence

from kdaudit.audit_inputs import audit_length, check_record_sets, check_tokenizer, \
    model_context, source_config, truncation_note
from kdaudit.audit import AuditResult, AuditSet, ModelInfo, assemble, compute_extraction, \
    compute_generations, compute_pass
from attacks.mia import SIGNALS, ReferenceModels
from kdaudit.config import AuditConfig, config_from_dict
from kdaudit.data.canaries import read_canaries
from kdaudit.data.records import Record, load_records
from kdaudit.privacy_audit import canary_rows, heuristic_row, spent_delta, spent_rows



def _role(model_id: str) -> str:
    if model_id.startswith("teacher"):
        return "teacher"
    if model_id == "nokd":
        return "baseline"
    return "base" if model_id.startswith("base") else "student"


def _records(x: Sequence[Record] | str | Path, what: str,
             mapping: str | None = None) -> list[Record]:
    records = load_records(x, mapping=mapping) if isinstance(x, (str, Path)) else list(x)
    if not records:
        raise ValueError(f"{what}: no records")
    bad = next((r for r in records if not isinstance(r, Record)), None)
    if bad is not None:
        raise ValueError(f"{what}: expected Record objects (kdaudit.load_records) or a file "
                         f"path, got {type(bad).__name__}")
    return records


def read_inclusion(path: str | Path) -> set[str]:
    """A reference model's training-set membership: a text file of record ids, one per line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: inclusion mask file not found (expected one record "
                                f"id per line)")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def audit_models(models: Mapping[str, object], members: Sequence[Record] | str | Path,
                 nonmembers: Sequence[Record] | str | Path, *,
                 bases: Mapping[str, object] | None = None, tokenizer=None,
                 signals: Sequence[str] | None = None, config: AuditConfig | None = None,
                 references: Mapping[str, Sequence[tuple[object, set[str]]]] | None = None,
                 population: Sequence[Record] | str | Path | None = None,
                 canaries: str | Path | None = None, external: str | Path | None = None,
                 max_length: int | None = None, seed: int = 0,
                 mapping: str | None = None) -> AuditResult:
    """Attack every model in `models` ({id: HF folder, hub name or loaded model}).

    `bases` maps a model id to its pre-fine-tuning base, which calibrates `ref_base` and is
    audited too (a base never saw the members: its AUC should sit near 0.5). `references`
    maps a model id to its LiRA/RMIA reference models, each with the set of record ids it was
    trained on; `population` (other records of the same distribution) enables RMIA;
    `canaries` (a run's data/canaries.jsonl) adds canary exposure and the one-run ε bound;
    `external` (a model folder or hub name, with its own tokenizer) enables `ref_ext`.
    All models must share one tokenizer (`tokenizer`, or the first model's folder's).
    `max_length` (tokens per record) defaults to the smallest context among the models and
    may not exceed any; longer records lose the start of their prompt, and the report says
    how many. Every input is checked before the first model runs.
    """
    from kdaudit.models import load_model, load_tokenizer

    cfg = config or AuditConfig()
    if signals is not None:
        cfg = AuditConfig(**{**cfg.__dict__, "signals": list(signals)})
    if external is not None and signals is None and "ref_ext" not in cfg.signals:
        cfg = AuditConfig(**{**cfg.__dict__, "signals": [*cfg.signals, "ref_ext"]})
    unknown = [s for s in cfg.signals if s not in SIGNALS]
    if unknown:
        raise ValueError(f"unknown signal(s) {unknown}; available: {sorted(SIGNALS)}")
    if "ref_ext" in cfg.signals and external is None and signals is not None:
        raise ValueError("signal 'ref_ext' needs an independent model: pass external=PATH")
    names = tuple(str(x) if isinstance(x, (str, Path)) else label
                  for x, label in ((members, "members"), (nonmembers, "non-members")))
    aset = AuditSet(_records(members, names[0], mapping), _records(nonmembers, names[1], mapping))
    check_record_sets(aset.members, aset.nonmembers, names=names)
    pop = _records(population, "population", mapping) if population is not None else None
    # one audited base per distinct base model, however many models share it
    base_ids: dict[str, str] = {}
    sources: dict[str, object] = dict(models)
    for mid, base in (bases or {}).items():
        key = str(base) if isinstance(base, (str, Path)) else f"object:{id(base)}"
        if key not in base_ids:
            base_ids[key] = f"base:{mid}"
            sources[f"base:{mid}"] = base
        base_ids[mid] = base_ids[key]
    infos = [ModelInfo(mid, _role(mid), base_ids.get(mid)) for mid in models]
    infos += [ModelInfo(bid, "base", None, f"base model {sources[bid]}")
              for bid in sources if bid not in models]
    refs = {f"{mid} reference {k}": ref for mid, rs in (references or {}).items()
            for k, (ref, _) in enumerate(rs)}
    contexts = {mid: model_context(source_config(src))
                for mid, src in {**sources, **refs,
                                 **({"external": external} if external else {})}.items()}
    max_length, why = audit_length(contexts, max_length)
    first = None      # the model whose tokenizer the audit uses, when it is read from one
    if tokenizer is None:
        first = next((s for s in sources.values() if isinstance(s, (str, Path))), None)
        if first is None:
            raise ValueError("audit_models: pass `tokenizer` when every model is an object")
        tokenizer = load_tokenizer(first)
    notes = [n for mid, src in {**sources, **refs}.items()
             if src is not first and (n := check_tokenizer(mid, src, tokenizer))]
    truncated = truncation_note(aset.records, tokenizer, max_length, why)
    notes += [truncated] if truncated else []
    planted = read_canaries(canaries) if canaries is not None else []
    if canaries is not None and not planted:
        raise FileNotFoundError(f"{canaries}: no canaries found")

    mem_records = [aset.records[i] for i in aset.memorization_subset(cfg.memorization_records)]
    passes, gens, extraction, privacy = {}, {}, {}, []
    for info in infos:
        src = sources[info.id]
        model = load_model(src) if isinstance(src, (str, Path)) else src
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ValueError(f"model '{info.id}': its vocabulary is smaller than the tokenizer's "
                             f"({len(tokenizer)}); all audited models must share a tokenizer")
        passes[info.id] = compute_pass(model, tokenizer, aset.records, cfg,
                                       max_length=max_length, desc=info.id)
        privacy += spent_rows(info.id, src)   # a kdaudit DP model's privacy.json
        if info.role != "base":
            gens[info.id] = compute_generations(model, tokenizer, mem_records, cfg,
                                                max_length=max_length,
                                                desc=f"generate {info.id}")
            extraction[info.id] = compute_extraction(model, tokenizer, mem_records, cfg,
                                                     max_length=max_length, seed=seed,
                                                     desc=info.id)
            if planted:
                privacy += canary_rows(info.id, model, tokenizer, planted,
                                       candidates=cfg.canary_candidates,
                                       k_fraction=cfg.canary_guess_fraction,
                                       max_length=max_length, batch_size=cfg.batch_size,
                                       seed=seed, delta=spent_delta(src))
            privacy.append(heuristic_row(info.id, -passes[info.id].stats.nll(), aset.labels,
                                         seed, "loss"))
    ext_stats, ext_per_byte = None, False
    if external is not None:
        ext_tok = load_tokenizer(external)
        ext_stats = compute_pass(load_model(external), ext_tok, aset.records, _plain(cfg),
                                 max_length=max_length, desc="external").stats
        ext_per_byte = ext_tok.get_vocab() != tokenizer.get_vocab()
    ref_models = {mid: _reference_models(rs, passes[mid], aset, pop, sources[mid], tokenizer,
                                         cfg, max_length)
                  for mid, rs in (references or {}).items() if rs}
    result = assemble(infos, aset, passes, gens, tokenizer, cfg, references=ref_models,
                      extraction=extraction, max_length=max_length, seed=seed,
                      external=ext_stats, external_per_byte=ext_per_byte,
                      config={"audit": cfg.__dict__, "max_length": max_length,
                              "models": {k: str(v) for k, v in sources.items()}})
    result.privacy = pd.DataFrame(privacy, columns=["model", "metric", "value", "note"])
    result.notes = notes
    return result


def _reference_models(refs, target_pass, aset: AuditSet, population, target, tokenizer,
                      cfg: AuditConfig, max_length: int) -> ReferenceModels:
    """Mean response log-probabilities of K references (and the target) for LiRA / RMIA."""
    from kdaudit.models import load_model

    ids = [r.id for r in aset.records]
    logq, included, pop_logq = [], [], []
    as_model = (lambda m: load_model(m) if isinstance(m, (str, Path)) else m)
    for k, (ref, inside) in enumerate(refs):
        model = as_model(ref)
        logq.append(-compute_pass(model, tokenizer, aset.records, _plain(cfg),
                                  max_length=max_length, desc=f"reference {k}").stats.nll())
        included.append([i in inside for i in ids])
        if population is not None:
            pop_logq.append(-compute_pass(model, tokenizer, population, _plain(cfg),
                                          max_length=max_length,
                                          desc=f"reference {k} population").stats.nll())
    pop_target = None
    if population is not None:
        pop_target = -compute_pass(as_model(target), tokenizer, population, _plain(cfg),
                                   max_length=max_length, desc="target population").stats.nll()
    return ReferenceModels(np.array(logq), np.array(included, dtype=bool),
                           pop_target, np.array(pop_logq) if pop_logq else None)


def _plain(cfg: AuditConfig) -> AuditConfig:
    """The audit config without the extra passes: references need token statistics only."""
    return dataclasses.replace(cfg, signals=["loss"], block_risk=False)


def report_run(run_dir: str | Path, *, redact: bool = True) -> dict[str, Path]:
    """Rewrite `run_dir/report/` from the run's stored statistics and generations."""
    from kdaudit.pipeline import Pipeline

    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{run_dir}: no manifest.json; is this a kdaudit run directory?")
    cfg = config_from_dict(json.loads(manifest.read_text())["config"])
    cfg.out_dir, cfg.name = str(run_dir.parent), run_dir.name
    pipe = Pipeline(cfg, log=lambda _: None)
    missing = [m.id for m in pipe.models() if not pipe.dir.stats(m.id).exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: the run has not scored {missing} yet; finish it "
                                f"with `kdaudit run` first")
    from kdaudit.audit_stages import SHOW_SECRETS_RUN

    return pipe.assemble().write_report(run_dir / "report", title=f"kdaudit risk report: "
                                        f"{cfg.name}", redact=redact,
                                        show_secrets_hint=SHOW_SECRETS_RUN)
