"""The Python API beyond `run`: audit any models a user brings; rebuild a run's report."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from kdaudit.audit import AuditContext, AuditResult, AuditSet, ModelInfo, audit_model, \
    assemble, external_pass, reference_models, reference_pass
from kdaudit.audit.privacy import spent_privacy
from kdaudit.audit.inputs import audit_length, check_record_sets, check_tokenizer, \
    model_context, source_config, truncation_note
from kdaudit.config import AuditConfig, ConfigError, config_from_dict
from kdaudit.data.canaries import read_canaries
from kdaudit.data.records import Record, load_records

Source = object   # a model folder, a hub name, or a loaded model
RecordsArg = Sequence[Record] | str | Path


def _role(model_id: str) -> str:
    """The role of a user-named model, by the documented naming convention: "teacher…" is a
    teacher, "nokd" the no-KD baseline, anything else a student."""
    if model_id.startswith("teacher"):
        return "teacher"
    return "baseline" if model_id == "nokd" else "student"


def _records(x: RecordsArg, what: str, mapping: str | None = None) -> list[Record]:
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


def _load(source: Source):
    from kdaudit.models import compute_device, load_model

    return load_model(source, device=compute_device()) if isinstance(source, (str, Path)) \
        else source


def _audit_config(config: AuditConfig | None, signals: Sequence[str] | None,
                  external: Source | None) -> AuditConfig:
    """The audit's config: `signals` replace the config's (AuditConfig checks the names); an
    external model adds ref_ext."""
    cfg = config or AuditConfig()
    if signals is not None:
        cfg = AuditConfig(**{**cfg.__dict__, "signals": list(signals)})
    elif external is not None and "ref_ext" not in cfg.signals:
        cfg = AuditConfig(**{**cfg.__dict__, "signals": [*cfg.signals, "ref_ext"]})
    if "ref_ext" in cfg.signals and external is None and signals is not None:
        raise ConfigError("signal 'ref_ext' needs an independent model: pass external=PATH "
                          "(kdaudit audit --external PATH)")
    return cfg


NEEDS = {"ref_base": ("bases", "a base model (the model before fine-tuning) for at least one "
                              "audited model: bases={...} (kdaudit audit --teacher-base / "
                              "--student-base)"),
         "lira": ("references", "reference models: references={...} (kdaudit audit "
                                "--reference)"),
         "lira_offline": ("references", "reference models: references={...} (kdaudit audit "
                                        "--reference)"),
         "rmia": ("references", "reference models: references={...} (kdaudit audit "
                                "--reference)")}


def _check_signal_inputs(signals: Sequence[str], bases: Mapping | None,
                         references: Mapping | None) -> None:
    """A signal asked for by name whose inputs were not given fails here, before any model
    runs (left to the defaults, such a signal is skipped and the report says so)."""
    given = {"bases": bool(bases), "references": any((references or {}).values())}
    for signal in signals:
        if signal in NEEDS and not given[NEEDS[signal][0]]:
            raise ConfigError(f"signal '{signal}' needs {NEEDS[signal][1]}")


def _info(model_id: str, source: Source, base: str | None) -> ModelInfo:
    """A user's model: its role by name; a kdaudit DP model (privacy.json beside it) is
    private, at the total ε its training spent."""
    spent = spent_privacy(source)
    if spent is None:
        return ModelInfo(model_id, _role(model_id), base)
    eps = spent.get("epsilon")
    return ModelInfo(model_id, _role(model_id), base, method=model_id,
                     epsilon=float("inf") if eps is None else float(eps), private=True)


def _with_bases(models: Mapping[str, Source], bases: Mapping[str, Source] | None
                ) -> tuple[dict[str, Source], list[ModelInfo]]:
    """Every model to score ({id: source}) and its record: one audited base per distinct base
    model, however many models share it."""
    if not models:
        raise ConfigError("audit_models: name at least one model (kdaudit audit --teacher PATH "
                          "or --student NAME=PATH)")
    base_ids: dict[str, str] = {}
    sources: dict[str, Source] = dict(models)
    for mid, base in (bases or {}).items():
        key = str(base) if isinstance(base, (str, Path)) else f"object:{id(base)}"
        if key not in base_ids:
            base_ids[key] = f"base:{mid}"
            sources[f"base:{mid}"] = base
        base_ids[mid] = base_ids[key]
    infos = [_info(mid, src, base_ids.get(mid)) for mid, src in models.items()]
    infos += [ModelInfo(bid, "base", None, f"base model {sources[bid]}")
              for bid in sources if bid not in models]
    return sources, infos


def _context(sources: Mapping[str, Source], refs: Mapping[str, Source], aset: AuditSet,
             tokenizer, max_length: int | None, external: Source | None):
    """(tokenizer, max_length, notes): the length every model can take, the tokenizer (the
    first model folder's unless given), and what the report should say about the inputs."""
    from kdaudit.models import load_tokenizer

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
    return tokenizer, max_length, notes + ([truncated] if truncated else [])


def audit_models(models: Mapping[str, Source], members: RecordsArg, nonmembers: RecordsArg, *,
                 bases: Mapping[str, Source] | None = None, tokenizer=None,
                 signals: Sequence[str] | None = None, config: AuditConfig | None = None,
                 references: Mapping[str, Sequence[tuple[Source, set[str]]]] | None = None,
                 population: RecordsArg | None = None, canaries: str | Path | None = None,
                 external: Source | None = None, max_length: int | None = None, seed: int = 0,
                 mapping: str | None = None) -> AuditResult:
    """Attack every model in `models` ({id: HF folder, hub name or loaded model}).

    An id starting with "teacher" is audited as a teacher, "nokd" as the no-KD baseline, any
    other as a student. `bases` maps a model id to its pre-fine-tuning base, which calibrates
    `ref_base` and is audited too (a base never saw the members: its AUC should sit near
    0.5). `references` maps a model id to its LiRA/RMIA reference models, each with the set
    of record ids it was trained on; `population` (other records of the same distribution)
    enables RMIA; `canaries` (a run's data/canaries.jsonl) adds canary exposure and the
    one-run ε bound; `external` (a model folder or hub name, with its own tokenizer) enables
    `ref_ext`. All models must share one tokenizer (`tokenizer`, or the first model's
    folder's). `max_length` (tokens per record) defaults to the smallest context among the
    models and may not exceed any; longer records lose the start of their prompt, and the
    report says how many. Every input is checked before the first model runs.
    """
    cfg = _audit_config(config, signals, external)
    if signals is not None:
        _check_signal_inputs(cfg.signals, bases, references)
    names = tuple(str(x) if isinstance(x, (str, Path)) else label
                  for x, label in ((members, "members"), (nonmembers, "non-members")))
    aset = AuditSet(_records(members, names[0], mapping), _records(nonmembers, names[1], mapping))
    check_record_sets(aset.members, aset.nonmembers, names=names)
    pop = _records(population, "population", mapping) if population is not None else None
    sources, infos = _with_bases(models, bases)
    references = {mid: rs for mid, rs in (references or {}).items() if rs}
    refs = {f"{mid} reference {k}": ref for mid, rs in references.items()
            for k, (ref, _) in enumerate(rs)}
    tokenizer, max_length, notes = _context(sources, refs, aset, tokenizer, max_length, external)
    planted = read_canaries(canaries) if canaries is not None else []
    if canaries is not None and not planted:
        raise FileNotFoundError(f"{canaries}: no canaries found")
    ctx = AuditContext(aset, tokenizer, cfg, max_length, seed, planted, pop)

    audits = {}
    for info in infos:
        model = _load(sources[info.id])
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ValueError(f"model '{info.id}': its vocabulary is smaller than the tokenizer's "
                             f"({len(tokenizer)}); all audited models must share a tokenizer")
        audits[info.id] = audit_model(ctx, info.id, model, trained=info.role != "base",
                                      folder=sources[info.id], population=info.id in references)
    ref_models = {mid: reference_models(ctx, audits[mid], [
        (reference_pass(ctx, _load(ref), f"reference {k}"), inside)
        for k, (ref, inside) in enumerate(rs)]) for mid, rs in references.items()}
    result = assemble(ctx, infos, audits, references=ref_models,
                      external=_external_pass(ctx, external),
                      config={"audit": cfg.__dict__, "max_length": max_length,
                              "models": {k: str(v) for k, v in sources.items()}})
    result.notes = notes
    return result


def _external_pass(ctx: AuditContext, external: Source | None):
    """`ref_ext`'s statistics and whether to compare per byte (None without a model)."""
    from kdaudit.models import compute_device, load_model, load_tokenizer

    if external is None:
        return None
    return external_pass(ctx, load_model(external, device=compute_device()),
                         load_tokenizer(external))


def report_run(run_dir: str | Path, *, redact: bool = True,
               out: str | Path | None = None) -> dict[str, Path]:
    """Rewrite the run's report from its stored statistics and generations, into `out`:
    by default `run_dir/report/`, or `run_dir/report-with-secrets/` without redaction (a
    separately named folder, so the shareable report is never overwritten by the clear one).
    Nothing else in the run folder is written, so a read-only run reports into `out`."""
    from kdaudit.pipeline import RunContext, roster, scoring
    from kdaudit.store import read_json

    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{run_dir}: no manifest.json; is this a kdaudit run directory?")
    cfg = config_from_dict(read_json(manifest)["config"])
    cfg.out_dir, cfg.name = str(run_dir.parent), run_dir.name
    run = RunContext(cfg, log=lambda _: None)
    missing = [m.id for m in roster.models(run) if not run.dir.stats(m.id).exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: the run has not scored {missing} yet; finish it "
                                f"with `kdaudit run` first")
    out = Path(out) if out else run_dir / ("report" if redact else "report-with-secrets")
    return scoring.assemble_run(run).write_report(
        out, title=f"kdaudit risk report: {cfg.name}", redact=redact,
        show_secrets_hint=scoring.SHOW_SECRETS_RUN)
