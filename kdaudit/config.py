"""Typed run configuration, presets loaded from TOML, and strict validation.

A config is a tree of dataclasses. Presets live in `kdaudit/presets/<name>.toml` and are
overlays on the defaults below, or on the preset they name in `extends`; a user's TOML file
is one more overlay. Unknown fields are
errors that name the file and the field.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kdaudit.errors import ConfigError
from kdaudit.train.config import (DPConfig, DPSGDOptions, KDConfig, TrainConfig, validate_kd,
                                  validate_train)

__all__ = ["AuditConfig", "ConfigError", "DPConfig", "DPRunConfig", "DataConfig", "KDConfig",
           "ModelsConfig", "RunConfig", "TrainConfig", "load_config", "presets",
           "validate_kd"]

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    source: str = "builtin"           # "builtin", a .jsonl/.csv/.parquet path, or a HF dataset
    mapping: str | None = None         # "dolly" | "alpaca" | "kdaudit" (guessed when empty)
    pool_size: int = 3000              # builtin: records generated for the pool
    n_members: int = 1000
    n_nonmembers: int = 1000           # held out; equal to n_members by convention
    n_public: int = 1000               # students' split; 0 = everything left
    n_validation: int = 100            # carved from public
    pretrain_records: int = 4000       # builtin pre-training corpus (its own seed, no shared person)
    pretrain_seed: int = 1_000_003
    max_length: int = 192              # tokens per training sequence
    dedup_ngram: int = 8               # n for the near-duplicate check
    dedup_threshold: float = 0.7       # share of a response's n-grams found in another split
    canaries_repeated: int = 0          # canaries for exposure, each inserted canary_repeats×
    canary_repeats: int = 10
    canaries_once: int = 0              # canaries for the one-run ε bound, each in with p = ½

    def __post_init__(self) -> None:
        for name in ("n_members", "n_nonmembers"):
            if getattr(self, name) < 2:
                raise ConfigError(f"data.{name}: expected at least 2, got {getattr(self, name)}")
        if self.n_validation < 0 or self.n_public < 0:
            raise ConfigError("data.n_public and data.n_validation must be ≥ 0")
        if self.max_length < 16:
            raise ConfigError(f"data.max_length: expected at least 16, got {self.max_length}")


@dataclass
class ModelsConfig:
    teacher: str = "gpt2-tiny-teacher"  # a zoo preset, or any from_pretrained name / path
    student: str = "gpt2-tiny-student"
    vocab_size: int = 2048              # offline BPE tokenizer (zoo presets only)
    # the `ref_ext` signal's independent model: "" (none), "builtin" (the student preset
    # pretrained on an independently seeded corpus with its own tokenizer), or a model
    # folder / hub name (its own tokenizer is used; NLL is compared per byte if it differs)
    external: str = ""
    cache_dir: str | None = None        # pretrained tiny bases; default ~/.cache/kdaudit


@dataclass
class DPRunConfig(DPSGDOptions):
    """The DP students of a run (docs/methods.md §7): every method of `methods` that is a DP method
    (distildp, synthetic_only, dpsgd_student, dpkd) is trained once per total ε here; `inf`
    trains the same recipe without noise (the frontier's non-private point)."""
    epsilons: list[float] = field(default_factory=lambda: [2.0, math.inf])
    delta: float | None = None          # total δ; None: 1 / (10 · number of private units)
    synthetic_records: int = 1000       # records the DP teacher writes for distildp
    synthetic_tokens: int = 160         # longest synthetic record, in tokens
    # DistilDP samples with no-repeat-ngram 2, made for free text; on template records it
    # bans the template's own repeated bigrams (the header before Instruction and Response).
    # Measured on tiny's DP teacher at ε = 2 (1,000 samples): 370 parse at 0, none at 2, so
    # the DistilDP student could not be trained at 2. 0 turns it off; 2 is the paper's.
    no_repeat_ngram: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [e for e in self.epsilons if not e > 0]
        if bad or not self.epsilons:
            raise ConfigError(f"dp.epsilons: expected a non-empty list of ε > 0 (inf for "
                              f"non-private), got {self.epsilons}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta: expected 0 < δ < 1, got {self.delta}")
        if self.synthetic_records < 1 or self.synthetic_tokens < 8:
            raise ConfigError("dp: expected synthetic_records ≥ 1 and synthetic_tokens ≥ 8")


@dataclass
class AuditConfig:
    signals: list[str] = field(default_factory=lambda: ["loss", "zlib", "lowercase", "mink",
                                                        "minkpp", "ref_base", "blind"])
    mink_k: float = 0.2
    perturbations: int = 10             # MoPe and per-block risk: noise draws per model
    perturbation_sigma: float = 0.01
    block_risk: bool = False            # per-block MoPe (n_blocks × perturbations passes)
    canary_candidates: int = 500        # random secrets ranked against each repeated canary
    canary_guess_fraction: float = 0.1  # one-run audit: guess "in" / "out" for this share each
    batch_size: int = 64
    n_bootstrap: int = 1000
    memorization_tokens: int = 32
    memorization_records: int = 1000    # per side (members, non-members)
    teacher_threshold: float = 0.5      # r of the teacher-conditional rate
    extraction_samples: int = 0         # top-k samples per prompt for sampled extraction
    utility_records: int = 200          # non-members answered greedily for ROUGE-L (0 = off)
    utility_tokens: int = 64            # longest greedy answer
    redact: bool = True                 # redact secrets in report examples

    def __post_init__(self) -> None:
        from attacks.mia import SIGNALS

        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise ConfigError(f"audit.signals: unknown signal(s) {unknown}; available: "
                              f"{sorted(SIGNALS)}")
        if not self.signals:
            raise ConfigError(f"audit.signals: expected at least one signal; available: "
                              f"{sorted(SIGNALS)}")
        if not 0 < self.mink_k <= 1:
            raise ConfigError(f"audit.mink_k: expected 0 < k ≤ 1, got {self.mink_k}")
        at_least = {"perturbations": 1, "batch_size": 1, "n_bootstrap": 1,
                    "memorization_tokens": 1, "memorization_records": 0,
                    "canary_candidates": 0, "extraction_samples": 0, "utility_records": 0,
                    "utility_tokens": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"audit.{name}: expected ≥ {low}, got {getattr(self, name)}")
        # (0, high]: the guessed share is taken each way, so at most half
        for name, high in (("perturbation_sigma", math.inf), ("canary_guess_fraction", 0.5),
                           ("teacher_threshold", 1.0)):
            value = getattr(self, name)
            if not (0 < value <= high and math.isfinite(value)):
                raise ConfigError(f"audit.{name}: expected a number in (0, {high:g}], "
                                  f"got {value}")


@dataclass
class RunConfig:
    name: str = "tiny"
    seed: int = 0
    out_dir: str = "runs"
    mixed_precision: str = "no"         # "no" | "bf16" | "fp16" (Accelerate)
    methods: list[str] = field(default_factory=lambda: ["nokd", "kd"])
    reference_models: int = 0           # K ≥ 4 reference teachers (and students): LiRA / RMIA
    # model families run side by side (e.g. ["gpt2", "opt", "llama"]); `models.teacher` and
    # `models.student` then name presets with a "{family}" placeholder. Empty: one family.
    families: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0, lr=2e-3))
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8.0, lr=1e-3))
    student: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3.0, lr=1e-3))
    # per-method departures from `student` ({"kd": {"lr": 5e-5}}): the paper tunes each
    # method's learning rate (and batch size) on its own
    student_by_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    kd: KDConfig = field(default_factory=KDConfig)
    dp: DPRunConfig = field(default_factory=DPRunConfig)
    # DP-SGD runs (DP teachers, dpsgd_student, dpkd) and their non-private twins: large
    # batches, as DP-SGD needs them for signal over noise
    dp_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8.0, lr=2e-3,
                                                                      batch_size=64))
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        """The checks that span sections; each section checks its own fields."""
        from kdaudit.train.methods import METHODS

        if self.reference_models < 0 or 0 < self.reference_models < 4:
            raise ConfigError(f"reference_models: expected 0 (off) or at least 4 (LiRA needs "
                              f"two references on each side of every record), got "
                              f"{self.reference_models}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods: unknown method(s) {unknown}; implemented: "
                              f"{sorted(k for k in METHODS if METHODS[k].student)}")
        by_reference = [s for s in self.audit.signals if s in ("lira", "lira_offline", "rmia")]
        if by_reference and not self.reference_models:
            raise ConfigError(f"audit.signals: {by_reference} need reference models: set "
                              f"reference_models to 4 or more")
        if "ref_ext" in self.audit.signals and not self.models.external:
            raise ConfigError("audit.signals: 'ref_ext' needs an independent model: set "
                              "models.external = \"builtin\" or a model folder / hub name")
        if len(set(self.families)) != len(self.families):
            raise ConfigError(f"families: a family is listed twice in {self.families}")
        for role in ("teacher", "student") if self.families else ():
            name = getattr(self.models, role)
            if "{family}" not in name:
                raise ConfigError(f"models.{role}: with several families it must contain "
                                  f"the placeholder '{{family}}', e.g. '{{family}}-tiny-{role}'; "
                                  f"got {name!r}")
        for section in ("pretrain", "teacher", "student", "dp_train"):
            validate_train(getattr(self, section), section)
        for method, changes in self.student_by_method.items():
            if method not in self.methods or not isinstance(changes, dict):
                raise ConfigError(f"student_by_method.{method}: expected a table of [student] "
                                  f"fields for one of the run's methods {self.methods}")
            self.student_train(method)       # checks the fields and their types
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision: expected 'no', 'bf16' or 'fp16', got "
                              f"{self.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def student_train(self, method: str) -> TrainConfig:
        """The training config of `method`'s student: `student` with its departures."""
        train = _overlay(self.student, self.student_by_method.get(method, {}),
                         f"student_by_method.{method}")
        validate_train(train, f"student_by_method.{method}")
        return train

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def for_family(self, family: str) -> "RunConfig":
        """The single-family run of a multi-family config: models named for `family`, run
        directory `<run_dir>/<family>`."""
        models = dataclasses.replace(self.models,
                                     teacher=self.models.teacher.format(family=family),
                                     student=self.models.student.format(family=family))
        return dataclasses.replace(self, families=[], name=family, out_dir=str(self.run_dir),
                                   models=models)


NON_FINITE = ("inf", "-inf", "nan")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, item = get_args(hint)
        return {k: _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    args = get_args(hint)
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and value in NON_FINITE:   # strict JSON (the manifest) spells ∞ "inf"
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or
                                          (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _overlay(obj: Any, updates: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass `obj` with `updates` applied recursively and type-checked."""
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown field '{key}'; expected one of {names}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table, got {value!r}")
            changes[key] = _overlay(current, value, f"{where}.{key}")
        else:
            changes[key] = _check_type(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start}); TOML files are UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _preset(name: str, below: tuple[str, ...] = ()) -> RunConfig:
    """The preset's config: kdaudit's defaults, then the preset it `extends` (if any), then
    its own fields. Its name is the preset's unless it sets one."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        where = f" (extended by preset '{below[-1]}')" if below else ""
        raise ConfigError(f"unknown preset '{name}'{where}; expected one of {presets()}")
    if name in below:
        raise ConfigError(f"{path}: presets extend each other in a cycle: "
                          f"{' -> '.join((*below, name))}")
    table = read_toml(path)
    base = table.pop("extends", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected a preset name, got {base!r}")
    cfg = _preset(base, (*below, name)) if base else RunConfig()
    return _overlay(dataclasses.replace(cfg, name=name), table, str(path))


def load_config(preset: str | None = "demo", config_file: str | Path | None = None,
                **overrides: Any) -> RunConfig:
    """Defaults, then the preset, then `config_file`, then keyword overrides (e.g. seed=1)."""
    cfg = _preset(preset) if preset else RunConfig()
    if config_file:
        try:
            cfg = _overlay(cfg, read_toml(config_file), str(config_file))
        except ConfigError as e:   # a check across fields: say which file set them
            if str(config_file) in str(e):
                raise
            raise ConfigError(f"{config_file}: {e}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        cfg = _overlay(cfg, overrides, "overrides")
    return cfg


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `RunConfig.to_dict()` output (e.g. a manifest)."""
    return _overlay(RunConfig(), d, "config")
