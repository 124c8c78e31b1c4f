"""The audit half of a run's stages: score every model once, generate, measure privacy and
utility, assemble the tables and write the report. `Pipeline` (pipeline.py) mixes this in;
the stages read models and data that its training half wrote."""
from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from attacks.mia import ReferenceModels
from kdaudit.audit_inputs import truncation_note
from kdaudit.audit import AuditResult, AuditSet, ModelInfo, ModelPass, assemble, \
    compute_extraction, compute_generations, compute_pass
from kdaudit.data.canaries import read_canaries
from kdaudit.models import load_model, load_tokenizer
from kdaudit.privacy_audit import canary_rows, heuristic_row, spent_delta, spent_rows
from kdaudit.store import atomic_write_json
from kdaudit.train.methods import METHODS


SHOW_SECRETS_RUN = "kdaudit report RUN_DIR --show-secrets"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("kdaudit", "torch", "transformers", "accelerate", "opacus", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class AuditStages:
    """Stages after training; needs the Pipeline's cfg, dir, hashes, stage(), split() and
    tokenizer."""
    def stats_stage(self, model_id: str, population: bool = False, plain: bool = False) -> None:
        """The model's pass over members + non-members (or over the RMIA population); `plain`
        skips the extra passes (references need token statistics only)."""
        cfg = self.cfg
        audit_cfg = dataclasses.replace(cfg.audit, signals=["loss"], block_risk=False) \
            if plain or population else cfg.audit
        which = "population" if population else None

        def fn():
            model = load_model(self.dir.model(model_id))
            tokenizer = load_tokenizer(self.dir.model(model_id)) if model_id == "ref_ext" \
                else self.tokenizer
            records = (self.split("validation") if population else
                       self.split("members") + self.split("nonmembers"))
            result = compute_pass(model, tokenizer, records, audit_cfg,
                                  max_length=cfg.data.max_length, desc=model_id)
            self.dir.stats(model_id, which).parent.mkdir(parents=True, exist_ok=True)
            result.save(self.dir.stats(model_id, which))
            return {"tokens": int(len(result.stats.logprob))}

        a = audit_cfg
        name = f"stats:{model_id}" + (":population" if population else "")
        self.stage(name, {"model": self.hashes[model_id],
                                         "data": self.hashes["data"],
                                         "max_length": cfg.data.max_length,
                                         "lowercase": "lowercase" in a.signals,
                                         "mope": "mope" in a.signals, "blocks": a.block_risk,
                                         "perturbations": [a.perturbations,
                                                           a.perturbation_sigma]},
                   [self.dir.stats(model_id, which)], fn)

    def generations_stage(self, model_id: str) -> None:
        from kdaudit.store import atomic_write_frame
        cfg = self.cfg

        def fn():
            model = load_model(self.dir.model(model_id))
            aset = self.audit_set()
            records = [aset.records[i] for i in
                       aset.memorization_subset(cfg.audit.memorization_records)]
            gen = compute_generations(model, self.tokenizer, records, cfg.audit,
                                      max_length=cfg.data.max_length, desc=f"generate {model_id}")
            ex = compute_extraction(model, self.tokenizer, records, cfg.audit,
                                    max_length=cfg.data.max_length, seed=cfg.seed, desc=model_id)
            atomic_write_frame(self.dir.generations(model_id),
                               ex.assign(tokens=gen)[["record_id", "tokens", "targeted",
                                                      "sampled"]])
            return {"records": len(records)}

        self.stage(f"generate:{model_id}",
                   {"model": self.hashes[model_id], "data": self.hashes["data"],
                    "tokens": cfg.audit.memorization_tokens,
                    "records": cfg.audit.memorization_records,
                    "samples": cfg.audit.extraction_samples,
                    "max_length": cfg.data.max_length},
                   [self.dir.generations(model_id)], fn)

    def responses_stage(self, model_id: str) -> None:
        """Greedy answers to the first `audit.utility_records` non-member prompts (ROUGE-L)."""
        from kdaudit.store import atomic_write_frame
        from kdaudit.utility import greedy_responses

        a = self.cfg.audit

        def fn():
            records = self.split("nonmembers")[:a.utility_records]
            answers = greedy_responses(load_model(self.dir.model(model_id)), self.tokenizer,
                                       records, max_new_tokens=a.utility_tokens,
                                       batch_size=a.batch_size,
                                       max_length=self.cfg.data.max_length)
            atomic_write_frame(self.dir.responses(model_id), pd.DataFrame(
                {"record_id": [r.id for r in records], "response": answers,
                 "reference": [r.response for r in records]}))
            return {"records": len(records)}

        self.stage(f"responses:{model_id}", {"model": self.hashes[model_id],
                                             "data": self.hashes["data"],
                                             "n": a.utility_records, "tokens": a.utility_tokens,
                                             "max_length": self.cfg.data.max_length},
                   [self.dir.responses(model_id)], fn)

    def training_table(self) -> pd.DataFrame:
        """Every trained model's training log (loss and the method's parts per step)."""
        frames = []
        for m in self.models():
            log = self.dir.model(m.id) / "train_log.jsonl"
            if m.role != "base" and log.exists():
                rows = [json.loads(line) for line in log.read_text().splitlines() if line]
                frames.append(pd.DataFrame(rows).assign(model=m.id))
        if not frames:
            return pd.DataFrame(columns=["model", "step", "loss"])
        table = pd.concat(frames, ignore_index=True)
        return table[["model", *[c for c in table.columns if c != "model"]]]

    def privacy_stage(self, model_id: str) -> None:
        """Canary exposure, the one-run ε bound and the heuristic ε estimate of one model."""
        cfg, a = self.cfg, self.cfg.audit

        def fn():
            canaries = read_canaries(self.dir.data("canaries"))
            rows = spent_rows(model_id, self.dir.model(model_id))
            if canaries:
                model = load_model(self.dir.model(model_id))
                rows += canary_rows(model_id, model, self.tokenizer, canaries,
                                    candidates=a.canary_candidates,
                                    k_fraction=a.canary_guess_fraction,
                                    max_length=cfg.data.max_length, batch_size=a.batch_size,
                                    seed=cfg.seed,
                                    delta=spent_delta(self.dir.model(model_id)))
            scores = -ModelPass.load(self.dir.stats(model_id)).stats.nll()
            rows.append(heuristic_row(model_id, scores, self.audit_set().labels, cfg.seed,
                                      "loss"))
            atomic_write_json(self.dir.privacy(model_id), rows)
            return {}

        self.stage(f"privacy:{model_id}", {"model": self.hashes[model_id],
                                           "stats": self.hashes[f"stats:{model_id}"],
                                           "data": self.hashes["data"],
                                           "candidates": a.canary_candidates,
                                           "guess": a.canary_guess_fraction},
                   [self.dir.privacy(model_id)], fn)

    def reference_ids(self) -> dict[str, list[str]]:
        """Audited model → its reference models (teacher: reference teachers; a KD student:
        students distilled by the same method from the reference teachers)."""
        k = range(self.cfg.reference_models)
        out = {"teacher": [f"ref_teacher_{i}" for i in k]} if k else {}
        for m in self.public_methods():
            if k and METHODS[m].needs_teacher:
                out[m] = [f"ref_{m}_{i}" for i in k]
        return out

    def reference_models(self) -> dict[str, ReferenceModels]:
        """LiRA / RMIA inputs from the stored passes; the validation split is the RMIA
        population (public records the target's training never used)."""
        ids = [r.id for r in self.audit_set().records]
        out = {}
        for target, refs in self.reference_ids().items():
            logq, included, pop = [], [], []
            for k, ref in enumerate(refs):
                logq.append(-ModelPass.load(self.dir.stats(ref)).stats.nll())
                inside = {r.id for r in self.split(f"reference_{k}")}
                included.append([i in inside for i in ids])
                pop.append(-ModelPass.load(self.dir.stats(ref, "population")).stats.nll())
            pop_target = -ModelPass.load(self.dir.stats(target, "population")).stats.nll()
            out[target] = ReferenceModels(np.array(logq), np.array(included, dtype=bool),
                                          pop_target, np.array(pop))
        return out

    def audit_set(self) -> AuditSet:
        return AuditSet(self.split("members"), self.split("nonmembers"))

    def models(self) -> list[ModelInfo]:
        out = [ModelInfo("teacher", "teacher", "base_teacher",
                         f"{self.cfg.models.teacher} fine-tuned on the members")]
        for m in self.public_methods():
            role = "baseline" if m == "nokd" else "student"
            out.append(ModelInfo(m, role, "base_student", METHODS[m].description))
        out += self.dp_models()
        out += [ModelInfo("base_teacher", "base", None, f"{self.cfg.models.teacher} before "
                          f"fine-tuning (never saw members)"),
                ModelInfo("base_student", "base", None, f"{self.cfg.models.student} before "
                          f"distillation (never saw members)")]
        return out

    def assemble(self) -> AuditResult:
        models = self.models()
        passes = {m.id: ModelPass.load(self.dir.stats(m.id)) for m in models}
        gens, extraction = {}, {}
        for m in models:
            path = self.dir.generations(m.id)
            if m.role != "base" and path.exists():
                frame = pd.read_parquet(path)
                gens[m.id] = [list(map(int, t)) for t in frame.tokens]
                extraction[m.id] = frame[["record_id", "targeted", "sampled"]]
        external, per_byte = self.external_pass()
        result = assemble(models, self.audit_set(), passes, gens, self.tokenizer,
                          self.cfg.audit, max_length=self.cfg.data.max_length,
                          references=self.reference_models(),
                          external=external, external_per_byte=per_byte,
                          extraction=extraction, seed=self.cfg.seed,
                          config=self.cfg.to_dict())
        rows = [row for m in models if self.dir.privacy(m.id).exists()
                for row in json.loads(self.dir.privacy(m.id).read_text())]
        result.privacy = pd.DataFrame(rows, columns=["model", "metric", "value", "note"])
        result.training = self.training_table()
        from kdaudit.utility import utility_rows

        utility = [result.utility]
        for m in models:
            path = self.dir.responses(m.id)
            if m.role != "base" and path.exists():
                frame = pd.read_parquet(path)
                utility.append(pd.DataFrame(utility_rows(m.id, list(frame.response),
                                                         list(frame.reference))))
        result.utility = pd.concat(utility, ignore_index=True)
        truncated = truncation_note(self.audit_set().records, self.tokenizer,
                                    self.cfg.data.max_length, "the run's data.max_length")
        result.notes = [truncated] if truncated else []
        return result

    def audit_stage(self) -> AuditResult:
        from kdaudit.store import atomic_write_frame

        holder: dict[str, AuditResult] = {}
        upstream = {k: v for k, v in self.hashes.items() if ":" in k}

        def fn():
            result = self.assemble()
            result.write_tables(self.dir.root / "tables")
            for model_id, frame in result.scores.items():
                atomic_write_frame(self.dir.scores(model_id), frame)
            holder["result"] = result
            return {}

        self.stage("audit", {"upstream": upstream, "audit": self.cfg.audit.__dict__},
                   [self.dir.table("mia")], fn)
        return holder.get("result") or self.assemble()

    def report_stage(self, result: AuditResult) -> dict[str, Path]:
        paths: dict[str, Path] = {}

        def fn():
            info = {"run": self.cfg.name, "seed": self.cfg.seed,
                    "stage seconds": {k: v.get("seconds") for k, v in
                                      self.manifest.data["stages"].items()},
                    "versions": versions()}
            paths.update(result.write_report(self.dir.report, title=f"kdaudit risk report: "
                                             f"{self.cfg.name}", run_info=info,
                                             redact=self.cfg.audit.redact,
                                             show_secrets_hint=SHOW_SECRETS_RUN))
            return {}

        self.stage("report", {"audit": self.hashes["audit"], "redact": self.cfg.audit.redact},
                   [self.dir.report / "report.html", self.dir.report / "report.md"], fn)
        return paths or {"html": self.dir.report / "report.html",
                         "md": self.dir.report / "report.md"}
