"""Train one model outside a pipeline run: a teacher (optionally with DP-SGD) or a student
by any KD method, from your own bases and data."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Sequence

from kdaudit.config import ConfigError, DPConfig, KDConfig, TrainConfig, validate_kd
from kdaudit.data.records import Record, load_records
from kdaudit.data.template import encode_record
from kdaudit.models import load_model, load_tokenizer
from kdaudit.store import stable_hash
from kdaudit.train import loop
from kdaudit.train.methods import METHODS, method_params


def student_methods() -> list[str]:
    return sorted(k for k, m in METHODS.items() if m.student)


def carve_validation(records: Sequence[Record], n: int, seed: int
                     ) -> tuple[list[Record], list[Record]]:
    """(train, validation): `n` records set aside by a seeded draw, for DistiLLM's schedule."""
    if not 0 < n < len(records):
        raise ValueError(f"cannot carve {n} validation records from {len(records)}")
    held = set(random.Random(seed).sample(range(len(records)), n))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def _training_records(data: Sequence[Record] | str | Path, mapping: str | None
                      ) -> list[Record]:
    """Records from a file, folder or hub name (or a list as given); none is an error."""
    records = load_records(data, mapping=mapping) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise ValueError(f"{data}: no training records")
    return records


def train_student(method: str, *, student_base: str | Path, data: Sequence[Record] | str | Path,
                  out: str | Path, teacher: str | Path | None = None,
                  validation: Sequence[Record] | str | Path | None = None,
                  tokenizer: str | Path | None = None, train: TrainConfig | None = None,
                  kd: KDConfig | None = None, max_length: int = 512, seed: int = 0,
                  mapping: str | None = None, mixed_precision: str = "no") -> loop.TrainResult:
    """Distil `student_base` from `teacher` with `method` on `data` (the public split) and save
    the student (safetensors + tokenizer) to `out`.

    The tokenizer is `tokenizer`, else the student base's; teacher and student must share it.
    DistiLLM needs validation records: `validation`, else 10% of `data` (at most 100).
    """
    if method not in METHODS or not METHODS[method].student:
        raise ConfigError(f"--method: unknown method {method!r}; expected one of "
                          f"{student_methods()}")
    spec = METHODS[method]
    if spec.privacy:
        raise ConfigError(f"method '{method}' is a DP method: use train_private_student "
                          f"(`kdaudit student --method {method} --epsilon E ...`)")
    if spec.needs_teacher and teacher is None:
        raise ConfigError(f"method '{method}' distils from a teacher: give --teacher PATH")
    kd = kd or KDConfig()
    validate_kd(kd)
    records = _training_records(data, mapping)
    held: list[Record] = []
    if spec.adaptive:
        if validation is None:
            records, held = carve_validation(records, min(100, max(1, len(records) // 10)), seed)
        else:
            held = (load_records(validation, mapping=mapping)
                    if isinstance(validation, (str, Path)) else list(validation))
    tok = load_tokenizer(tokenizer or student_base)
    model = load_model(student_base)
    teacher_model = load_model(teacher) if spec.needs_teacher else None
    encode = [encode_record(r, tok, max_length) for r in records]
    return loop.train(model, encode, spec, train or TrainConfig(epochs=3.0), out_dir=out,
                      seed=seed, pad_id=tok.pad_token_id, tokenizer=tok, teacher=teacher_model,
                      params=method_params(spec, kd, model.config.model_type),
                      run_key=stable_hash([method, seed, str(student_base), str(teacher),
                                           [r.id for r in records], dataclasses.asdict(kd),
                                           dataclasses.asdict(train or TrainConfig(epochs=3.0)),
                                           max_length]),
                      mixed_precision=mixed_precision,
                      desc=f"{method}", validation=[encode_record(r, tok, max_length)
                                                    for r in held],
                      max_length=max_length)


def train_teacher(*, base: str | Path, data: Sequence[Record] | str | Path, out: str | Path,
                  dp: DPConfig | None = None, tokenizer: str | Path | None = None,
                  train: TrainConfig | None = None, max_length: int = 512, seed: int = 0,
                  mapping: str | None = None) -> loop.TrainResult:
    """Fine-tune `base` on `data` (the private records) and save it to `out`. With `dp` the
    fine-tuning is DP-SGD and `out/privacy.json` records the ε spent (PRV, PLD and RDP)."""
    records = _training_records(data, mapping)
    tok = load_tokenizer(tokenizer or base)
    model = load_model(base)
    train = train or TrainConfig(epochs=3.0)
    examples = [encode_record(r, tok, max_length) for r in records]
    return loop.train(model, examples, METHODS["sft"], train, out_dir=out, seed=seed,
                      pad_id=tok.pad_token_id, tokenizer=tok, desc="teacher",
                      run_key=stable_hash([str(base), [r.id for r in records],
                                           dataclasses.asdict(train), max_length, seed,
                                           dataclasses.asdict(dp) if dp else None]),
                      max_length=max_length, dp=_plan(dp, examples, train))


def _plan(dp: DPConfig | None, examples: Sequence, train: TrainConfig):
    """The DP-SGD plan of a run of the loop on `examples`, or None without DP."""
    from kdaudit.dp.dpsgd import plan

    return None if dp is None else plan(len(examples), train.batch_size, train.epochs, dp)


def train_private_student(method: str, *, student_base: str | Path,
                          data: Sequence[Record] | str | Path, out: str | Path,
                          epsilon: float, teacher_base: str | Path | None = None,
                          teacher: str | Path | None = None, delta: float | None = None,
                          max_grad_norm: float = 1.0, tokenizer: str | Path | None = None,
                          train: TrainConfig | None = None, dp_train: TrainConfig | None = None,
                          kd: KDConfig | None = None, synthetic_records: int = 1000,
                          synthetic_tokens: int = 160, no_repeat_ngram: int = 0,
                          categories: Sequence[str] | None = None, max_length: int = 512,
                          seed: int = 0, mapping: str | None = None) -> loop.TrainResult:
    """A DP student end to end at total budget `epsilon` (`inf`: the same recipe without
    noise) from the private records `data` (docs/methods.md §7; recipes in `kdaudit.dp.students`).

    distildp / synthetic_only: a DP teacher learns `data` behind control codes, writes
    `synthetic_records` records (`<out>-synthetic.jsonl`, allocated uniformly over
    `categories`, default the builtin corpus's public category names) and the student trains
    on them (`train`). dpsgd_student: DP-SGD of the student on `data` (`dp_train`). dpkd: a DP
    teacher at ε/2 and DP-SGD of the student at ε/2 with the KD loss. The DP teacher is
    trained from `teacher_base` into `<out>-teacher` (`dp_train`), or `teacher` is one already
    trained for this method (its privacy.json is read). `out/privacy.json` holds the total.
    """
    import json

    from kdaudit.data.corpus import CATEGORIES
    from kdaudit.dp import students as dps
    from kdaudit.store import atomic_write_json

    if method not in dps.PRIVATE_METHODS:
        raise ConfigError(f"--method: {method!r} is not a DP method; expected one of "
                          f"{list(dps.PRIVATE_METHODS)}")
    spec, kind, budget = METHODS[method], dps.teacher_kind(method), \
        dps.split_budget(method, epsilon)
    if kind and (teacher is None) == (teacher_base is None):
        raise ConfigError(f"method '{method}' needs a DP teacher: give --teacher-base PATH (it "
                          f"is trained here) or --teacher PATH (one trained already), not both")
    kd, out = kd or KDConfig(), Path(out)
    validate_kd(kd)
    records = _training_records(data, mapping)
    tok = load_tokenizer(tokenizer or student_base)
    dp_train = dp_train or TrainConfig(epochs=8.0, lr=2e-3, batch_size=64)
    delta_each = dps.halve_delta(delta, len(records)) if kind == "kd" else delta
    key = [method, epsilon, seed, str(student_base), [r.id for r in records], max_length]

    teacher_spent = None
    if kind:
        if teacher is None:
            teacher = Path(f"{out}-teacher")
            examples = dps.teacher_examples(records, tok, max_length,
                                            control_codes=kind == "control")
            loop.train(load_model(teacher_base), examples, METHODS["sft"], dp_train,
                       out_dir=teacher, seed=seed, pad_id=tok.pad_token_id, tokenizer=tok,
                       desc=f"{method} teacher",
                       dp=_plan(dps.dp_config(budget["teacher"], delta_each, max_grad_norm),
                                examples, dp_train),
                       run_key=stable_hash([*key, str(teacher_base), kind]),
                       max_length=max_length)
        spent_file = Path(teacher) / "privacy.json"
        if spent_file.exists():
            teacher_spent = json.loads(spent_file.read_text())
        elif epsilon != float("inf"):
            raise ValueError(f"{teacher}: no privacy.json, so not a DP teacher; train one with "
                             f"`kdaudit teacher --dp` or give --teacher-base")
    teacher_model = load_model(teacher) if kind else None

    dp = None
    if spec.privacy == "synthetic":
        data_out = Path(f"{out}-synthetic.jsonl")
        synthetic = dps.synthesize(teacher_model, tok, categories or CATEGORIES,
                                   synthetic_records, seed=seed, max_new_tokens=synthetic_tokens,
                                   no_repeat_ngram=no_repeat_ngram)
        from kdaudit.data.records import write_jsonl

        write_jsonl(synthetic.records, data_out)
        records, cfg = synthetic.records, train or TrainConfig(epochs=3.0)
    else:
        dp = dps.dp_config(budget["student"], delta_each, max_grad_norm)
        cfg = dp_train
    model = load_model(student_base)
    examples = [encode_record(r, tok, max_length) for r in records]
    result = loop.train(model, examples, spec, cfg,
                        out_dir=out, seed=seed, pad_id=tok.pad_token_id, tokenizer=tok,
                        teacher=teacher_model if spec.needs_teacher else None,
                        params=method_params(spec, kd, model.config.model_type),
                        run_key=stable_hash([*key, dataclasses.asdict(kd),
                                             dataclasses.asdict(cfg), str(teacher)]),
                        desc=method, max_length=max_length, dp=_plan(dp, examples, cfg))
    spent = dps.student_privacy(method, epsilon, teacher_spent, result.privacy)
    if spent is not None:
        atomic_write_json(out / "privacy.json", spent)
    return dataclasses.replace(result, privacy=spent)
