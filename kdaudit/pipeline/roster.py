"""Which models a run has: every audited model's record (id, role, base, method, ε), the
students in training order and each audited model's reference models. Pure functions of the
config (and, for DP, of the base models' types)."""
from __future__ import annotations

import json
import math

from kdaudit.audit import ModelInfo
from kdaudit.dp import students as dps
from kdaudit.pipeline.stage import RunContext
from kdaudit.train.methods import METHODS


def public_methods(run: RunContext) -> list[str]:
    """The run's students that train on the public split (all but the DP methods)."""
    return [m for m in run.cfg.methods if not METHODS[m].privacy]


def wanted_dp_methods(run: RunContext) -> list[str]:
    return [m for m in run.cfg.methods if METHODS[m].privacy]


def dp_unsupported(run: RunContext) -> str | None:
    """Why DP-SGD cannot train this run's bases, or None."""
    from kdaudit.train.dp import UNSUPPORTED

    for base in ("base_teacher", "base_student"):
        config = run.dir.model(base) / "config.json"
        kind = json.loads(config.read_text()).get("model_type") if config.exists() else None
        if kind in UNSUPPORTED:
            return f"DP-SGD is not available for {kind} models: {UNSUPPORTED[kind]}"
    return None


def dp_methods(run: RunContext) -> list[str]:
    """The run's DP students; none where DP-SGD cannot train the family (OPT)."""
    wanted = wanted_dp_methods(run)
    return [] if wanted and dp_unsupported(run) else wanted


def student_order(methods: list[str]) -> list[str]:
    """The students to train, the ones others start from first (MiniLLM starts from nokd,
    which is trained even when not audited)."""
    deps = [METHODS[m].init_from for m in methods if METHODS[m].init_from]
    return list(dict.fromkeys([*deps, *methods]))


def dp_teachers(run: RunContext) -> list[tuple[str, str, float]]:
    """(model id, kind, ε) of every DP teacher the run's DP students need, once each."""
    out: dict[str, tuple[str, str, float]] = {}
    for eps in run.cfg.dp.epsilons:
        for m in dp_methods(run):
            t = dps.teacher_id(m, eps)
            if t:
                out[t] = (t, dps.teacher_kind(m), dps.split_budget(m, eps)["teacher"])
    return list(out.values())


# the method name a DP teacher stands under in the privacy-utility frontier
DP_TEACHER_METHOD = {"control": "teacher_dp", "kd": "teacher_dpkd"}


def _dp_teacher_description(teacher: str, kind: str, eps: float) -> str:
    codes = "behind control codes " if kind == "control" else ""
    if eps == math.inf:
        return f"{teacher} fine-tuned on the members {codes}, no noise"
    return f"{teacher} fine-tuned on the members {codes}with DP-SGD at ε = {eps:g}"


def dp_models(run: RunContext) -> list[ModelInfo]:
    """The DP teachers and the DP students, each with its method and ε."""
    name = run.cfg.models.teacher
    out = [ModelInfo(t, "teacher", "base_teacher", _dp_teacher_description(name, kind, eps),
                     method=DP_TEACHER_METHOD[kind], epsilon=eps, private=True)
           for t, kind, eps in dp_teachers(run)]
    for eps in run.cfg.dp.epsilons:
        out += [ModelInfo(dps.model_id(m, eps), "student", "base_student",
                          f"{METHODS[m].description}; total ε = {eps:g}", method=m, epsilon=eps,
                          private=True)
                for m in dp_methods(run)]
    return out


def models(run: RunContext) -> list[ModelInfo]:
    """Every audited model of the run, in report order."""
    cfg = run.cfg
    out = [ModelInfo("teacher", "teacher", "base_teacher",
                     f"{cfg.models.teacher} fine-tuned on the members", method="sft")]
    out += [ModelInfo(m, "baseline" if m == "nokd" else "student", "base_student",
                      METHODS[m].description, method=m) for m in public_methods(run)]
    out += dp_models(run)
    out += [ModelInfo("base_teacher", "base", None, f"{cfg.models.teacher} before "
                      f"fine-tuning (never saw members)"),
            ModelInfo("base_student", "base", None, f"{cfg.models.student} before "
                      f"distillation (never saw members)")]
    return out


def reference_ids(run: RunContext) -> dict[str, list[str]]:
    """Audited model → its reference models (teacher: reference teachers; a KD student:
    students distilled by the same method from the reference teachers)."""
    k = range(run.cfg.reference_models)
    if not k:
        return {}
    out = {"teacher": [f"ref_teacher_{i}" for i in k]}
    for m in public_methods(run):
        if METHODS[m].needs_teacher:
            out[m] = [f"ref_{m}_{i}" for i in k]
    return out
