"""The configs of one run of the training loop: optimisation, KD hyperparameters and DP-SGD.

They live with the loop, which reads them; `kdaudit.config` composes them into a run's config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kdaudit.errors import ConfigError


@dataclass
class TrainConfig:
    """Optimisation of one run of the loop (`validate_train` checks it, naming the section)."""
    epochs: float = 1.0
    max_steps: int = 0                  # 0 = derived from epochs
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 200         # steps; 0 = only at the end
    log_every: int = 10


RECIPES = ("paper", "loss_only")

# KD options added after runs were first made, with the default that keeps the earlier
# behaviour: at that default they are left out of stage inputs (`Method.kd_inputs`) and suite
# fingerprints (`kdaudit.benchmark`), so a finished stage or run stays finished across the
# upgrade that added them.
LATER_KD_OPTIONS: dict[str, Any] = {"teacher_cache_topk": 0}


def without_later_defaults(kd: dict[str, Any]) -> dict[str, Any]:
    """KD values {field: value} less the `LATER_KD_OPTIONS` at their earlier behaviour."""
    return {f: v for f, v in kd.items()
            if f not in LATER_KD_OPTIONS or v != LATER_KD_OPTIONS[f]}


@dataclass
class KDConfig:
    """Hyperparameters of the KD methods (docs/methods.md §3–§4).

    `recipe` "paper" runs each method as the paper's code does (the GPT-2, OPT and LLaMA
    scripts of Zhang et al.'s repository and LMOps's MiniLLM): the pretraining LM term,
    replay buffers, DistiLLM's schedule on the validation cross-entropy, MiniLLM's PPO rounds.
    "loss_only" keeps each method's loss and data source and drops the rest (no LM term, no
    replay, one policy-gradient step per fresh rollout, no reward scaling, clipping or
    whitening). A field left at None takes the recipe's value for the method and the student's
    family (`kdaudit.train.methods.method_params`); set it to depart from the recipe.
    """
    recipe: str = "paper"
    kd_ratio: float | None = None       # KD term vs CE: 1.0 (LLaMA kd, seqkd: 0.5)
    temperature: float = 1.0            # divides both logits; the KD term is scaled by τ²
    on_policy_fraction: float | None = None  # share of student-written batches: imitkd 1, gkd .5
    jsd_beta: float = 0.1               # GKD: m = β p + (1 − β) q
    skew_alpha: float = 0.1             # DistiLLM: KL(q ‖ (1 − α) p + α q)
    # the pretraining LM term: lm_coef · [(1 − lm_kd_ratio) CE + lm_kd_ratio H(p_T, q)] on a
    # batch of the public corpus each step; paper: 1 for the methods whose scripts pass
    # --lm-data-dir (GPT-2: imitkd, distillm, minillm; OPT: all six; LLaMA: all but kd, seqkd)
    lm_coef: float | None = None
    lm_kd_ratio: float | None = None    # paper: 0.5 for MiniLLM (its pt_loss), else 0 (CE only)
    lm_corpus: str = "builtin"          # "builtin", a .txt / .jsonl file, or a HF dataset name
    lm_corpus_records: int = 10000      # texts taken from a file or dataset
    replay_size: int | None = None      # ImitKD/GKD/DistiLLM buffer: paper 1000, 0 = none
    distillm_init_prob: float | None = None  # starting threshold: paper 0 (LLaMA 0.2)
    distillm_replay_schedule: str = "decreasing"  # fresh share of a student batch over time
    loss_eps: float = 0.1               # DistiLLM: validation-CE rise that raises it by 0.1
    eval_every: int = 0                 # DistiLLM: steps between validation CEs; 0 = each epoch
    teacher_mix_alpha: float = 0.2      # MiniLLM: sample from (1 − α) q + α p
    minillm_clip: float = 0.2           # MiniLLM: PPO clip of w·ρ
    minillm_discount: float = 0.95      # MiniLLM: γ of the length-normalised return
    minillm_rollouts: int | None = None     # prompts sampled per round: paper 256 (0 = a batch)
    minillm_ppo_epochs: int | None = None   # passes over a round's rollouts: paper 4
    minillm_reward_scaling: float | None = None  # rewards divided by it: paper 0.5
    minillm_reward_clip: float | None = None     # |reward| clipped to it: paper 100 (0 = off)
    minillm_whiten: bool | None = None      # whiten advantages per mini-batch: paper true
    max_new_tokens: int = 256           # sampled responses: paper 512 − 256 prompt tokens
    sample_temperature: float = 1.0     # sampling temperature (paper: 1, top-k 0, top-p 1)
    top_p: float = 1.0
    soft_label_weight: float = 0.4      # DistilDP: weight of the teacher's soft labels
    hidden_weight: float = 0.0          # DistilDP: weight of the hidden-state MSE
    # off-policy methods (kd, seqkd, dpkd, distildp without the hidden term): 0 runs the teacher
    # every step (the paper's code); k > 0 keeps its k most likely log-probabilities per
    # response token from the first epoch (the rest of the mass spread evenly) and reuses them
    # (`kdaudit.train.teacher_cache`); k ≥ the vocabulary keeps them all, exactly
    teacher_cache_topk: int = 0

    def __post_init__(self) -> None:
        validate_kd(self)


@dataclass(frozen=True)
class KDParams:
    """The KD hyperparameters one run trains with: a `KDConfig` with every None resolved by
    the recipe, the method and the student family (`kdaudit.train.methods.method_params`).

    Losses and batch sources read these attributes and nothing else, so a default lives in one
    place. `per_sequence` (set by DP-SGD) asks a loss for the mean over the batch of each
    sequence's mean token loss: one example's gradient then ignores the others' lengths.
    """
    recipe: str
    kd_ratio: float
    temperature: float
    on_policy_fraction: float
    jsd_beta: float
    skew_alpha: float
    lm_coef: float
    lm_kd_ratio: float
    lm_corpus: str
    lm_corpus_records: int
    replay_size: int
    distillm_init_prob: float
    distillm_replay_schedule: str
    loss_eps: float
    eval_every: int
    teacher_mix_alpha: float
    minillm_clip: float
    minillm_discount: float
    minillm_rollouts: int
    minillm_ppo_epochs: int
    minillm_reward_scaling: float
    minillm_reward_clip: float
    minillm_whiten: bool
    max_new_tokens: int
    sample_temperature: float
    top_p: float
    soft_label_weight: float
    hidden_weight: float
    teacher_cache_topk: int = 0
    per_sequence: bool = False


@dataclass(kw_only=True)
class DPSGDOptions:
    """How a DP-SGD run trains, whatever its budget (shared by `DPConfig`, a run's [dp]
    section and the teacher and student jobs): the clipping norm; the privacy unit, a person
    (records sharing a `group`, or copies of one record) unless "record"; secret randomness
    unless `reproducible_noise`; and `gradient_canaries` Dirac canaries for the white-box
    one-run lower bound on ε (0: none), guessing on `canary_guess_fraction` each way."""
    max_grad_norm: float = 1.0          # per-unit clipping norm C
    unit: str = "person"                # "person" | "record"
    reproducible_noise: bool = False    # True: noise and sampling from the run's seed
    gradient_canaries: int = 4000       # a 4000-float parameter block: free next to a model
    canary_guess_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.max_grad_norm <= 0:
            raise ConfigError(f"dp.max_grad_norm: expected > 0, got {self.max_grad_norm}")
        if self.unit not in ("person", "record"):
            raise ConfigError(f"dp.unit: expected 'person' or 'record', got {self.unit!r}")
        if not isinstance(self.reproducible_noise, bool):
            raise ConfigError(f"dp.reproducible_noise: expected true or false, got "
                              f"{self.reproducible_noise!r}")
        if isinstance(self.gradient_canaries, bool) or not isinstance(
                self.gradient_canaries, int) or self.gradient_canaries < 0:
            raise ConfigError(f"dp.gradient_canaries: expected an integer ≥ 0, got "
                              f"{self.gradient_canaries!r}")
        if not 0 < self.canary_guess_fraction <= 0.5:
            raise ConfigError(f"dp.canary_guess_fraction: expected 0 < f ≤ 0.5, got "
                              f"{self.canary_guess_fraction!r}")

    def dp_sgd_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DPSGDOptions)}


@dataclass
class DPConfig(DPSGDOptions):
    """DP-SGD (docs/methods.md §5–§6): Gaussian noise solved from a target (ε, δ), or the LMO-DP
    mechanism configured by a parameter file (its ε is then what the file's noise gives)."""
    epsilon: float = 8.0
    delta: float | None = None          # None: 1 / (10 · number of units)
    noise_multiplier: float | None = None  # None: solved from epsilon (0.1% in ε)
    mechanism: str = "gaussian"         # "gaussian" | "lmo"
    lmo_params: str | None = None       # mechanism "lmo": the LMO-DP parameter file

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon <= 0:
            raise ConfigError(f"dp.epsilon: expected > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta: expected 0 < δ < 1, got {self.delta}")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ConfigError(f"dp.noise_multiplier: expected > 0, got "
                              f"{self.noise_multiplier}")
        if self.mechanism not in ("gaussian", "lmo"):
            raise ConfigError(f"dp.mechanism: expected 'gaussian' or 'lmo', got "
                              f"{self.mechanism!r}")
        if (self.mechanism == "lmo") != (self.lmo_params is not None):
            raise ConfigError("dp.lmo_params: a parameter file goes with mechanism 'lmo', "
                              "and mechanism 'lmo' needs one")


def validate_train(cfg: TrainConfig, where: str = "train") -> None:
    """Range checks for a training config, before any stage runs; the message names
    `where` (the config section) and the field."""
    for name, ok, expected in (
            ("epochs", cfg.epochs > 0, "> 0 (a fraction trains part of an epoch)"),
            ("max_steps", cfg.max_steps >= 0, "≥ 0 (0: from epochs)"),
            ("batch_size", cfg.batch_size >= 1, "≥ 1"),
            ("lr", cfg.lr > 0, "> 0"),
            ("weight_decay", cfg.weight_decay >= 0, "≥ 0"),
            ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "0 ≤ warmup_ratio < 1"),
            ("grad_clip", cfg.grad_clip >= 0, "≥ 0 (0: no clipping)"),
            ("checkpoint_every", cfg.checkpoint_every >= 0, "≥ 0 steps (0: only at the end)"),
            ("log_every", cfg.log_every >= 1, "≥ 1 step")):
        if not ok:
            raise ConfigError(f"{where}.{name}: expected {expected}, got "
                              f"{getattr(cfg, name)!r}")


def validate_kd(kd: KDConfig, where: str = "kd") -> None:
    """Range checks for the KD hyperparameters; the message names the field."""
    def check(name: str, ok: bool, expected: str) -> None:
        value = getattr(kd, name)
        if value is not None and not ok:
            raise ConfigError(f"{where}.{name}: expected {expected}, got {value!r}")

    unit = lambda v: v is None or 0 <= v <= 1  # noqa: E731
    opt = lambda ok: (lambda v: v is None or ok(v))  # noqa: E731
    if kd.recipe not in RECIPES:
        raise ConfigError(f"{where}.recipe: expected one of {list(RECIPES)}, got {kd.recipe!r}")
    check("kd_ratio", unit(kd.kd_ratio), "0 ≤ kd_ratio ≤ 1")
    check("temperature", kd.temperature > 0, "> 0")
    check("on_policy_fraction", unit(kd.on_policy_fraction), "a fraction in [0, 1]")
    check("jsd_beta", 0 < kd.jsd_beta < 1, "0 < β < 1 (β = 0 or 1 is a plain KL: use it)")
    check("skew_alpha", 0 <= kd.skew_alpha <= 1, "0 ≤ α ≤ 1")
    check("lm_coef", opt(lambda v: v >= 0)(kd.lm_coef), "≥ 0")
    check("lm_kd_ratio", unit(kd.lm_kd_ratio), "0 ≤ lm_kd_ratio ≤ 1")
    check("lm_corpus", isinstance(kd.lm_corpus, str) and kd.lm_corpus.strip() != "",
          "'builtin', a file or a dataset name")
    check("lm_corpus_records", kd.lm_corpus_records >= 1, "≥ 1")
    check("replay_size", opt(lambda v: v >= 0)(kd.replay_size), "≥ 0 (0: no buffer)")
    check("distillm_init_prob", unit(kd.distillm_init_prob), "a probability")
    check("distillm_replay_schedule",
          kd.distillm_replay_schedule in ("decreasing", "constant", "increasing"),
          "'decreasing', 'constant' or 'increasing'")
    check("loss_eps", kd.loss_eps >= 0, "≥ 0")
    check("eval_every", kd.eval_every >= 0, "≥ 0 steps (0: once per epoch)")
    check("teacher_mix_alpha", 0 <= kd.teacher_mix_alpha < 1, "0 ≤ α < 1")
    check("minillm_clip", kd.minillm_clip > 0, "> 0")
    check("teacher_cache_topk", not isinstance(kd.teacher_cache_topk, bool)
          and isinstance(kd.teacher_cache_topk, int) and kd.teacher_cache_topk >= 0,
          "an integer ≥ 0 (0: no cache)")
    check("minillm_discount", 0 < kd.minillm_discount <= 1, "0 < γ ≤ 1")
    check("minillm_rollouts", opt(lambda v: v >= 0)(kd.minillm_rollouts),
          "≥ 0 (0: one batch per round)")
    check("minillm_ppo_epochs", opt(lambda v: v >= 1)(kd.minillm_ppo_epochs), "≥ 1")
    check("minillm_reward_scaling", opt(lambda v: v > 0)(kd.minillm_reward_scaling), "> 0")
    check("minillm_reward_clip", opt(lambda v: v >= 0)(kd.minillm_reward_clip),
          "≥ 0 (0: no clipping)")
    check("minillm_whiten", kd.minillm_whiten is None or isinstance(kd.minillm_whiten, bool),
          "true or false")
    check("max_new_tokens", kd.max_new_tokens >= 1, "≥ 1 token")
    check("sample_temperature", kd.sample_temperature >= 0, "≥ 0 (0 = greedy)")
    check("top_p", 0 < kd.top_p <= 1, "0 < top_p ≤ 1")
    check("soft_label_weight", 0 <= kd.soft_label_weight <= 1, "a weight in [0, 1]")
    check("hidden_weight", kd.hidden_weight >= 0, "≥ 0")
