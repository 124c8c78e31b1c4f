"""The DP students' stages (docs/methods.md §7): DP teachers, synthetic data, and one DP
student per (method, ε) of `cfg.dp.epsilons`. The recipes themselves are in
`kdaudit.dp.students`, which `kdaudit student` shares."""
from __future__ import annotations

from functools import partial
from typing import Callable

from kdaudit.data import records as rec
from kdaudit.data.canaries import read_canaries, training_records
from kdaudit.data.template import Encoded, encode_record
from kdaudit.dp import students as dps
from kdaudit.models import load_model
from kdaudit.pipeline.roster import dp_methods, dp_teachers, dp_unsupported, wanted_dp_methods
from kdaudit.pipeline.stage import RunContext, Stage
from kdaudit.pipeline.training import Fit, fit_stage
from kdaudit.store import read_json
from kdaudit.train.methods import METHODS


def private_records(run: RunContext) -> list[rec.Record]:
    """What every model trained on members sees: the members and the planted canaries."""
    return run.split("members") + training_records(read_canaries(run.dir.data("canaries")))


def _delta(run: RunContext, halved: bool) -> float | None:
    d = run.cfg.dp
    return dps.halve_delta(d.delta, dps.count_units(private_records(run), d.unit)) \
        if halved else d.delta


def dp_teacher_examples(run: RunContext, control_codes: bool) -> list[Encoded]:
    return dps.teacher_examples(private_records(run), run.tokenizer, run.cfg.data.max_length,
                                control_codes=control_codes)


def dp_teacher_stage(run: RunContext, model_id: str, kind: str, epsilon: float) -> Stage:
    """DistilDP's teacher (control codes) or dpkd's, DP-SGD on the members."""
    dp = dps.dp_config(epsilon, _delta(run, kind == "kd"), run.cfg.dp)
    return fit_stage(run, Fit(model_id, "sft", "base_teacher",
                              partial(dp_teacher_examples, run, kind == "control"),
                              run.cfg.dp_train, {"split": "members", "kind": kind}, dp=dp))


def synthetic_name(epsilon: float) -> str:
    return f"synthetic@{dps.epsilon_tag(epsilon)}"


def make_synthetic(run: RunContext, epsilon: float) -> dict:
    """The DP teacher's synthetic records, allocated uniformly over the public split's
    category names."""
    cfg = run.cfg
    teacher = load_model(run.dir.model(dps.model_id("teacher_dp", epsilon)))
    data = dps.synthesize(teacher, run.tokenizer, [r.category for r in run.split("public")],
                          cfg.dp.synthetic_records, seed=cfg.seed,
                          max_new_tokens=cfg.dp.synthetic_tokens, batch_size=cfg.audit.batch_size,
                          no_repeat_ngram=cfg.dp.no_repeat_ngram)
    rec.write_jsonl(data.records, run.dir.data(synthetic_name(epsilon)))
    return data.summary()


def synthetic_stage(run: RunContext, epsilon: float) -> Stage:
    d = run.cfg.dp
    return Stage(synthetic_name(epsilon),
                 {"teacher": run.hashes[dps.model_id("teacher_dp", epsilon)],
                  "n": d.synthetic_records, "tokens": d.synthetic_tokens, "seed": run.cfg.seed,
                  "no_repeat_ngram": d.no_repeat_ngram},
                 [run.dir.data(synthetic_name(epsilon))], partial(make_synthetic, run, epsilon))


def encoded(run: RunContext, records_of) -> list[Encoded]:
    return [encode_record(r, run.tokenizer, run.cfg.data.max_length) for r in records_of()]


def student_privacy(run: RunContext, method: str, epsilon: float,
                    own: dict | None) -> dict | None:
    """The DP student's total spend: its teacher's privacy.json composed with its own."""
    teacher = dps.teacher_id(method, epsilon)
    path = run.dir.model(teacher) / "privacy.json" if teacher else None
    spent = read_json(path) if path and path.exists() else None
    return dps.student_privacy(method, epsilon, spent, own)


def dp_student_stage(run: RunContext, method: str, epsilon: float) -> Stage:
    """A DP student: on the DP teacher's synthetic records (DistilDP), or DP-SGD on the
    private records with the ε its recipe leaves the student."""
    cfg, spec = run.cfg, METHODS[method]
    teacher = dps.teacher_id(method, epsilon)
    if spec.privacy == "synthetic":
        source = partial(rec.read_jsonl, run.dir.data(synthetic_name(epsilon)))
        inputs, train, dp = {"synthetic": run.hashes[synthetic_name(epsilon)]}, cfg.student, None
    else:
        source = partial(private_records, run)
        inputs, train = {"split": "members"}, cfg.dp_train
        dp = dps.dp_config(dps.split_budget(method, epsilon)["student"],
                           _delta(run, dps.teacher_kind(method) == "kd"), cfg.dp)
    return fit_stage(run, Fit(dps.model_id(method, epsilon), method, "base_student",
                              partial(encoded, run, source), train,
                              {**inputs, "epsilon": epsilon},
                              teacher_id=teacher if spec.needs_teacher else None, dp=dp,
                              privacy=partial(student_privacy, run, method, epsilon)))


def dp_stages(run: RunContext) -> list[Callable[[], Stage]]:
    """Builders of every DP stage of the run, in order; none (said in the log) where DP-SGD
    cannot train the run's family. Each is built when its turn comes: it hashes its upstream."""
    wanted = wanted_dp_methods(run)
    why = dp_unsupported(run) if wanted else None
    if why:
        run.log(f"[skip] {', '.join(wanted)}: {why}")
        return []
    stages = [partial(dp_teacher_stage, run, *t) for t in dp_teachers(run)]
    for eps in run.cfg.dp.epsilons:
        if any(METHODS[m].privacy == "synthetic" for m in dp_methods(run)):
            stages.append(partial(synthetic_stage, run, eps))
        stages += [partial(dp_student_stage, run, m, eps) for m in dp_methods(run)]
    return stages
