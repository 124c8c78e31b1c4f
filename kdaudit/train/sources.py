"""Where a method's training batches come from: the data half of "a method is a configuration
of the one loop" (the loss is the other half, see `methods.py`). Each rule is the paper's code
(docs/methods.md §4).

- ground_truth: the split's own responses (kd, nokd, sft).
- teacher_samples: the teacher answers every prompt once, before the first step (SeqKD).
- student_samples, ImitKD and GKD: with probability `on_policy_fraction` (1 and ½) the student
  answers the batch's prompts; the answers join a replay buffer of `replay_size` (a deque) and
  the step trains on a uniform draw of a batch from the buffer; otherwise ground truth.
- student_samples, DistiLLM: with threshold θ and r ~ U(0, 1) per batch, a fresh student batch
  (pushed into the buffer, trained on directly) when r < θ·(1 − step/T) or while the buffer is
  not yet full and r < θ; a draw from the buffer when r < θ otherwise; else ground truth. θ
  starts at `distillm_init_prob` and rises by 0.1 when the student's validation cross-entropy
  is `loss_eps` above its reference (`AdaptiveSchedule`), evaluated before training and after
  every epoch.
- mixture, MiniLLM: rounds of `minillm_rollouts` prompts answered by (1 − α)·student +
  α·teacher, with both models' log probabilities kept; each round is trained on for
  `minillm_ppo_epochs` passes in shuffled batches.
- the pretraining LM term's batches (`next_lm_batch`) cycle through the public corpus.
Every draw comes from generators seeded from the run's seed, checkpointed with the buffer, the
schedule and the rollouts, so an interrupted run resumes to the same batches.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from kdaudit.data.template import Encoded
from kdaudit.train.batching import Batch, collate
from kdaudit.train.config import KDParams
from kdaudit.train.methods import Method, cross_entropy, shifted
from kdaudit.train.sampling import Lockstep, Sample, sample_responses

VALIDATION_BATCH = 64   # the paper's --eval-batch-size: its validation CE is a mean of batch means


class AdaptiveSchedule:
    """DistiLLM's threshold θ: it starts at `init`; after each validation CE that is at least
    `eps` above the reference (the CE before training, then the CE at the last rise), θ rises
    by `step` (capped at 1) and the reference moves to that CE."""

    def __init__(self, init: float = 0.0, eps: float = 0.1, step: float = 0.1):
        self.prob, self.eps, self.step = init, eps, step
        self.reference: float | None = None

    def update(self, val_loss: float) -> bool:
        """Record one validation CE; True when it moved the threshold's reference (a rise)."""
        if self.reference is None:
            self.reference = val_loss
            return False
        if val_loss >= self.reference + self.eps:
            self.prob = min(1.0, round(self.prob + self.step, 10))
            self.reference = val_loss
            return True
        return False


def fresh_share(threshold: float, step: int, total: int, schedule: str) -> float:
    """DistiLLM's probability of a fresh student batch at 1-based `step` of `total`."""
    if schedule == "constant":
        return threshold * 0.5
    if schedule == "increasing":
        return threshold * step / total
    return threshold * (1 - step / total)


class _Cursor:
    """Cycles through a list's indices in seeded shuffled passes; its state is two ints."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._shuffled: tuple[int, list[int]] | None = None   # (epoch, its order)

    def _order(self) -> list[int]:
        if self._shuffled is None or self._shuffled[0] != self.epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._shuffled = (self.epoch, order)
        return self._shuffled[1]

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            chunk = order[self.pos:self.pos + k - len(out)]
            out += chunk
            self.pos += len(chunk)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out


class BatchSource:
    """Training batches for one method; `next_batch` may sample from the live model."""

    def __init__(self, method: Method, examples: Sequence[Encoded], params: KDParams, *,
                 pad_id: int, eos_id: int | None, seed: int, max_length: int,
                 batch_size: int = 16, steps_per_epoch: int = 1, total_steps: int = 1,
                 validation: Sequence[Encoded] = (), lm_examples: Sequence[Encoded] = (),
                 lockstep: Lockstep | None = None):
        self.method, self.params = method, params
        self.lockstep = lockstep
        self.examples = list(examples)
        self.pad_id, self.eos_id, self.max_length = pad_id, eos_id, max_length
        self.batch_size, self.steps_per_epoch = batch_size, max(1, steps_per_epoch)
        self.total_steps = max(1, total_steps)
        self.validation = list(validation)
        self.lm_examples = list(lm_examples)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[Encoded] = []
        self.schedule = AdaptiveSchedule(params.distillm_init_prob, params.loss_eps) \
            if method.adaptive else None
        self.prepared = method.data != "teacher_samples"
        self.lm_cursor = _Cursor(len(self.lm_examples), seed + 1)
        self.prompt_cursor = _Cursor(len(self.examples), seed + 2)
        self.rollouts: list[tuple[Encoded, Sample]] = []
        self.queue: list[list[int]] = []
        if method.adaptive and not self.validation:
            raise ValueError(f"method '{method.name}' needs validation examples (carved from "
                             f"the public split) for its adaptive schedule")

    def _agreed(self, value: float) -> float:
        """A draw or measurement every process must act on alike: the main process's under
        `lockstep`, else this process's own."""
        return self.lockstep.first(value) if self.lockstep is not None else value

    # -- sampling --------------------------------------------------------------------------
    def _prompt(self, e: Encoded) -> list[int]:
        room = max(1, self.max_length - self.params.max_new_tokens)
        return e.input_ids[:e.response_start][-room:]

    def _sample(self, chosen: Sequence[Encoded], model, teacher=None, mix: float = 0.0
                ) -> tuple[list[Encoded], list[Sample]]:
        prompts = [self._prompt(e) for e in chosen]
        samples = sample_responses(model, prompts, max_new_tokens=self.params.max_new_tokens,
                                   pad_id=self.pad_id, eos_id=self.eos_id, teacher=teacher,
                                   teacher_mix=mix, temperature=self.params.sample_temperature,
                                   top_p=self.params.top_p, generator=self.generator,
                                   lockstep=self.lockstep)
        return [Encoded(p + s.tokens, len(p)) for p, s in zip(prompts, samples)], samples

    def prepare(self, model, teacher) -> dict[str, float]:
        """Before the first step: SeqKD's teacher answers every prompt; DistiLLM's reference
        validation CE (kept from a checkpoint on resume), returned for the log."""
        logged = {}
        if self.schedule is not None and self.schedule.reference is None:
            val = self._agreed(self.validation_ce(model))
            self.schedule.update(val)
            logged = {"val_loss": val, "student_data_prob": self.schedule.prob}
        if not self.prepared:
            self.examples, _ = self._sample(self.examples, teacher)
            self.prepared = True
        return logged

    @property
    def student_prob(self) -> float:
        """Probability that the next batch is student-written (DistiLLM: its threshold)."""
        if self.method.data == "mixture":
            return 1.0
        if self.method.data != "student_samples":
            return 0.0
        return self.schedule.prob if self.schedule else self.params.on_policy_fraction

    def _remember(self, rows: list[Encoded]) -> None:
        if self.params.replay_size:
            self.buffer = (self.buffer + rows)[-self.params.replay_size:]

    def _replay(self, k: int) -> list[Encoded]:
        return self.rng.sample(self.buffer, min(k, len(self.buffer)))

    def next_batch(self, step: int, idx: Sequence[int], model, teacher
                   ) -> tuple[Batch, dict[str, float]]:
        """The batch of 0-based `step` for these example indices, and counts of where its
        rows came from."""
        chosen = [self.examples[i] for i in idx]
        if self.method.data == "mixture":
            return self._rollout_batch(model, teacher)
        if self.method.data != "student_samples":
            return collate(chosen, self.pad_id), {"generated": 0}
        r = self._agreed(self.rng.random())
        if self.schedule is None:                                   # ImitKD, GKD
            if r >= self.params.on_policy_fraction:
                return collate(chosen, self.pad_id), {"generated": 0}
            fresh, _ = self._sample(chosen, model)
            if not self.params.replay_size:
                return collate(fresh, self.pad_id), {"generated": len(fresh)}
            self._remember(fresh)
            rows = self._replay(len(chosen))
            return collate(rows, self.pad_id), {"generated": len(fresh), "replayed": len(rows)}
        threshold, capacity = self.schedule.prob, self.params.replay_size   # DistiLLM
        share = fresh_share(threshold, step + 1, self.total_steps,
                            self.params.distillm_replay_schedule)
        filling = r < threshold and len(self.buffer) < capacity
        if r < share or filling or (r < threshold and not capacity):
            fresh, _ = self._sample(chosen, model)
            self._remember(fresh)
            return collate(fresh, self.pad_id), {"generated": len(fresh)}
        if r < threshold:
            rows = self._replay(len(chosen))
            return collate(rows, self.pad_id), {"generated": 0, "replayed": len(rows)}
        return collate(chosen, self.pad_id), {"generated": 0}

    # -- MiniLLM's rounds ------------------------------------------------------------------
    def _round(self, model, teacher) -> None:
        """Sample a round of rollouts from the mixture and queue `minillm_ppo_epochs` shuffled
        passes over it in batches."""
        n = self.params.minillm_rollouts or self.batch_size
        chosen = [self.examples[i] for i in self.prompt_cursor.take(n)]
        rows, samples = self._sample(chosen, model, teacher, self.params.teacher_mix_alpha)
        self.rollouts = list(zip(rows, samples))
        for _ in range(self.params.minillm_ppo_epochs):
            order = list(range(n))
            self.rng.shuffle(order)
            self.queue += [order[b:b + self.batch_size] for b in range(0, n, self.batch_size)]

    def _rollout_batch(self, model, teacher) -> tuple[Batch, dict[str, float]]:
        generated = 0
        if not self.queue:
            self._round(model, teacher)
            generated = len(self.rollouts)
        chosen = [self.rollouts[i] for i in self.queue.pop(0)]
        extras = {"student_logprob": [s.student_logprob for _, s in chosen],
                  "teacher_logprob": [s.teacher_logprob for _, s in chosen]}
        return collate([e for e, _ in chosen], self.pad_id, extras), {"generated": generated}

    # -- the pretraining LM term -----------------------------------------------------------
    def next_lm_batch(self) -> Batch:
        """The next batch of the public pretraining corpus (seeded passes)."""
        if not self.lm_examples:
            raise ValueError(f"method '{self.method.name}' has an LM term (lm_coef > 0) but no "
                             f"pretraining corpus was given")
        rows = [self.lm_examples[i] for i in self.lm_cursor.take(self.batch_size)]
        return collate(rows, self.pad_id)

    # -- the adaptive schedule -------------------------------------------------------------
    @torch.no_grad()
    def validation_ce(self, model) -> float:
        """The student's CE on the validation ground truth, as the paper's `evaluate`: the
        mean over batches of 64 (in order) of each batch's mean token CE (eval mode)."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        means = []
        for b in range(0, len(self.validation), VALIDATION_BATCH):
            batch = collate(self.validation[b:b + VALIDATION_BATCH], self.pad_id).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits
            means.append(cross_entropy(*shifted(logits, batch)).item())
        model.train(was)
        return sum(means) / max(len(means), 1)

    def after_step(self, step: int, model, teacher) -> dict[str, float]:
        """DistiLLM: after every epoch (or every `eval_every` steps) the validation CE drives
        the threshold."""
        if self.schedule is None or step % (self.params.eval_every or self.steps_per_epoch):
            return {}
        val = self._agreed(self.validation_ce(model))
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
                             [self.schedule.prob, self.schedule.reference]),
                "cursors": [[c.epoch, c.pos] for c in (self.lm_cursor, self.prompt_cursor)],
                "rollouts": [[e.input_ids, e.response_start, s.tokens, s.student_logprob,
                              s.teacher_logprob] for e, s in self.rollouts],
                "queue": self.queue}

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
        for cursor, (epoch, pos) in zip((self.lm_cursor, self.prompt_cursor), state["cursors"]):
            cursor.epoch, cursor.pos = epoch, pos
        self.rollouts = [(Encoded(list(i), r), Sample(list(t), list(lq), lp))
                         for i, r, t, lq, lp in state["rollouts"]]
        self.queue = [list(q) for q in state["queue"]]
