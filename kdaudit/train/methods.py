"""Training methods as configurations of the one loop: a name, what it needs, and its loss.

A loss takes the model's logits, the teacher's logits (or None), the batch and the method's
parameters, and returns (scalar loss, named parts for the log). Positions are shifted here
once: logits at t predict the token at t+1, scored where `target_mask[:, t+1]` is set.

The parameters are a `KDParams`, every default already resolved (`method_params`): a loss
reads attributes and declares the KDConfig fields it reads in `reads`. With
`params.per_sequence` a loss that supports it is the mean over the batch of each sequence's
mean token loss, so one example's gradient does not depend on the others' lengths: the
sensitivity DP-SGD assumes. `DP_METHODS` are the methods that declare `dp_sgd`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kdaudit.train import objectives
from kdaudit.train.batching import Batch
from kdaudit.train.config import KDConfig, KDParams

LossFn = Callable[[torch.Tensor, torch.Tensor | None, Batch, KDParams],
                  tuple[torch.Tensor, dict[str, float]]]


def shifted(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting t+1, targets, mask) over positions 0..T-2."""
    return logits[:, :-1], batch.input_ids[:, 1:], batch.target_mask[:, 1:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                  per_sequence: bool = False) -> torch.Tensor:
    """Mean token NLL over masked positions, in float32; with `per_sequence`, the mean over
    rows of each row's mean."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view_as(targets)
    m = mask.float()
    if per_sequence:
        return ((nll * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    return (nll * m).sum() / m.sum().clamp(min=1)


def ce_loss(logits, teacher_logits, batch, params):
    s, y, m = shifted(logits, batch)
    loss = cross_entropy(s, y, m, per_sequence=params.per_sequence)
    return loss, {"ce": loss.item(), "objective": loss.item()}


ce_loss.reads = ()   # the KDConfig fields a loss reads (`Method.kd_fields`)


def kd_loss(logits, teacher_logits, batch, params):
    """(1 − kd_ratio)·CE + kd_ratio·τ²·KL(p_teacher ‖ q_student) on the batch's responses
    (ground truth for kd, teacher samples for seqkd)."""
    ratio, tau, per_sequence = params.kd_ratio, params.temperature, params.per_sequence
    s, y, m = shifted(logits, batch)
    t = teacher_logits[:, :-1]
    ce = cross_entropy(s, y, m, per_sequence=per_sequence)
    kl = objectives.forward_kl(s, t, m, temperature=tau,
                               reduction="none" if per_sequence else "mean")
    kl = kl.mean() if per_sequence else kl
    loss = (1 - ratio) * ce + ratio * tau ** 2 * kl
    return loss, {"ce": ce.item(), "forward_kl": kl.item(), "objective": kl.item()}


kd_loss.reads = ("kd_ratio", "temperature")


def distildp_loss(logits, teacher_logits, batch, params):
    """DistilDP's student (Flemings & Annavaram 2024) on the DP teacher's synthetic text:
    (1 − w)·CE + w·τ²·KL(p_teacher ‖ q_student) + hidden_weight·MSE(P h_S, h_T).

    w is `soft_label_weight`; the hidden term compares the last hidden states over real
    tokens, the student's through the loop's learned projection P (`batch.extras`
    "student_hidden" and "teacher_hidden", present when hidden_weight > 0)."""
    w, tau, hw = params.soft_label_weight, params.temperature, params.hidden_weight
    s, y, m = shifted(logits, batch)
    ce = cross_entropy(s, y, m)
    kl = objectives.forward_kl(s, teacher_logits[:, :-1], m, temperature=tau)
    loss = (1 - w) * ce + w * tau ** 2 * kl
    parts = {"ce": ce.item(), "forward_kl": kl.item()}
    if hw:
        real = batch.attention_mask.bool()
        diff = batch.extras["student_hidden"] - batch.extras["teacher_hidden"].float()
        mse = (diff.float() ** 2).mean(-1)[real].mean()
        loss = loss + hw * mse
        parts["hidden_mse"] = mse.item()
    return loss, {**parts, "objective": loss.item()}


distildp_loss.reads = ("soft_label_weight", "temperature", "hidden_weight")


def divergence_loss(name: str, **param_fields: str) -> LossFn:
    """τ²·D(teacher, student) on the batch's responses, D a divergence of `objectives`;
    `param_fields` maps the divergence's keyword (beta, alpha) to its config field."""
    def loss_fn(logits, teacher_logits, batch, params):
        tau = params.temperature
        s, _, m = shifted(logits, batch)
        kw = {k: getattr(params, field) for k, field in param_fields.items()}
        value = objectives.DIVERGENCES[name](s, teacher_logits[:, :-1], m, temperature=tau, **kw)
        return tau ** 2 * value, {name: value.item(), "objective": value.item()}

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.reads = ("temperature", *param_fields.values())
    return loss_fn


def minillm_returns(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """R_{t+1} = (1 / (T − t)) Σ_{t' = t+1..T} γ^{t'−t−1} r_{t'} per position t of each row:
    the length-normalised, discounted return of the tokens after t (0 after the last one)."""
    rewards = rewards * mask
    after = torch.zeros_like(rewards)          # discounted sum over t' > t
    count = torch.zeros_like(rewards)          # number of response tokens after t
    for t in range(rewards.shape[1] - 2, -1, -1):
        after[:, t] = rewards[:, t + 1] + discount * after[:, t + 1]
        count[:, t] = mask[:, t + 1] + count[:, t + 1]
    return torch.where(count > 0, after / count.clamp(min=1), torch.zeros_like(after))


def minillm_loss(logits, teacher_logits, batch, params):
    """MiniLLM (Gu et al., ICLR 2024): reverse KL by policy gradient on samples drawn from
    (1 − α) q + α p.

    Per response token t: importance weight w_t = q(y_t) / ((1 − α) q(y_t) + α p(y_t)),
    reward r_t = log p(y_t) − log q(y_t), return R_{t+1} (`minillm_returns`), advantage
    A_t = w_t R_{t+1}; the clipped surrogate max(−A ρ, −A clip(ρ, 1 ± ε)) with
    ρ = q_θ(y_t) / q_old(y_t); plus the single-step term w_t KL(q_θ(·|y_<t) ‖ p(·|y_<t)),
    differentiated exactly over the vocabulary. Sampling-time log probabilities come in
    `batch.extras` ("student_logprob", "teacher_logprob", aligned with the tokens).
    """
    alpha, clip = params.teacher_mix_alpha, params.minillm_clip
    s, y, m = shifted(logits, batch)
    mf = m.float()
    lq_old = batch.extras["student_logprob"][:, 1:]
    lp_old = batch.extras["teacher_logprob"][:, 1:]
    lq = torch.log_softmax(s.float(), -1).gather(-1, y[..., None]).squeeze(-1)
    with torch.no_grad():
        if alpha > 0:
            log_mix = torch.logaddexp(lq_old + math.log1p(-alpha), lp_old + math.log(alpha))
            weight = (lq_old - log_mix).exp()
        else:
            weight = torch.ones_like(lq_old)
        rewards = lp_old - lq_old
        advantage = weight * minillm_returns(rewards, mf, params.minillm_discount)
    ratio = (lq - lq_old).exp()
    surrogate = torch.maximum(-advantage * ratio,
                              -advantage * ratio.clamp(1 - clip, 1 + clip))
    n = mf.sum().clamp(min=1)
    pg = (surrogate * mf).sum() / n
    rkl = objectives.per_token("reverse_kl", s, teacher_logits[:, :-1], m)
    single = (weight * rkl * mf).sum() / n
    plain = ((rkl * mf).sum() / n).item()
    return pg + single, {"policy_gradient": pg.item(), "single_step": single.item(),
                         "reverse_kl": plain, "objective": plain,
                         "reward": ((rewards * mf).sum() / n).item()}


minillm_loss.reads = ("teacher_mix_alpha", "minillm_clip", "minillm_discount")


DataSource = str  # "ground_truth" | "teacher_samples" | "student_samples" | "mixture"
DATA_SOURCES = ("ground_truth", "teacher_samples", "student_samples", "mixture")


@dataclass(frozen=True)
class Method:
    """A training method: its loss, the data it trains on and its default parameters.

    `data`: "ground_truth" (the split's responses), "teacher_samples" (teacher responses to the
    split's prompts, generated once before training), "student_samples" (with probability
    `on_policy_fraction`, or DistiLLM's adaptive probability, a batch is written by the student
    during training; through a replay buffer when `replay`), "mixture" (every batch sampled from
    the student–teacher mixture, MiniLLM).
    """

    name: str
    loss: LossFn
    needs_teacher: bool = False
    student: bool = True        # selectable as a student method in configs and the CLI
    description: str = ""
    data: DataSource = "ground_truth"
    replay: bool = False
    adaptive: bool = False      # DistiLLM: on-policy probability driven by validation loss
    defaults: tuple[tuple[str, Any], ...] = ()
    init_from: str | None = None  # a run starts this method from that method's student
    # DP students (docs/methods.md §7): "synthetic" trains on text written by a DP teacher, "private"
    # trains on the private records themselves with DP-SGD
    privacy: str | None = None
    hidden: bool = False        # the loss may align hidden states (DistilDP's hidden_weight)
    # DP-SGD can train it: its loss honours `per_sequence` and its data is fixed (no sampling)
    dp_sgd: bool = False

    @property
    def kd_fields(self) -> tuple[str, ...]:
        """The KDConfig fields this method reads (its loss's and its data source's): a run
        hashes these alone, so a knob of one method retrains only that method."""
        fields = list(self.loss.reads)
        if self.data != "ground_truth":          # sampled text
            fields += ["max_new_tokens", "sample_temperature", "top_p"]
        if self.data == "mixture":
            fields.append("teacher_mix_alpha")
        if self.data == "student_samples":
            fields += (["distillm_init_prob", "loss_eps", "eval_every"] if self.adaptive
                       else ["on_policy_fraction"])
        if self.replay:
            fields += ["replay_size", "replay_ratio"]
        return tuple(dict.fromkeys(fields))

    def kd_inputs(self, kd) -> dict[str, Any]:
        """This method's KD hyperparameters as a stage input: {field: value}."""
        return {f: getattr(kd, f) for f in self.kd_fields}


METHODS: dict[str, Method] = {
    "pretrain": Method("pretrain", ce_loss, student=False, dp_sgd=True,
                       description="next-token CE on every token of public pre-training text"),
    "sft": Method("sft", ce_loss, student=False, dp_sgd=True,
                  description="supervised fine-tuning: CE on response tokens"),
    "nokd": Method("nokd", ce_loss, dp_sgd=True,
                   description="student base fine-tuned on public ground truth, no teacher"),
    "kd": Method("kd", kd_loss, needs_teacher=True, dp_sgd=True,
                 description="word-level KD: forward KL to the teacher on public ground truth"),
    "seqkd": Method("seqkd", kd_loss, needs_teacher=True, data="teacher_samples",
                    description="sequence-level KD: forward KL on teacher responses to public "
                                "prompts, sampled once before training"),
    "imitkd": Method("imitkd", divergence_loss("forward_kl"), needs_teacher=True,
                     data="student_samples", replay=True,
                     defaults=(("on_policy_fraction", 1.0),),
                     description="ImitKD: forward KL on the student's own responses "
                                 "(replay buffer)"),
    "gkd": Method("gkd", divergence_loss("generalized_jsd", beta="jsd_beta"),
                  needs_teacher=True, data="student_samples",
                  defaults=(("on_policy_fraction", 0.5),),
                  description="GKD: generalized JSD, half the batches written by the student"),
    # MiniLLM starts from the student fine-tuned on the task data (Gu et al. 2024, §3): from
    # the raw base, its reverse-KL policy gradient left the tiny student's non-member
    # perplexity worse than the base's (86 vs 72)
    "minillm": Method("minillm", minillm_loss, needs_teacher=True, data="mixture",
                      init_from="nokd",
                      description="MiniLLM: reverse KL by policy gradient on samples from the "
                                  "student–teacher mixture, starting from the nokd student"),
    "distillm": Method("distillm", divergence_loss("skew_reverse_kl", alpha="skew_alpha"),
                       needs_teacher=True, data="student_samples", replay=True, adaptive=True,
                       description="DistiLLM: skew reverse KL, adaptive share of student "
                                   "responses (replay buffer)"),
    "distildp": Method("distildp", distildp_loss, needs_teacher=True, privacy="synthetic",
                       hidden=True,
                       description="DistilDP: synthetic records written by a DP teacher, hard "
                                   "and soft labels (and optional hidden-state alignment)"),
    "synthetic_only": Method("synthetic_only", ce_loss, privacy="synthetic", dp_sgd=True,
                             description="the DP teacher's synthetic records with hard labels "
                                         "only (DistilDP with soft_label_weight 0)"),
    "dpsgd_student": Method("dpsgd_student", ce_loss, privacy="private", dp_sgd=True,
                            description="DP-SGD fine-tuning of the student base on the private "
                                        "records, no teacher"),
    "dpkd": Method("dpkd", kd_loss, needs_teacher=True, privacy="private",
                   dp_sgd=True,
                   description="DP-SGD of the student with the KD loss from a DP teacher on the "
                               "private records (ε split between the two)"),
}

# the methods DP-SGD can train (`Method.dp_sgd`)
DP_METHODS = tuple(k for k, m in METHODS.items() if m.dp_sgd)


def method_params(method: Method, kd: KDConfig | None = None, family: str | None = None
                  ) -> KDParams:
    """The parameters a method trains with: the KD config, with fields left at None filled
    by the method's defaults (kd_ratio: 0.5 for LLaMA-family students, else 1.0;
    on_policy_fraction: 0 unless the method sets it)."""
    values = dataclasses.asdict(kd if kd is not None else KDConfig())
    for key, value in method.defaults:
        if values[key] is None:
            values[key] = value
    if values["kd_ratio"] is None:
        values["kd_ratio"] = 0.5 if family == "llama" else 1.0
    if values["on_policy_fraction"] is None:
        values["on_policy_fraction"] = 0.0
    return KDParams(**values)
