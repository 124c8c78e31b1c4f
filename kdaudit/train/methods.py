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
from kdaudit.train.config import KDConfig, KDParams, without_later_defaults

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


@dataclass
class ResponseRows:
    """A batch's response positions only: the student's logits and the teacher's rows at the
    positions that predict a response token, in the order `logits[:, :-1][mask]` gathers them,
    with each row's target and sequence. What a loss with a row form reads when the teacher is
    cached, so that neither model's logits are built over the prompt positions."""
    student: torch.Tensor       # (tokens, V) logits
    teacher: torch.Tensor       # (tokens, V) logits or log-probabilities
    targets: torch.Tensor       # (tokens,) the token each row predicts
    sequence: torch.Tensor      # (tokens,) its row in the batch
    batch_size: int

    @classmethod
    def of(cls, student: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> "ResponseRows":
        mask = batch.target_mask[:, 1:].bool()
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
        return cls(student, teacher, batch.input_ids[:, 1:][mask], rows[mask], mask.shape[0])

    def mean(self, values: torch.Tensor, per_sequence: bool) -> torch.Tensor:
        """The mean of per-row `values` over the batch's response tokens, or with
        `per_sequence` the mean over the batch's sequences of each one's mean (0 for one
        without response tokens), as `cross_entropy` and the divergences reduce them."""
        if not per_sequence:
            return values.sum() / max(values.numel(), 1)
        sums = values.new_zeros(self.batch_size).index_add(0, self.sequence, values)
        counts = torch.bincount(self.sequence, minlength=self.batch_size).clamp(min=1)
        return (sums / counts.to(values.dtype)).mean()


def kd_rows_loss(rows: ResponseRows, params):
    """`kd_loss` on the response rows alone: the same value, up to the order of float sums."""
    ratio, tau, per_sequence = params.kd_ratio, params.temperature, params.per_sequence
    nll = F.cross_entropy(rows.student.float(), rows.targets, reduction="none")
    ce = rows.mean(nll, per_sequence)
    kl = rows.mean(objectives.divergence_rows("forward_kl", rows.student, rows.teacher,
                                              temperature=tau), per_sequence)
    loss = (1 - ratio) * ce + ratio * tau ** 2 * kl
    return loss, {"ce": ce.item(), "forward_kl": kl.item(), "objective": kl.item()}


kd_loss.rows = kd_rows_loss     # the loss's row form (`ResponseRows`), where it has one


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
    """(1 − kd_ratio)·CE + kd_ratio·τ²·D(teacher, student) on the batch's responses, D a
    divergence of `objectives` (the paper's finetune.py; kd_ratio is 1 in its ImitKD, GKD and
    DistiLLM scripts); `param_fields` maps the divergence's keyword (beta, alpha) to its
    config field."""
    def loss_fn(logits, teacher_logits, batch, params):
        ratio, tau = params.kd_ratio, params.temperature
        s, y, m = shifted(logits, batch)
        kw = {k: getattr(params, field) for k, field in param_fields.items()}
        value = objectives.DIVERGENCES[name](s, teacher_logits[:, :-1], m, temperature=tau, **kw)
        loss = ratio * tau ** 2 * value
        parts = {name: value.item(), "objective": value.item()}
        if ratio < 1:
            ce = cross_entropy(s, y, m)
            loss = loss + (1 - ratio) * ce
            parts["ce"] = ce.item()
        return loss, parts

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.reads = ("kd_ratio", "temperature", *param_fields.values())
    return loss_fn


def minillm_returns(rewards: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """LMOps's length-normalised return at each response position t of each row:
    (Σ_{t' ≥ t} γ^{t'−t} r_{t'}) / (number of response tokens from t to the end), 0 outside
    the mask. The sum starts at the current token's own reward."""
    rewards = rewards * mask
    total = torch.zeros_like(rewards)
    count = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    remaining = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + discount * running
        remaining = remaining + mask[:, t]
        total[:, t], count[:, t] = running, remaining
    return total / count.clamp(min=1) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over a rollout grid of `width` cells per row that holds
    the masked values and zeros elsewhere, as LMOps whitens its fixed-width response tensor
    (var unbiased); 0 outside the mask."""
    n = max(values.shape[0] * width, int(mask.sum().item()))
    mean = (values * mask).sum() / n
    squares = (((values - mean) ** 2) * mask).sum() + (n - mask.sum()) * mean ** 2
    var = squares / max(n - 1, 1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def minillm_advantages(rewards: torch.Tensor, mask: torch.Tensor, params: KDParams
                       ) -> torch.Tensor:
    """Scaled and clipped rewards → length-normalised returns → whitened (paper recipe)."""
    rewards = rewards / params.minillm_reward_scaling
    if params.minillm_reward_clip:
        rewards = rewards.clamp(-params.minillm_reward_clip, params.minillm_reward_clip)
    returns = minillm_returns(rewards, mask, params.minillm_discount)
    return whiten(returns, mask, params.max_new_tokens) if params.minillm_whiten else returns


def minillm_loss(logits, teacher_logits, batch, params):
    """MiniLLM (Gu et al., ICLR 2024) as LMOps's `ppo_loss` computes it: reverse KL by policy
    gradient on rollouts sampled from (1 − α) q_old + α p.

    Per response token t: reward r_t = log p(y_t) − log q_old(y_t) (scaled, clipped), advantage
    A_t = `minillm_advantages`; importance weight w_t = q_old(y_t) / ((1 − α) q_old(y_t) +
    α p(y_t)); the clipped surrogate max(−A·wρ, −A·clip(wρ, 1 ± ε)) with
    ρ = q_θ(y_t) / q_old(y_t), the weight inside the clip; plus the single-step term
    KL(q_θ(·|y_<t) ‖ p(·|y_<t)) over the vocabulary, not weighted. Both are means over the
    batch's response tokens. Sampling-time log probabilities come in `batch.extras`
    ("student_logprob", "teacher_logprob", aligned with the tokens).
    """
    alpha, clip = params.teacher_mix_alpha, params.minillm_clip
    s, y, m = shifted(logits, batch)
    mf = m.float()
    lq_old = batch.extras["student_logprob"][:, 1:].float()
    lp_old = batch.extras["teacher_logprob"][:, 1:].float()
    lq = torch.log_softmax(s.float(), -1).gather(-1, y[..., None]).squeeze(-1)
    with torch.no_grad():
        if alpha > 0:
            log_mix = torch.logaddexp(lq_old + math.log1p(-alpha), lp_old + math.log(alpha))
            weight = (lq_old - log_mix).exp()
        else:
            weight = torch.ones_like(lq_old)
        rewards = (lp_old - lq_old) * mf
        advantage = minillm_advantages(rewards, mf, params)
    ratio = ((lq - lq_old) * mf).exp() * weight
    surrogate = torch.maximum(-advantage * ratio,
                              -advantage * ratio.clamp(1 - clip, 1 + clip))
    n = mf.sum().clamp(min=1)
    pg = (surrogate * mf).sum() / n
    rkl = objectives.per_token("reverse_kl", s, teacher_logits[:, :-1], m)
    single = (rkl * mf).sum() / n
    return pg + single, {"policy_gradient": pg.item(), "single_step": single.item(),
                         "reverse_kl": single.item(), "objective": single.item(),
                         "reward": ((rewards * mf).sum() / n).item(),
                         "clipped": (((ratio - 1).abs() > clip).float() * mf).sum().item()
                         / n.item()}


minillm_loss.reads = ("teacher_mix_alpha", "minillm_clip", "minillm_discount",
                      "minillm_reward_scaling", "minillm_reward_clip", "minillm_whiten",
                      "max_new_tokens")


def lm_term(logits: torch.Tensor, teacher_logits: torch.Tensor | None, batch: Batch,
            params: KDParams) -> tuple[torch.Tensor, dict[str, float]]:
    """The pretraining term on a batch of the public corpus (every token but the first):
    CE, or with `lm_kd_ratio` r > 0 (MiniLLM's pt_loss) (1 − r)·CE + r·H(p_teacher, q)."""
    s, y, m = shifted(logits, batch)
    ce = cross_entropy(s, y, m)
    parts = {"lm_ce": ce.item()}
    if not params.lm_kd_ratio:
        return ce, parts
    mf = m.float()
    soft = -(torch.softmax(teacher_logits[:, :-1].float(), -1)
             * torch.log_softmax(s.float(), -1)).sum(-1)
    soft = (soft * mf).sum() / mf.sum().clamp(min=1)
    r = params.lm_kd_ratio
    return (1 - r) * ce + r * soft, {**parts, "lm_teacher_ce": soft.item()}


DataSource = str  # "ground_truth" | "teacher_samples" | "student_samples" | "mixture"
DATA_SOURCES = ("ground_truth", "teacher_samples", "student_samples", "mixture")


ALL_FAMILIES = ("gpt2", "opt", "llama")


@dataclass(frozen=True)
class Method:
    """A training method: its loss, the data it trains on and its default parameters.

    `data`: "ground_truth" (the split's responses), "teacher_samples" (teacher responses to the
    split's prompts, generated once before training), "student_samples" (with probability
    `on_policy_fraction`, or DistiLLM's adaptive threshold, a batch is written by the student
    during training, through a replay buffer of `replay_size`), "mixture" (rounds of rollouts
    sampled from the student–teacher mixture, MiniLLM).

    `defaults` are the method's values for fields left at None; `family_defaults` override them
    for one student family, (family, field, value). `lm_families`: the student families whose
    paper scripts add the pretraining LM term (`lm_coef` 1 under the paper recipe).
    """

    name: str
    loss: LossFn
    needs_teacher: bool = False
    student: bool = True        # selectable as a student method in configs and the CLI
    description: str = ""
    data: DataSource = "ground_truth"
    adaptive: bool = False      # DistiLLM: on-policy threshold driven by the validation CE
    defaults: tuple[tuple[str, Any], ...] = ()
    family_defaults: tuple[tuple[str, str, Any], ...] = ()
    lm_families: tuple[str, ...] = ()
    init_from: str | None = None  # a run starts this method from that method's student
    # DP students (docs/methods.md §7): "synthetic" trains on text written by a DP teacher, "private"
    # trains on the private records themselves with DP-SGD
    privacy: str | None = None
    hidden: bool = False        # the loss may align hidden states (DistilDP's hidden_weight)
    # DP-SGD can train it: its loss honours `per_sequence` and its data is fixed (no sampling)
    dp_sgd: bool = False

    @property
    def lm_term(self) -> bool:
        """A KD method of the paper: it may carry the pretraining LM term."""
        return self.needs_teacher and self.privacy is None

    @property
    def kd_fields(self) -> tuple[str, ...]:
        """The KDConfig fields this method reads (its loss's, its data source's, the recipe's):
        a run hashes these alone, so a knob of one method retrains only that method."""
        fields = list(self.loss.reads)
        if self.data != "ground_truth":          # sampled text
            fields += ["max_new_tokens", "sample_temperature", "top_p"]
        if self.data == "mixture":
            fields += ["teacher_mix_alpha", "minillm_rollouts", "minillm_ppo_epochs"]
        if self.data == "student_samples":
            fields += (["distillm_init_prob", "distillm_replay_schedule", "loss_eps",
                        "eval_every"] if self.adaptive else ["on_policy_fraction"])
            fields.append("replay_size")
        if self.lm_term:
            fields += ["lm_coef", "lm_kd_ratio", "lm_corpus", "lm_corpus_records"]
        if self.lm_term or self.data != "ground_truth":
            fields.append("recipe")
        if self.off_policy:
            fields.append("teacher_cache_topk")
        return tuple(dict.fromkeys(fields))

    @property
    def off_policy(self) -> bool:
        """It learns from a teacher on examples fixed before training (kd, seqkd, dpkd,
        distildp): the teacher's answer to an example can be kept (`teacher_cache_topk`)."""
        return self.needs_teacher and self.data in ("ground_truth", "teacher_samples")

    def kd_inputs(self, kd) -> dict[str, Any]:
        """This method's KD hyperparameters as a stage input: {field: value}. An option added
        later counts only away from its earlier behaviour (`LATER_KD_OPTIONS`)."""
        return without_later_defaults({f: getattr(kd, f) for f in self.kd_fields})


_HALF_KD_ON_LLAMA = (("llama", "kd_ratio", 0.5),)   # the paper's LLaMA kd.sh and seqkd.sh

METHODS: dict[str, Method] = {
    "pretrain": Method("pretrain", ce_loss, student=False, dp_sgd=True,
                       description="next-token CE on every token of public pre-training text"),
    "sft": Method("sft", ce_loss, student=False, dp_sgd=True,
                  description="supervised fine-tuning: CE on response tokens"),
    "nokd": Method("nokd", ce_loss, dp_sgd=True,
                   description="student base fine-tuned on public ground truth, no teacher"),
    "kd": Method("kd", kd_loss, needs_teacher=True, dp_sgd=True,
                 family_defaults=_HALF_KD_ON_LLAMA, lm_families=("opt",),
                 description="word-level KD: forward KL to the teacher on public ground truth"),
    "seqkd": Method("seqkd", kd_loss, needs_teacher=True, data="teacher_samples",
                    family_defaults=_HALF_KD_ON_LLAMA, lm_families=("opt",),
                    description="sequence-level KD: forward KL on teacher responses to public "
                                "prompts, sampled once before training"),
    "imitkd": Method("imitkd", divergence_loss("forward_kl"), needs_teacher=True,
                     data="student_samples", defaults=(("on_policy_fraction", 1.0),),
                     lm_families=ALL_FAMILIES,
                     description="ImitKD: forward KL on the student's own responses, drawn "
                                 "from a replay buffer"),
    "gkd": Method("gkd", divergence_loss("generalized_jsd", beta="jsd_beta"),
                  needs_teacher=True, data="student_samples",
                  defaults=(("on_policy_fraction", 0.5),), lm_families=("opt", "llama"),
                  description="GKD: generalized JSD, half the batches student-written, drawn "
                              "from a replay buffer"),
    # MiniLLM starts from the student fine-tuned on the task data, LMOps's recipe (the paper's
    # scripts start from the base): from the raw base, its reverse-KL policy gradient left the
    # tiny student's non-member perplexity worse than the base's (86 vs 72)
    "minillm": Method("minillm", minillm_loss, needs_teacher=True, data="mixture",
                      init_from="nokd", defaults=(("lm_kd_ratio", 0.5),),
                      lm_families=ALL_FAMILIES,
                      description="MiniLLM: reverse KL by PPO on rounds of rollouts from the "
                                  "student–teacher mixture, starting from the nokd student"),
    "distillm": Method("distillm", divergence_loss("skew_reverse_kl", alpha="skew_alpha"),
                       needs_teacher=True, data="student_samples", adaptive=True,
                       family_defaults=(("llama", "distillm_init_prob", 0.2),),
                       lm_families=ALL_FAMILIES,
                       description="DistiLLM: skew reverse KL, student-written batches at a "
                                   "threshold raised by the validation CE (replay buffer)"),
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
                   dp_sgd=True, family_defaults=_HALF_KD_ON_LLAMA,
                   description="DP-SGD of the student with the KD loss from a DP teacher on the "
                               "private records (ε split between the two)"),
}

# the methods DP-SGD can train (`Method.dp_sgd`)
DP_METHODS = tuple(k for k, m in METHODS.items() if m.dp_sgd)


# the values of the fields a recipe leaves to the method (None in KDConfig); "lm_coef" is 1
# under the paper recipe for the families in `Method.lm_families`, else 0
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {"kd_ratio": 1.0, "on_policy_fraction": 0.0, "lm_kd_ratio": 0.0,
              "replay_size": 1000, "distillm_init_prob": 0.0, "minillm_rollouts": 256,
              "minillm_ppo_epochs": 4, "minillm_reward_scaling": 0.5,
              "minillm_reward_clip": 100.0, "minillm_whiten": True},
    "loss_only": {"kd_ratio": 1.0, "on_policy_fraction": 0.0, "lm_kd_ratio": 0.0,
                  "replay_size": 0, "distillm_init_prob": 0.0, "minillm_rollouts": 0,
                  "minillm_ppo_epochs": 1, "minillm_reward_scaling": 1.0,
                  "minillm_reward_clip": 0.0, "minillm_whiten": False, "lm_coef": 0.0},
}


def method_params(method: Method, kd: KDConfig | None = None, family: str | None = None
                  ) -> KDParams:
    """The parameters a method trains with: the KD config, with each field left at None
    filled by, in order, the method's value for the student family, the method's value, the
    recipe's value. Families other than gpt2, opt and llama follow the GPT-2 scripts."""
    kd = kd if kd is not None else KDConfig()
    values = dataclasses.asdict(kd)
    family = family if family in ALL_FAMILIES else "gpt2"
    recipe = RECIPE_DEFAULTS[kd.recipe]
    chosen = {"lm_coef": 1.0 if family in method.lm_families else 0.0, **recipe,
              **dict(method.defaults)}
    chosen.update({f: v for fam, f, v in method.family_defaults if fam == family})
    for key, value in chosen.items():
        if values[key] is None:
            values[key] = value
    return KDParams(**values)
