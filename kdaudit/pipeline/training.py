"""The training stages: the teacher on the members, the students on the public split, the
reference models LiRA and RMIA need. Every one is a `Fit` run through the one loop."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from kdaudit import distributed
from kdaudit.config import DPConfig, TrainConfig
from kdaudit.data.canaries import read_canaries, training_records
from kdaudit.data.lm_corpus import lm_examples
from kdaudit.data.template import Encoded, encode_record
from kdaudit.dp import dpsgd
from kdaudit.models import load_model
from kdaudit.pipeline.prepare import pretraining_texts
from kdaudit.pipeline.stage import RunContext, Stage
from kdaudit.store import atomic_write_json, stable_hash
from kdaudit.train import loop
from kdaudit.train.methods import METHODS, method_params


@dataclass
class Fit:
    """One model to train: `base_id` by `method` on `examples()` into models/<model_id>.
    `inputs` names what the examples depend on (hashed with the rest); `privacy` turns the
    loop's DP-SGD spend into the model's privacy.json (a DP student's total spend)."""

    model_id: str
    method: str
    base_id: str
    examples: Callable[[], list[Encoded]]
    train: TrainConfig
    inputs: dict[str, Any]
    teacher_id: str | None = None
    dp: DPConfig | None = None
    seed: int | None = None                      # None: the run's seed
    privacy: Callable[[dict | None], dict | None] | None = None


def fit_seed(run: RunContext, fit: Fit) -> int:
    return run.cfg.seed if fit.seed is None else fit.seed


def fit_inputs(run: RunContext, fit: Fit) -> dict[str, Any]:
    """Everything a trained model depends on: its base's and teacher's stages, the data, the
    training config, and only the KD fields its method reads."""
    cfg = run.cfg
    return {**fit.inputs, "method": fit.method, "base": run.hashes[fit.base_id],
            "data": run.hashes["data"], "train": fit.train.__dict__,
            "seed": fit_seed(run, fit), "max_length": cfg.data.max_length,
            "teacher": run.hashes.get(fit.teacher_id) if fit.teacher_id else None,
            "kd": METHODS[fit.method].kd_inputs(cfg.kd) or None,
            # the builtin LM-term corpus is the bases' pretraining texts
            "lm_corpus": [cfg.data.pretrain_records, cfg.data.pretrain_seed]
            if METHODS[fit.method].lm_term and cfg.kd.lm_corpus == "builtin" else None,
            "dp": fit.dp.__dict__ if fit.dp else None}


def make_fit(run: RunContext, fit: Fit, run_key: str) -> dict:
    cfg, tok, spec = run.cfg, run.tokenizer, METHODS[fit.method]
    out = run.dir.model(fit.model_id)
    model = load_model(run.dir.model(fit.base_id))
    validation = [encode_record(r, tok, cfg.data.max_length)
                  for r in run.split("validation")] if spec.adaptive else []
    data = fit.examples()
    params = method_params(spec, cfg.kd, model.config.model_type)
    plan = dpsgd.plan_for([e.person for e in data], fit.train.batch_size, fit.train.epochs,
                          fit.dp) if fit.dp else None
    result = loop.train(loop.TrainJob(
        model, data, spec, fit.train, out_dir=out, seed=fit_seed(run, fit),
        pad_id=tok.pad_token_id, tokenizer=tok,
        teacher=load_model(run.dir.model(fit.teacher_id)) if fit.teacher_id else None,
        params=params, run_key=run_key,
        lm_examples=lm_examples(spec, params, tok, cfg.data.max_length,
                                lambda: pretraining_texts(cfg)),
        mixed_precision=cfg.mixed_precision, desc=f"{fit.model_id} ({fit.method})",
        validation=validation, max_length=cfg.data.max_length, dp=plan,
        private_log=run.dir.private_log(fit.model_id)))
    spent = fit.privacy(result.privacy) if fit.privacy else result.privacy
    if spent is not None and distributed.is_main():
        atomic_write_json(out / "privacy.json", spent)
    losses = {} if plan else {"first_loss": result.first_loss, "last_loss": result.last_loss}
    return {"steps": result.steps, **losses, "resumed_from": result.resumed_from,
            "train_seconds": round(result.seconds, 2), **({"privacy": spent} if spent else {})}


def fit_stage(run: RunContext, fit: Fit) -> Stage:
    inputs = fit_inputs(run, fit)
    return Stage(fit.model_id, inputs, [run.dir.model(fit.model_id) / "model.safetensors"],
                 partial(make_fit, run, fit, stable_hash(inputs)), every_process=True)


def split_examples(run: RunContext, split: str, with_canaries: bool) -> list[Encoded]:
    """A split's records encoded for training; the teacher's members carry the canaries."""
    records = run.split(split)
    if with_canaries:
        records += training_records(read_canaries(run.dir.data("canaries")))
    return [encode_record(r, run.tokenizer, run.cfg.data.max_length) for r in records]


def train_stage(run: RunContext, model_id: str, method: str, split: str, *,
                teacher_id: str | None = None, seed: int | None = None) -> Stage:
    """A model trained on one split: SFT from the teacher's base, a student from its own."""
    spec = METHODS[method]
    base = "base_teacher" if method == "sft" else spec.init_from or "base_student"
    examples = partial(split_examples, run, split, model_id == "teacher")
    return fit_stage(run, Fit(model_id, method, base, examples,
                              run.cfg.teacher if method == "sft"
                              else run.cfg.student_train(method),
                              {"split": split}, teacher_id=teacher_id, seed=seed))
