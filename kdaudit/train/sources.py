"""Where a method's training batches come from: the data half of "a method is a configuration
of the one loop" (the loss is the other half, see `methods.py`).

- ground_truth: the split's own responses (kd, nokd, sft).
- teacher_samples: the teacher answers every prompt once, before the first step (SeqKD).
- student_samples: with probability `on_policy_fraction` (ImitKD 1, GKD ½) or DistiLLM's
  adaptive probability a batch is answered by the student being trained, at that step; with a
  replay buffer, part of such a batch is drawn from earlier student answers.
- mixture: every batch is sampled from (1 − α)·student + α·teacher, with both models' log
  probabilities kept for the loss (MiniLLM).
Sampling draws from one seeded generator whose state is checkpointed with the buffer and the
schedule, so an interrupted run resumes to the same batches.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from kdaudit.data.template import Encoded
from kdaudit.train.batching import Batch, collate
from kdaudit.train.config import KDParams
from kdaudit.train.methods import Method
from kdaudit.train.sampling import sample_responses


class AdaptiveSchedule:
    """DistiLLM's schedule for the probability of a student-written batch: it starts at `init`
    and rises by `step` (capped at 1) whenever the validation loss exceeds the value recorded
    at the last rise (the first evaluation, before any rise) by at least `eps`."""

    def __init__(self, init: float = 0.0, eps: float = 0.1, step: float = 0.1):
        self.prob, self.eps, self.step = init, eps, step
        self.reference: float | None = None

    def update(self, val_loss: float) -> bool:
        """Record one validation loss; True when the probability rose."""
        if self.reference is None:
            self.reference = val_loss
            return False
        if val_loss - self.reference >= self.eps and self.prob < 1.0:
            self.prob = min(1.0, round(self.prob + self.step, 10))
            self.reference = val_loss
            return True
        return False


class BatchSource:
    """Training batches for one method; `next_batch` may sample from the live model."""

    def __init__(self, method: Method, examples: Sequence[Encoded], params: KDParams, *,
                 pad_id: int, eos_id: int | None, seed: int, max_length: int,
                 validation: Sequence[Encoded] = ()):
        self.method, self.params = method, params
        self.examples = list(examples)
        self.pad_id, self.eos_id, self.max_length = pad_id, eos_id, max_length
        self.validation = list(validation)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[Encoded] = []
        self.schedule = AdaptiveSchedule(params.distillm_init_prob, params.loss_eps) \
            if method.adaptive else None
        self.prepared = method.data != "teacher_samples"
        if method.adaptive and not self.validation:
            raise ValueError(f"method '{method.name}' needs validation examples (carved from "
                             f"the public split) for its adaptive schedule")

    # -- sampling --------------------------------------------------------------------------
    def _prompt(self, e: Encoded) -> list[int]:
        room = max(1, self.max_length - self.params.max_new_tokens)
        return e.input_ids[:e.response_start][-room:]

    def _sample(self, chosen: Sequence[Encoded], model, teacher=None, mix: float = 0.0):
        prompts = [self._prompt(e) for e in chosen]
        samples = sample_responses(model, prompts, max_new_tokens=self.params.max_new_tokens,
                                   pad_id=self.pad_id, eos_id=self.eos_id, teacher=teacher,
                                   teacher_mix=mix, temperature=self.params.sample_temperature,
                                   top_p=self.params.top_p, generator=self.generator)
        return [Encoded(p + s.tokens, len(p)) for p, s in zip(prompts, samples)], samples

    def prepare(self, model, teacher) -> None:
        """SeqKD: the teacher answers every prompt once, before training."""
        if self.prepared:
            return
        self.examples, _ = self._sample(self.examples, teacher)
        self.prepared = True

    @property
    def student_prob(self) -> float:
        """Probability that the next batch is written by the student."""
        if self.method.data == "mixture":
            return 1.0
        if self.method.data != "student_samples":
            return 0.0
        return self.schedule.prob if self.schedule else self.params.on_policy_fraction

    def next_batch(self, idx: Sequence[int], model, teacher) -> tuple[Batch, dict[str, float]]:
        """The batch for these example indices, and counts of where its rows came from."""
        chosen = [self.examples[i] for i in idx]
        if self.method.data == "mixture":
            rows, samples = self._sample(chosen, model, teacher, self.params.teacher_mix_alpha)
            extras = {"student_logprob": [s.student_logprob for s in samples],
                      "teacher_logprob": [s.teacher_logprob for s in samples]}
            return collate(rows, self.pad_id, extras), {"generated": len(rows)}
        if self.method.data != "student_samples" or self.rng.random() >= self.student_prob:
            return collate(chosen, self.pad_id), {"generated": 0}
        n_replay = 0
        if self.method.replay:
            want = int(round(self.params.replay_ratio * len(chosen)))
            n_replay = want if len(self.buffer) >= want else 0
        replayed = self.rng.sample(self.buffer, n_replay) if n_replay else []
        fresh, _ = self._sample(chosen[:len(chosen) - n_replay], model)
        if self.method.replay:
            self.buffer = (self.buffer + fresh)[-self.params.replay_size:]
        return collate(fresh + replayed, self.pad_id), {"generated": len(fresh),
                                                        "replayed": len(replayed)}

    # -- the adaptive schedule -------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, model, teacher, batch_size: int = 32) -> float:
        """The method's loss on the validation split's ground truth (eval mode)."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        total, weight = 0.0, 0
        for b in range(0, len(self.validation), batch_size):
            batch = collate(self.validation[b:b + batch_size], self.pad_id).to(device)
            kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids)
            t_logits = teacher(**kw).logits if teacher is not None else None
            loss, _ = self.method.loss(model(**kw).logits, t_logits, batch, self.params)
            n = int(batch.target_mask[:, 1:].sum())
            total, weight = total + loss.item() * n, weight + n
        model.train(was)
        return total / max(weight, 1)

    def after_step(self, step: int, model, teacher) -> dict[str, float]:
        """DistiLLM: every `eval_every` steps, the validation loss drives the schedule."""
        if self.schedule is None or step % self.params.eval_every:
            return {}
        val = self.validation_loss(model, teacher)
        self.schedule.update(val)
        return {"val_loss": val, "student_data_prob": self.schedule.prob}

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON types only: a checkpoint is data, never code to unpickle."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss],
                "generator": self.generator.get_state().tolist(),
                "buffer": [[e.input_ids, e.response_start] for e in self.buffer],
                "examples": ([[e.input_ids, e.response_start] for e in self.examples]
                             if self.method.data == "teacher_samples" else None),
                "schedule": (None if self.schedule is None else
                             [self.schedule.prob, self.schedule.reference])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.buffer = [Encoded(list(i), r) for i, r in state["buffer"]]
        if state["examples"] is not None:
            self.examples = [Encoded(list(i), r) for i, r in state["examples"]]
            self.prepared = True
        if self.schedule is not None and state["schedule"] is not None:
            self.schedule.prob, self.schedule.reference = state["schedule"]
