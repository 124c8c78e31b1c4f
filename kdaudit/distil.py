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
    if spec.needs_teacher and teacher is None:
        raise ConfigError(f"method '{method}' distils from a teacher: give --teacher PATH")
    kd = kd or KDConfig()
    validate_kd(kd)
    records = load_records(data, mapping=mapping) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise ValueError(f"{data}: no training records")
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
    records = load_records(data, mapping=mapping) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise ValueError(f"{data}: no training records")
    tok = load_tokenizer(tokenizer or base)
    model = load_model(base)
    train = train or TrainConfig(epochs=3.0)
    examples = [encode_record(r, tok, max_length) for r in records]
    return loop.train(model, examples, METHODS["sft"], train, out_dir=out, seed=seed,
                      pad_id=tok.pad_token_id, tokenizer=tok, desc="teacher",
                      run_key=stable_hash([str(base), [r.id for r in records],
                                           dataclasses.asdict(train), max_length, seed,
                                           dataclasses.asdict(dp) if dp else None]),
                      max_length=max_length, dp=dp)
