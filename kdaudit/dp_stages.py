"""The DP students' stages of a run (docs/methods.md §7): DP teachers, synthetic data, and the DP
students, one per (method, ε) of `cfg.dp.epsilons`. `Pipeline` mixes this in; the recipes
themselves are in `kdaudit.dp.students`, which `kdaudit student` shares."""
from __future__ import annotations

import json
from typing import Any

from kdaudit.audit import ModelInfo
from kdaudit.data import records as rec
from kdaudit.data.canaries import read_canaries, training_records
from kdaudit.data.template import encode_record
from kdaudit.dp import students as dps
from kdaudit.models import load_model
from kdaudit.train.methods import METHODS


class DPStages:
    """Needs the Pipeline's cfg, dir, hashes, stage(), fit_stage(), split() and tokenizer."""

    def public_methods(self) -> list[str]:
        """The run's students that train on the public split (all but the DP methods)."""
        return [m for m in self.cfg.methods if not METHODS[m].privacy]

    def dp_methods(self) -> list[str]:
        """The run's DP students; none where DP-SGD cannot train the family (OPT)."""
        wanted = [m for m in self.cfg.methods if METHODS[m].privacy]
        if wanted and self.dp_unsupported():
            return []
        return wanted

    def dp_unsupported(self) -> str | None:
        """Why DP-SGD cannot train this run's bases, or None."""
        from kdaudit.train.dp import UNSUPPORTED

        for base in ("base_teacher", "base_student"):
            config = self.dir.model(base) / "config.json"
            kind = json.loads(config.read_text()).get("model_type") if config.exists() else None
            if kind in UNSUPPORTED:
                return f"DP-SGD is not available for {kind} models: {UNSUPPORTED[kind]}"
        return None

    def private_records(self) -> list[rec.Record]:
        """What every model trained on members sees: the members and the planted canaries."""
        return self.split("members") + training_records(read_canaries(self.dir.data("canaries")))

    def dp_teacher_ids(self) -> list[tuple[str, str, float]]:
        """(model id, kind, ε) of every DP teacher the run's DP students need, once each."""
        out: dict[str, tuple[str, str, float]] = {}
        for eps in self.cfg.dp.epsilons:
            for m in self.dp_methods():
                t = dps.teacher_id(m, eps)
                if t:
                    out[t] = (t, dps.teacher_kind(m), dps.split_budget(m, eps)["teacher"])
        return list(out.values())

    def dp_models(self) -> list[ModelInfo]:
        out = [ModelInfo(t, "teacher", "base_teacher",
                         f"{self.cfg.models.teacher} fine-tuned on the members "
                         f"{'behind control codes ' if kind == 'control' else ''}with DP-SGD "
                         f"at ε = {eps:g}" if eps != float("inf") else
                         f"{self.cfg.models.teacher} fine-tuned on the members "
                         f"{'behind control codes ' if kind == 'control' else ''}, no noise")
               for t, kind, eps in self.dp_teacher_ids()]
        for eps in self.cfg.dp.epsilons:
            out += [ModelInfo(dps.model_id(m, eps), "student", "base_student",
                              f"{METHODS[m].description}; total ε = {eps:g}")
                    for m in self.dp_methods()]
        return out

    # -- stages ----------------------------------------------------------------------------
    def dp_stages(self) -> None:
        wanted = [m for m in self.cfg.methods if METHODS[m].privacy]
        why = self.dp_unsupported() if wanted else None
        if why:
            self.log(f"[skip] {', '.join(wanted)}: {why}")
            return
        for t, kind, eps in self.dp_teacher_ids():
            self.dp_teacher_stage(t, kind, eps)
        for eps in self.cfg.dp.epsilons:
            if any(METHODS[m].privacy == "synthetic" for m in self.dp_methods()):
                self.synthetic_stage(eps)
            for m in self.dp_methods():
                self.dp_student_stage(m, eps)

    def _delta(self, kind_halved: bool) -> float | None:
        d = self.cfg.dp.delta
        return dps.halve_delta(d, len(self.private_records())) if kind_halved else d

    def dp_teacher_stage(self, model_id: str, kind: str, epsilon: float) -> None:
        """DistilDP's teacher (control codes) or dpkd's, DP-SGD on the members."""
        cfg = self.cfg
        dp = dps.dp_config(epsilon, self._delta(kind == "kd"), cfg.dp.max_grad_norm)

        def examples():
            return dps.teacher_examples(self.private_records(), self.tokenizer,
                                        cfg.data.max_length, control_codes=kind == "control")

        self.fit_stage(model_id, "sft", "base_teacher", examples, cfg.dp_train,
                       {"split": "members", "kind": kind}, dp=dp)

    def synthetic_path(self, epsilon: float):
        return self.dir.data(f"synthetic@{dps.epsilon_tag(epsilon)}")

    def synthetic_stage(self, epsilon: float) -> None:
        """The DP teacher's synthetic records, allocated uniformly over the public split's
        category names."""
        cfg, teacher = self.cfg, dps.model_id("teacher_dp", epsilon)
        out = self.synthetic_path(epsilon)

        def fn():
            categories = [r.category for r in self.split("public")]
            data = dps.synthesize(load_model(self.dir.model(teacher)), self.tokenizer,
                                  categories, cfg.dp.synthetic_records, seed=cfg.seed,
                                  max_new_tokens=cfg.dp.synthetic_tokens,
                                  batch_size=cfg.audit.batch_size,
                                  no_repeat_ngram=cfg.dp.no_repeat_ngram)
            rec.write_jsonl(data.records, out)
            return data.summary()

        self.stage(f"synthetic@{dps.epsilon_tag(epsilon)}",
                   {"teacher": self.hashes[teacher], "n": cfg.dp.synthetic_records,
                    "tokens": cfg.dp.synthetic_tokens, "seed": cfg.seed,
                    "no_repeat_ngram": cfg.dp.no_repeat_ngram}, [out], fn)

    def dp_student_stage(self, method: str, epsilon: float) -> None:
        cfg, spec = self.cfg, METHODS[method]
        teacher = dps.teacher_id(method, epsilon)
        budget = dps.split_budget(method, epsilon)
        tok, n = self.tokenizer, cfg.data.max_length
        if spec.privacy == "synthetic":
            source = self.synthetic_path(epsilon)
            inputs: dict[str, Any] = {"synthetic": self.hashes[source.stem]}

            def examples():
                return [encode_record(r, tok, n) for r in rec.read_jsonl(source)]

            dp, train_cfg = None, cfg.student
        else:
            inputs = {"split": "members"}

            def examples():
                return [encode_record(r, tok, n) for r in self.private_records()]

            dp = dps.dp_config(budget["student"], self._delta(dps.teacher_kind(method) == "kd"),
                               cfg.dp.max_grad_norm)
            train_cfg = cfg.dp_train

        def privacy(own: dict | None) -> dict | None:
            path = self.dir.model(teacher) / "privacy.json" if teacher else None
            spent = json.loads(path.read_text()) if path and path.exists() else None
            return dps.student_privacy(method, epsilon, spent, own)

        self.fit_stage(dps.model_id(method, epsilon), method, "base_student", examples,
                       train_cfg, {**inputs, "epsilon": epsilon},
                       teacher_id=teacher if spec.needs_teacher else None, dp=dp,
                       privacy=privacy)
