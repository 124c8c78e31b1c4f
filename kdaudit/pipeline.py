"""The stages of a run, the manifest, and resume.

data → tokenizer → bases → teacher → students → stats (one forward pass per model) →
generations → audit tables → report. Each stage records its input hash in the manifest; a
stage whose hash matches a finished record and whose outputs exist is skipped, so a second
identical command does nothing and an interrupted one resumes (training stages also resume
from their last checkpoint).
"""
from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from kdaudit.audit import AuditResult, ModelPass
from kdaudit.audit_stages import AuditStages, versions
from kdaudit.config import DPConfig, RunConfig, TrainConfig
from kdaudit.data import records as rec
from kdaudit.data.canaries import make_canaries, read_canaries, training_records, \
    write_canaries
from kdaudit.data.corpus import generate_records, person_name
from kdaudit.data.splits import split_records
from kdaudit.data.template import Encoded, encode_record
from kdaudit.dp import dpsgd
from kdaudit.dp_stages import DPStages
from kdaudit.models import is_zoo, load_model, load_tokenizer
from kdaudit.models.bases import cached_base, cached_tokenizer, external_config, \
    pretraining_records
from kdaudit.store import Manifest, RunDir, atomic_write_json, publish_dir, stable_hash
from kdaudit.train import loop
from kdaudit.train.methods import METHODS, method_params

SPLITS = ("members", "nonmembers", "public", "validation")


@dataclass
class RunResult:
    run_dir: Path
    audit: AuditResult
    report: dict[str, Path]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


class Pipeline(AuditStages, DPStages):
    """One run: its config, run directory and manifest."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.dir = RunDir(cfg.run_dir)
        self.dir.root.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.dir.manifest)
        self.manifest.data.update(config=cfg.to_dict(), versions=versions(), seed=cfg.seed)
        self.manifest.save()
        self.hashes: dict[str, str] = {}
        self.log = log
        self._tokenizer = None

    # -- stage mechanics -------------------------------------------------------------------
    def stage(self, name: str, inputs: dict[str, Any], outputs: list[Path],
              fn: Callable[[], dict[str, Any] | None]) -> None:
        h = stable_hash(inputs)
        if self.manifest.is_done(name, h) and all(p.exists() for p in outputs):
            # downstream stages see this stage's inputs and when it ran, so a stage that is
            # recomputed (e.g. its outputs were deleted) makes everything after it rerun
            self.hashes[name] = stable_hash([h, self.manifest.stage(name).get("started")])
            self.log(f"[skip] {name}: done, inputs unchanged")
            return
        self.log(f"[run ] {name}")
        started = time.time()
        self.hashes[name] = stable_hash([h, started])
        self.manifest.mark(name, status="running", input_hash=h, started=started)
        try:
            info = fn() or {}
        except BaseException as e:
            self.manifest.mark(name, status="failed", input_hash=h, started=started,
                               error=f"{type(e).__name__}: {e}")
            raise
        self.manifest.mark(name, status="done", input_hash=h, started=started,
                           seconds=round(time.time() - started, 2), **info)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.dir.tokenizer)
        return self._tokenizer

    def split(self, name: str) -> list[rec.Record]:
        return rec.read_jsonl(self.dir.data(name))

    # -- stages ----------------------------------------------------------------------------
    def data_stage(self) -> None:
        d = self.cfg.data

        def fn():
            if d.source == "builtin":
                exclude = frozenset(person_name(r) for r in pretraining_records(self.cfg))
                pool = generate_records(d.pool_size, self.cfg.seed, exclude_names=exclude)
            else:
                pool = rec.load_records(d.source, mapping=d.mapping)
            s = split_records(pool, n_members=d.n_members, n_nonmembers=d.n_nonmembers,
                              n_public=d.n_public, n_validation=d.n_validation,
                              seed=self.cfg.seed, dedup_ngram=d.dedup_ngram,
                              dedup_threshold=d.dedup_threshold)
            for split, records in s.items():
                rec.write_jsonl(records, self.dir.data(split))
            info = {"sizes": {k: len(v) for k, v in s.items()}, "pool": len(pool)}
            pool_ids = s.members + s.nonmembers
            half: list = []
            for k in range(self.cfg.reference_models):
                # LiRA / RMIA: random halves in complementary pairs, so that every record is
                # IN for half of the references and OUT for the other half
                if k % 2:
                    inside = {r.id for r in half}
                    half = [r for r in pool_ids if r.id not in inside]
                else:
                    half = random.Random(self.cfg.seed * 7907 + k).sample(pool_ids,
                                                                          len(pool_ids) // 2)
                rec.write_jsonl(half, self.dir.data(f"reference_{k}"))
            if d.canaries_repeated or d.canaries_once:
                names = frozenset(r.secrets[0] for r in pool if r.secrets)
                canaries = make_canaries(d.canaries_repeated, d.canary_repeats, d.canaries_once,
                                         seed=self.cfg.seed + 7919, exclude_names=names)
                write_canaries(canaries, self.dir.data("canaries"))
                info["canaries_in_members"] = len(training_records(canaries))
            return info

        outputs = [self.dir.data(s) for s in SPLITS]
        outputs += [self.dir.data(f"reference_{k}") for k in range(self.cfg.reference_models)]
        if d.canaries_repeated or d.canaries_once:
            outputs.append(self.dir.data("canaries"))
        self.stage("data", {"data": d.__dict__, "seed": self.cfg.seed,
                            "references": self.cfg.reference_models}, outputs, fn)

    def tokenizer_stage(self) -> None:
        m = self.cfg.models

        def fn():
            if is_zoo(m.teacher):
                tok = cached_tokenizer(self.cfg, _pretraining_texts(self.cfg))
            else:
                tok = load_tokenizer(m.teacher)
            tmp = self.dir.tokenizer.with_name("tokenizer.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_pretrained(str(tmp))
            publish_dir(tmp, self.dir.tokenizer)
            self._tokenizer = None
            return {"vocab_size": len(tok)}

        self.stage("tokenizer", {"models": m.__dict__, "data": self.cfg.data.pretrain_records,
                                 "seed": self.cfg.data.pretrain_seed},
                   [self.dir.tokenizer / "tokenizer_config.json"], fn)

    def base_stage(self, model_id: str, preset: str) -> None:
        out = self.dir.model(model_id)

        def fn():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if is_zoo(preset):
                src = cached_base(self.cfg, preset, self.tokenizer, _pretraining_texts(self.cfg))
                shutil.copytree(src, tmp)
            elif Path(preset).exists():
                shutil.copytree(preset, tmp)
            else:  # a hub name: materialise it once in the run directory
                load_model(preset).save_pretrained(str(tmp), safe_serialization=True)
            publish_dir(tmp, out)
            return {"source": str(preset)}

        self.stage(model_id, {"preset": preset, "tokenizer": self.hashes["tokenizer"],
                              "pretrain": self.cfg.pretrain.__dict__, "seed": self.cfg.seed},
                   [out / "config.json"], fn)

    def external_stage(self) -> None:
        """`ref_ext`'s independent model, with its own tokenizer, in models/ref_ext."""
        source = self.cfg.models.external
        out = self.dir.model("ref_ext")

        def fn():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if source == "builtin":
                ext = external_config(self.cfg)
                texts = _pretraining_texts(ext)
                tok = cached_tokenizer(ext, texts)
                student = self.cfg.models.student
                preset = student if is_zoo(student) else "gpt2-tiny-student"
                shutil.copytree(cached_base(ext, preset, tok, texts), tmp)
            elif Path(source).exists():
                shutil.copytree(source, tmp)
            else:
                load_model(source).save_pretrained(str(tmp), safe_serialization=True)
                load_tokenizer(source).save_pretrained(str(tmp))
            publish_dir(tmp, out)
            return {"source": source}

        self.stage("ref_ext", {"external": source, "pretrain": self.cfg.pretrain.__dict__,
                               "student": self.cfg.models.student, "seed": self.cfg.seed,
                               "data": [self.cfg.data.pretrain_records,
                                        self.cfg.data.pretrain_seed, self.cfg.models.vocab_size]},
                   [out / "config.json"], fn)

    def external_pass(self) -> tuple[Any, bool]:
        """(token statistics of ref_ext, whether its tokenizer differs from the run's)."""
        if not self.cfg.models.external:
            return None, False
        other = load_tokenizer(self.dir.model("ref_ext"))
        return (ModelPass.load(self.dir.stats("ref_ext")).stats,
                other.get_vocab() != self.tokenizer.get_vocab())

    def train_stage(self, model_id: str, method: str, base_id: str, split: str,
                    teacher_id: str | None = None, seed_offset: int = 0) -> None:
        """A model trained on one split (the teacher on the members, with the canaries)."""
        cfg = self.cfg

        def examples():
            records = self.split(split)
            if model_id == "teacher":   # canaries are planted in the teacher's members only
                records += training_records(read_canaries(self.dir.data("canaries")))
            return [encode_record(r, self.tokenizer, cfg.data.max_length) for r in records]

        self.fit_stage(model_id, method, base_id, examples,
                       cfg.teacher if method == "sft" else cfg.student,
                       {"split": split}, teacher_id=teacher_id, seed_offset=seed_offset)

    def fit_stage(self, model_id: str, method: str, base_id: str,
                  examples: Callable[[], list[Encoded]], train_cfg: TrainConfig,
                  inputs: dict[str, Any], *, teacher_id: str | None = None,
                  dp: DPConfig | None = None, seed_offset: int = 0,
                  privacy: Callable[[dict | None], dict | None] | None = None) -> None:
        """Train `base_id` by `method` on `examples()` into models/<model_id>, as a stage.
        `privacy` turns the loop's DP-SGD spend into the model's privacy.json (a DP student's
        total spend); the spend is also recorded in the manifest."""
        cfg = self.cfg
        out = self.dir.model(model_id)
        seed = cfg.seed + seed_offset
        spec = METHODS[method]
        inputs = {**inputs, "method": method, "base": self.hashes[base_id],
                  "data": self.hashes["data"], "train": train_cfg.__dict__, "seed": seed,
                  "max_length": cfg.data.max_length,
                  "teacher": self.hashes.get(teacher_id) if teacher_id else None,
                  "kd": spec.kd_inputs(cfg.kd) or None,
                  "dp": dp.__dict__ if dp else None}

        def fn():
            tok = self.tokenizer
            model = load_model(self.dir.model(base_id))
            teacher = load_model(self.dir.model(teacher_id)) if teacher_id else None
            validation = [encode_record(r, tok, cfg.data.max_length)
                          for r in self.split("validation")] if spec.adaptive else []
            data = examples()
            plan = dpsgd.plan(len(data), train_cfg.batch_size, train_cfg.epochs, dp) \
                if dp else None
            result = loop.train(model, data, spec, train_cfg, out_dir=out,
                                seed=seed, pad_id=tok.pad_token_id, tokenizer=tok,
                                teacher=teacher,
                                params=method_params(spec, cfg.kd, model.config.model_type),
                                run_key=stable_hash(inputs), mixed_precision=cfg.mixed_precision,
                                desc=f"{model_id} ({method})", validation=validation,
                                max_length=cfg.data.max_length, dp=plan)
            spent = privacy(result.privacy) if privacy else result.privacy
            if spent is not None:
                atomic_write_json(out / "privacy.json", spent)
            return {"steps": result.steps, "first_loss": result.first_loss,
                    "last_loss": result.last_loss, "resumed_from": result.resumed_from,
                    "train_seconds": round(result.seconds, 2),
                    **({"privacy": spent} if spent else {})}

        self.stage(model_id, inputs, [out / "model.safetensors"], fn)

    def run(self) -> RunResult:
        cfg = self.cfg
        self.data_stage()
        self.tokenizer_stage()
        self.base_stage("base_teacher", cfg.models.teacher)
        self.base_stage("base_student", cfg.models.student)
        if cfg.models.external:
            self.external_stage()
            self.stats_stage("ref_ext", plain=True)
        self.train_stage("teacher", "sft", "base_teacher", "members")
        for method in student_order(self.public_methods()):
            spec = METHODS[method]
            self.train_stage(method, method, spec.init_from or "base_student", "public",
                             teacher_id="teacher" if spec.needs_teacher else None)
        references = self.reference_ids()
        for k in range(cfg.reference_models):
            ref_data = f"reference_{k}"
            self.train_stage(f"ref_teacher_{k}", "sft", "base_teacher", ref_data,
                             seed_offset=k + 1)
            for method in self.public_methods():
                spec = METHODS[method]
                if spec.needs_teacher:
                    self.train_stage(f"ref_{method}_{k}", method,
                                     spec.init_from or "base_student", "public",
                                     teacher_id=f"ref_teacher_{k}", seed_offset=k + 1)
        self.dp_stages()
        for m in self.models():
            self.stats_stage(m.id)
        for target, refs in references.items():
            for model_id in (target, *refs):
                self.stats_stage(model_id, population=True)
            for ref in refs:
                self.stats_stage(ref, plain=True)
        for m in self.models():
            if m.role != "base":
                self.generations_stage(m.id)
                self.privacy_stage(m.id)
                if cfg.audit.utility_records:
                    self.responses_stage(m.id)
        result = self.audit_stage()
        report = self.report_stage(result)
        return RunResult(self.dir.root, result, report, dict(self.manifest.data["stages"]))


def student_order(methods: list[str]) -> list[str]:
    """The students to train, the ones others start from first (MiniLLM starts from nokd,
    which is trained even when not audited)."""
    deps = [METHODS[m].init_from for m in methods if METHODS[m].init_from]
    return list(dict.fromkeys([*deps, *methods]))


def _pretraining_texts(cfg: RunConfig) -> list[str]:
    from kdaudit.data.template import format_text

    return [format_text(r) for r in pretraining_records(cfg)]


@dataclass
class SuiteResult:
    """A run over several model families: one RunResult per family and a suite report."""

    run_dir: Path
    families: dict[str, RunResult]
    report: dict[str, Path]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> RunResult | SuiteResult:
    """Run (or resume) the whole pipeline for `cfg`; see the module docstring. A config with
    `families` runs each family in `<run_dir>/<family>` and adds a suite report."""
    if not cfg.families:
        return Pipeline(cfg, log=log).run()
    results = {}
    for family in cfg.families:
        log(f"== family {family}")
        results[family] = Pipeline(cfg.for_family(family), log=log).run()
    return SuiteResult(cfg.run_dir, results, write_suite(cfg, results))


def write_suite(cfg: RunConfig, results: dict[str, RunResult]) -> dict[str, Path]:
    """The suite report: per family, the leakage heatmaps and a link to its own report."""
    from kdaudit.report import write_suite_report

    families = {f: {"mia": r.audit.mia, "models": r.audit.models, "utility": r.audit.utility,
                    "report": f"../{f}/report/report.html"} for f, r in results.items()}
    return write_suite_report(cfg.run_dir / "report", families,
                              title=f"kdaudit suite report: {cfg.name}")
