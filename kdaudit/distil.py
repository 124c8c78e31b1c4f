"""Train one model outside a pipeline run: a teacher (optionally with DP-SGD) or a student
by any KD method, from your own bases and data.

A `TeacherJob` or `StudentJob` holds what one run needs and checks the arguments when it is
made (the messages name the `kdaudit teacher` / `kdaudit student` flags); `train_teacher` and
`train_student` run it.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from kdaudit.config import ConfigError, DPConfig, DPSGDOptions, KDConfig, RunConfig, \
    TrainConfig, validate_train
from kdaudit.data.lm_corpus import lm_examples
from kdaudit.data.records import Record, load_records
from kdaudit.data.template import encode_record
from kdaudit.models import load_model, load_tokenizer
from kdaudit.store import read_json, stable_hash
from kdaudit.train import loop
from kdaudit.train.methods import METHODS, method_params

Data = Sequence[Record] | str | Path   # records, or a file, folder or hub name holding them


def student_methods() -> list[str]:
    return sorted(k for k, m in METHODS.items() if m.student)


@dataclass
class TeacherJob(DPSGDOptions):
    """A teacher fine-tuned from `base` on `data` (the private records) into `out`; with `dp`,
    by DP-SGD: Gaussian noise solved from `epsilon` (default DPConfig's), or LMO-DP noise
    (`mechanism` "lmo") from the `lmo_params` file. `dp` may also be a whole `DPConfig`."""
    base: str | Path
    data: Data
    out: str | Path
    dp: bool | DPConfig = False
    epsilon: float | None = None
    delta: float | None = None
    mechanism: str = "gaussian"
    lmo_params: str | Path | None = None
    tokenizer: str | Path | None = None         # default: the base's
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3.0))
    max_length: int = 512
    seed: int = 0
    mapping: str | None = None
    dp_config: DPConfig | None = field(init=False, default=None)   # made from the above

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_train(self.train, "train")
        if isinstance(self.dp, DPConfig):    # checked by DPConfig itself
            self.dp_config = self.dp
            return
        lmo = self.mechanism == "lmo"
        for wrong, message in (
                (lmo and not self.dp, "--mechanism lmo is a DP-SGD noise mechanism: add --dp"),
                (lmo and self.lmo_params is None,
                 "--mechanism lmo needs --lmo-params FILE (an LMO-DP parameter file, e.g. "
                 "kdaudit/dp/lmo_reference.toml)"),
                (self.lmo_params is not None and not lmo,
                 "--lmo-params goes with --mechanism lmo"),
                (lmo and self.epsilon is not None,
                 "--epsilon does not apply to --mechanism lmo: its noise is set by "
                 "--lmo-params, and the epsilon it claims is reported after training")):
            if wrong:
                raise ConfigError(message)
        self.dp_config = DPConfig(
            **({"epsilon": self.epsilon} if self.epsilon is not None else {}),
            delta=self.delta, mechanism=self.mechanism,
            lmo_params=str(self.lmo_params) if lmo else None,
            **self.dp_sgd_options()) if self.dp else None


@dataclass
class StudentJob(DPSGDOptions):
    """A student of `method` trained from `student_base` into `out`.

    KD methods distil `teacher` on `data` (the public split); DistiLLM's validation records
    are `validation`, else 10% of `data` (at most 100). The DP methods (docs/methods.md §7,
    recipes in `kdaudit.dp.students`) train from the private records `data` at the total
    budget `epsilon` (`inf`: the same recipe without noise): distildp / synthetic_only learn
    from `synthetic_records` records a DP teacher writes (over `categories`, default the
    builtin corpus's public category names) with `train`; dpsgd_student and dpkd train by
    DP-SGD with `dp_train`. Their DP teacher is trained from `teacher_base` into
    `<out>-teacher` (with `dp_train`), or `teacher` is one already trained for the method.
    The tokenizer is `tokenizer`, else the student base's; teacher and student share it.
    """
    method: str
    student_base: str | Path
    data: Data
    out: str | Path
    teacher: str | Path | None = None
    validation: Data | None = None              # DistiLLM's schedule (non-DP methods)
    tokenizer: str | Path | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3.0))
    kd: KDConfig = field(default_factory=KDConfig)
    max_length: int = 512
    seed: int = 0
    mapping: str | None = None
    mixed_precision: str = "no"                 # non-DP methods
    # the DP methods only
    epsilon: float | None = None
    teacher_base: str | Path | None = None
    delta: float | None = None
    dp_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=8.0, lr=2e-3, batch_size=64))
    synthetic_records: int = 1000
    synthetic_tokens: int = 160
    no_repeat_ngram: int = 0
    categories: Sequence[str] | None = None

    def __post_init__(self) -> None:
        validate_train(self.train, "train")
        validate_train(self.dp_train, "dp_train")
        method = self.method
        if method not in METHODS or not METHODS[method].student:
            raise ConfigError(f"--method: unknown method {method!r}; expected one of "
                              f"{student_methods()}")
        if METHODS[method].privacy:
            self._check_private()
        else:
            given = [flag for flag, v in (("--epsilon", self.epsilon),
                                          ("--teacher-base", self.teacher_base),
                                          ("--delta", self.delta),
                                          ("--categories", self.categories)) if v is not None]
            if given:
                raise ConfigError(f"{', '.join(given)}: only for the DP methods (distildp, "
                                  f"synthetic_only, dpsgd_student, dpkd)")
            if METHODS[method].needs_teacher and self.teacher is None:
                raise ConfigError(f"method '{method}' distils from a teacher: give --teacher "
                                  f"PATH")

    def _check_private(self) -> None:
        from kdaudit.dp import students as dps

        method = self.method
        if self.epsilon is None:
            raise ConfigError(f"--method {method}: give the total budget --epsilon E "
                              f"(inf trains the same recipe without noise)")
        if self.validation:
            raise ConfigError(f"--validation: method '{method}' has no validation schedule")
        if dps.teacher_kind(method) and (self.teacher is None) == (self.teacher_base is None):
            raise ConfigError(f"method '{method}' needs a DP teacher: give --teacher-base PATH "
                              f"(it is trained here) or --teacher PATH (one trained already), "
                              f"not both")


def carve_validation(records: Sequence[Record], n: int, seed: int
                     ) -> tuple[list[Record], list[Record]]:
    """(train, validation): `n` records set aside by a seeded draw, for DistiLLM's schedule."""
    if not 0 < n < len(records):
        raise ValueError(f"cannot carve {n} validation records from {len(records)}")
    held = set(random.Random(seed).sample(range(len(records)), n))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def _training_records(data: Data, mapping: str | None) -> list[Record]:
    """Records from a file, folder or hub name (or a list as given); none is an error."""
    records = load_records(data, mapping=mapping) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise ValueError(f"{data}: no training records")
    return records


def train_teacher(job: TeacherJob | None = None, /, **fields) -> loop.TrainResult:
    """Fine-tune a teacher (a `TeacherJob`, or its fields as keywords) and save it to
    `job.out`. With DP-SGD, `out/privacy.json` records the ε spent (PRV, PLD and RDP)."""
    job = job if job is not None else TeacherJob(**fields)
    records = _training_records(job.data, job.mapping)
    tok = load_tokenizer(job.tokenizer or job.base)
    model = load_model(job.base)
    examples = [encode_record(r, tok, job.max_length) for r in records]
    dp = job.dp_config
    return loop.train(loop.TrainJob(
        model, examples, METHODS["sft"], job.train, out_dir=job.out, seed=job.seed,
        pad_id=tok.pad_token_id, tokenizer=tok, desc="teacher",
        run_key=stable_hash([str(job.base), [r.id for r in records],
                             dataclasses.asdict(job.train), job.max_length, job.seed,
                             dataclasses.asdict(dp) if dp else None]),
        max_length=job.max_length, dp=_plan(dp, examples, job.train)))


def _plan(dp: DPConfig | None, examples: Sequence, train: TrainConfig):
    """The DP-SGD plan of a run of the loop on `examples`, or None without DP."""
    from kdaudit.dp.dpsgd import plan_for

    return None if dp is None else plan_for([e.person for e in examples], train.batch_size,
                                            train.epochs, dp)


def train_student(job: StudentJob | str, /, **fields) -> loop.TrainResult:
    """Train a student (a `StudentJob`, or its method and fields:
    `train_student("gkd", teacher=..., student_base=..., data=..., out=...)`) and save it
    (safetensors + tokenizer) to `job.out`; a DP method's `out/privacy.json` holds its total
    ε."""
    from kdaudit.pipeline.prepare import pretraining_texts   # the builtin LM-term corpus

    job = job if isinstance(job, StudentJob) else StudentJob(job, **fields)
    if METHODS[job.method].privacy:
        return _train_private(job)
    spec = METHODS[job.method]
    records = _training_records(job.data, job.mapping)
    held: list[Record] = []
    if spec.adaptive:
        if job.validation is None:
            records, held = carve_validation(records, min(100, max(1, len(records) // 10)),
                                             job.seed)
        else:
            held = (load_records(job.validation, mapping=job.mapping)
                    if isinstance(job.validation, (str, Path)) else list(job.validation))
    tok = load_tokenizer(job.tokenizer or job.student_base)
    model = load_model(job.student_base)
    teacher = load_model(job.teacher) if spec.needs_teacher else None
    encode = [encode_record(r, tok, job.max_length) for r in records]
    params = method_params(spec, job.kd, model.config.model_type)
    return loop.train(loop.TrainJob(
        model, encode, spec, job.train, out_dir=job.out, seed=job.seed,
        pad_id=tok.pad_token_id, tokenizer=tok, teacher=teacher,
        params=params, lm_examples=lm_examples(spec, params, tok, job.max_length,
                                               lambda: pretraining_texts(RunConfig())),
        run_key=stable_hash([job.method, job.seed, str(job.student_base), str(job.teacher),
                             [r.id for r in records], dataclasses.asdict(job.kd),
                             dataclasses.asdict(job.train), job.max_length]),
        mixed_precision=job.mixed_precision, desc=job.method,
        validation=[encode_record(r, tok, job.max_length) for r in held],
        max_length=job.max_length))


def train_private_student(job: StudentJob | str, /, **fields) -> loop.TrainResult:
    """A DP student end to end (`StudentJob` with a DP method):
    `train_private_student("distildp", epsilon=2, teacher_base=..., student_base=..., ...)`."""
    from kdaudit.dp.students import PRIVATE_METHODS

    method = job.method if isinstance(job, StudentJob) else job
    if method not in PRIVATE_METHODS:
        raise ConfigError(f"--method: {method!r} is not a DP method; expected one of "
                          f"{list(PRIVATE_METHODS)}")
    return train_student(job, **fields)


def _train_private(job: StudentJob) -> loop.TrainResult:
    """A DP method's recipe: its DP teacher (trained or given), then the student on the
    teacher's synthetic records or by DP-SGD on the private ones; the total ε composed."""
    from kdaudit.dp import students as dps
    from kdaudit.store import atomic_write_json

    spec, kind, out = METHODS[job.method], dps.teacher_kind(job.method), Path(job.out)
    records = _training_records(job.data, job.mapping)
    tok = load_tokenizer(job.tokenizer or job.student_base)
    delta_each = dps.halve_delta(job.delta, dps.count_units(records, job.unit)) \
        if kind == "kd" else job.delta
    key = [job.method, job.epsilon, job.seed, str(job.student_base), [r.id for r in records],
           job.max_length]
    teacher, teacher_spent = (_dp_teacher(job, records, tok, delta_each, key) if kind
                              else (job.teacher, None))
    teacher_model = load_model(teacher) if kind else None
    dp, cfg = None, job.dp_train
    if spec.privacy == "synthetic":
        records, cfg = _synthetic_records(job, teacher_model, tok), job.train
    else:
        dp = dps.dp_config(dps.split_budget(job.method, job.epsilon)["student"], delta_each,
                           job)
    model = load_model(job.student_base)
    examples = [encode_record(r, tok, job.max_length) for r in records]
    result = loop.train(loop.TrainJob(
        model, examples, spec, cfg, out_dir=out, seed=job.seed, pad_id=tok.pad_token_id,
        tokenizer=tok, teacher=teacher_model if spec.needs_teacher else None,
        params=method_params(spec, job.kd, model.config.model_type),
        run_key=stable_hash([*key, dataclasses.asdict(job.kd), dataclasses.asdict(cfg),
                             str(teacher)]),
        desc=job.method, max_length=job.max_length, dp=_plan(dp, examples, cfg)))
    spent = dps.student_privacy(job.method, job.epsilon, teacher_spent, result.privacy)
    if spent is not None:
        atomic_write_json(out / "privacy.json", spent)
    return dataclasses.replace(result, privacy=spent)


def _dp_teacher(job: StudentJob, records: list[Record], tok, delta: float | None,
                key: list) -> tuple[str | Path, dict | None]:
    """(the DP teacher, what it spent): trained from `job.teacher_base` into
    `<out>-teacher` at the method's share of the budget, or `job.teacher` as given."""
    from kdaudit.dp import students as dps

    teacher, kind = job.teacher, dps.teacher_kind(job.method)
    if teacher is None:
        teacher = Path(f"{Path(job.out)}-teacher")
        examples = dps.teacher_examples(records, tok, job.max_length,
                                        control_codes=kind == "control")
        budget = dps.split_budget(job.method, job.epsilon)["teacher"]
        loop.train(loop.TrainJob(
            load_model(job.teacher_base), examples, METHODS["sft"], job.dp_train,
            out_dir=teacher, seed=job.seed, pad_id=tok.pad_token_id, tokenizer=tok,
            desc=f"{job.method} teacher",
            dp=_plan(dps.dp_config(budget, delta, job), examples, job.dp_train),
            run_key=stable_hash([*key, str(job.teacher_base), kind]),
            max_length=job.max_length))
    spent_file = Path(teacher) / "privacy.json"
    if spent_file.exists():
        return teacher, read_json(spent_file)
    if job.epsilon != float("inf"):
        raise ValueError(f"{teacher}: no privacy.json, so not a DP teacher; train one with "
                         f"`kdaudit teacher --dp` or give --teacher-base")
    return teacher, None


def _synthetic_records(job: StudentJob, teacher_model, tok) -> list[Record]:
    """The DP teacher's synthetic records (DistilDP, synthetic_only), also written to
    `<out>-synthetic.jsonl`."""
    from kdaudit.data.corpus import CATEGORIES
    from kdaudit.data.records import write_jsonl
    from kdaudit.dp import students as dps

    synthetic = dps.synthesize(teacher_model, tok, job.categories or CATEGORIES,
                               job.synthetic_records, seed=job.seed,
                               max_new_tokens=job.synthetic_tokens,
                               no_repeat_ngram=job.no_repeat_ngram)
    write_jsonl(synthetic.records, Path(f"{Path(job.out)}-synthetic.jsonl"))
    return synthetic.records
