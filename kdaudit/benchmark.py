"""`kdaudit benchmark`: a suite of runs (one per seed and variant) from `benchmarks/suites/`,
resumed where it stopped, and summarised across seeds with paired tests against `nokd`.

A suite file is a run config (the format of `kdaudit run --config`) with a `[benchmark]`
table: the `preset` it starts from, the `seeds`, a `description`, and optionally `variants`,
each a table of overrides run beside the others (the paper's three student sizes). Runs go to
`<out>/<suite>/<variant>/seed<k>/`; a run whose `benchmark_done.json` matches its config is
finished and never redone, an unfinished one resumes stage by stage.

Each variant is then summarised across its seeds (`kdaudit.across_seeds`: tables in
`<out>/<suite>/<variant>/tables/`) and its report rendered from those tables alone
(`kdaudit.report.benchmark`); `publish` copies the tables to `reports/` and renders the
checked-in reference report there.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kdaudit.config import ConfigError, RunConfig, load_config, read_toml
from kdaudit.store import atomic_write_json, stable_hash
from kdaudit.train.config import without_later_defaults

SUITE_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "suites"
DONE = "benchmark_done.json"


@dataclass
class Suite:
    """A benchmark suite as its file says: run overrides per variant, seeds, a description."""
    name: str
    path: Path
    preset: str | None                  # None: kdaudit's defaults
    seeds: list[int]
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"main": {}})


def suites() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.toml")
                  if "benchmark" in read_toml(p))


def load_suite(name: str | Path) -> Suite:
    """A suite by name (a file of `benchmarks/suites/`) or by path; every run config it
    implies is checked here, before any work."""
    path = Path(name)
    if not path.is_file():
        path = SUITE_DIR / f"{name}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown suite {str(name)!r}; expected a file or one of "
                              f"{suites()}")
    data = read_toml(path)
    bench = data.pop("benchmark", None)
    if not isinstance(bench, dict):
        raise ConfigError(f"{path}: no [benchmark] table (preset, seeds): a run config, "
                          f"not a suite; run it with `kdaudit run --config {path}`")
    unknown = set(bench) - {"preset", "seeds", "description", "variants"}
    if unknown:
        raise ConfigError(f"{path}: [benchmark] has unknown keys {sorted(unknown)}")
    seeds = bench.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and
                                                      not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{path}: benchmark.seeds: expected a non-empty list of integers, "
                          f"got {seeds!r}")
    variants = bench.get("variants") or {"main": {}}
    if not isinstance(variants, dict) or not all(isinstance(v, dict)
                                                 for v in variants.values()):
        raise ConfigError(f"{path}: benchmark.variants: expected tables of overrides")
    suite = Suite(str(data.pop("name", path.stem)), path, bench.get("preset"),
                  list(seeds), str(bench.get("description", "")), data, dict(variants))
    for variant in suite.variants:
        config(suite, variant, suite.seeds[0], Path("."))
    return suite


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config(suite: Suite, variant: str, seed: int, out: Path) -> RunConfig:
    """The run config of one (variant, seed) of the suite."""
    overrides = _merge(suite.overrides, suite.variants[variant])
    try:
        return load_config(suite.preset, **{**overrides, "seed": seed, "name": f"seed{seed}",
                                           "out_dir": str(out / suite.name / variant)})
    except ConfigError as e:
        raise ConfigError(f"{suite.path} (variant {variant!r}): {e}") from None


def _fingerprint(cfg: RunConfig) -> str:
    """The suite run's configuration, less the KD options added later while at their earlier
    behaviour (`LATER_KD_OPTIONS`)."""
    config = cfg.to_dict()
    config["kd"] = without_later_defaults(config["kd"])
    return stable_hash(config)


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its waited-for children, in MiB (Linux
    reports KiB, macOS bytes)."""
    import resource
    import sys

    unit = 1 / 2 ** 20 if sys.platform == "darwin" else 1 / 2 ** 10
    return unit * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def is_done(cfg: RunConfig) -> bool:
    marker = cfg.run_dir / DONE
    return marker.exists() and json.loads(marker.read_text()).get("config") == \
        _fingerprint(cfg)


def run_suite(suite: Suite, out: Path, seeds: Sequence[int] | None = None,
              log: Callable[[str], None] = print,
              runner: Callable[..., Any] | None = None) -> dict[str, Path]:
    """Run every (variant, seed) not yet finished, then write the cross-seed summary."""
    if runner is None:
        from kdaudit.pipeline import run as runner
    seeds = list(seeds) if seeds else suite.seeds
    for variant in suite.variants:
        for seed in seeds:
            cfg = config(suite, variant, seed, out)
            if is_done(cfg):
                log(f"[bench] {variant} seed {seed}: finished, skipped")
                continue
            log(f"[bench] {variant} seed {seed} → {cfg.run_dir}")
            started = time.perf_counter()
            runner(cfg, log=log)
            atomic_write_json(cfg.run_dir / DONE, {
                "config": _fingerprint(cfg), "seed": seed, "variant": variant,
                # this invocation's part of the run (a resumed run's earlier parts are in the
                # manifest's stage times) and the process's peak so far
                "wall_seconds": round(time.perf_counter() - started, 1),
                "peak_rss_mib": round(peak_rss_mib(), 1)})
    return write_summary(suite, out, seeds)


# -- across seeds -------------------------------------------------------------------------------
def variant_dir(suite: Suite, variant: str, out: Path) -> Path:
    return out / suite.name / variant


def write_summary(suite: Suite, out: Path, seeds: Sequence[int]) -> dict[str, Path]:
    """Per variant: `<out>/<suite>/<variant>/tables/*.csv` and `meta.json` (the statistics
    across seeds, `kdaudit.across_seeds`) and the report rendered from them alone
    (report.md, report.html, figures/). Returns each variant's report.md."""
    from kdaudit.across_seeds import suite_tables
    from kdaudit.report.benchmark import write_benchmark_report
    from kdaudit.store import atomic_write_frame

    paths: dict[str, Path] = {}
    for variant in suite.variants:
        cfgs = [config(suite, variant, s, out) for s in seeds]
        root = variant_dir(suite, variant, out)
        tables = suite_tables([c.run_dir for c in cfgs], n_bootstrap=cfgs[0].audit.n_bootstrap)
        for name, frame in tables.items():
            atomic_write_frame(root / "tables" / f"{name}.csv", frame)
        atomic_write_json(root / "meta.json", _meta(suite, variant, seeds, cfgs[0]))
        paths[variant] = write_benchmark_report(root)["md"]
    return paths


def _meta(suite: Suite, variant: str, seeds: Sequence[int], cfg: RunConfig) -> dict[str, Any]:
    """What the report says about the suite: its name, seeds, the config of the first seed
    (without the run's name and folder, so no local path is published) and the versions its
    manifest recorded."""
    config_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "out_dir")}
    manifest = cfg.run_dir / "manifest.json"
    versions = json.loads(manifest.read_text()).get("versions", {}) if manifest.exists() else {}
    return {"suite": suite.name, "variant": variant, "description": suite.description,
            "seeds": list(seeds), "suite_seeds": list(suite.seeds), "config": config_dict,
            "versions": versions}


def publish(suite: Suite, out: Path, dest: Path) -> dict[str, Path]:
    """Copy each variant's tables and meta.json from `out` to `dest/<suite>/` (one variant) or
    `dest/<suite>/<variant>/` and render the report there: the checked-in reference report
    that `make reports` rebuilds."""
    import shutil

    from kdaudit.report.benchmark import write_benchmark_report

    paths = {}
    for variant in suite.variants:
        src = variant_dir(suite, variant, out)
        if not (src / "meta.json").exists():
            raise FileNotFoundError(f"{src}: no finished summary; run `kdaudit benchmark "
                                    f"{suite.name} --out {out}` first")
        target = dest / suite.name if len(suite.variants) == 1 else dest / suite.name / variant
        if (target / "tables").exists():
            shutil.rmtree(target / "tables")
        shutil.copytree(src / "tables", target / "tables")
        shutil.copy2(src / "meta.json", target / "meta.json")
        paths[variant] = write_benchmark_report(target)["md"]
    return paths


# -- the plan (--dry-run) -----------------------------------------------------------------------
# (parameters, layers, width, vocabulary) of the paper's models, so that a plan needs no
# download; other hub names are listed as unchecked
KNOWN_MODELS: dict[str, tuple[float, int, int, int]] = {
    "gpt2": (124e6, 12, 768, 50257), "gpt2-medium": (355e6, 24, 1024, 50257),
    "gpt2-large": (774e6, 36, 1280, 50257), "gpt2-xl": (1558e6, 48, 1600, 50257),
    "facebook/opt-125m": (125e6, 12, 768, 50272), "facebook/opt-350m": (331e6, 24, 1024, 50272),
    "facebook/opt-1.3b": (1316e6, 24, 2048, 50272),
    "facebook/opt-2.7b": (2652e6, 32, 2560, 50272),
    "openlm-research/open_llama_3b": (3426e6, 26, 3200, 32000),
    "openlm-research/open_llama_7b": (6738e6, 32, 4096, 32000),
}
KNOWN_DATA = {"databricks/databricks-dolly-15k": 15011}
GIB = 2 ** 30


def _model_shape(name: str, vocab: int) -> tuple[float, int, int, int] | None:
    from kdaudit.models.zoo import ZOO

    if name in ZOO:
        e = ZOO[name]
        return 12 * e.layers * e.width ** 2 + vocab * e.width, e.layers, e.width, vocab
    return KNOWN_MODELS.get(name)


def _where(name: str) -> str:
    from kdaudit.models.zoo import ZOO

    if name in ZOO:
        return "builtin zoo preset (pretrained offline, cached)"
    if Path(name).exists():
        return "local folder"
    if name in KNOWN_MODELS:
        return "Hugging Face Hub (a paper model; fetched at run time)"
    return "UNCHECKED: not a zoo preset, local folder or known paper model"


GPU_GIB = 80e9 / GIB   # an 80 GB GPU (A100, H100), the largest the paper suites are sized for


def _train_gib(shape, batch: int, length: int) -> float:
    """Full fine-tuning (kdaudit's only kind) in fp32 AdamW: weights, grads and two moments,
    16 bytes a parameter; plus activations (≈ 34·B·T·width bytes per layer at 16 bits,
    Korthikanti et al. 2022, without recomputation) and the logits in fp32."""
    params, layers, width, vocab = shape
    acts = 34 * batch * length * width * layers + 4 * batch * length * vocab * 2
    return (16 * params + acts) / GIB


def plan(suite: Suite, out: Path, seeds: Sequence[int] | None = None) -> str:
    """What the suite would do, without doing it: per variant the models (and where they come
    from), the data, every training stage with its examples and steps and an estimate of its
    accelerator memory, the audit, and what is already finished under `out`."""
    from kdaudit.train.methods import METHODS

    seeds = list(seeds) if seeds else suite.seeds
    lines = [f"suite {suite.name} ({suite.path}): {suite.description}".rstrip(": "),
             f"seeds {seeds}; variants {list(suite.variants)}; output {out / suite.name}"]
    for variant in suite.variants:
        cfg = config(suite, variant, seeds[0], out)
        d = cfg.data
        lines += ["", f"== variant {variant}"]
        for role in ("teacher", "student"):
            name = getattr(cfg.models, role)
            lines.append(f"  {role}: {name}  [{_where(name)}]")
        source = d.source
        if source != "builtin" and not Path(source).exists() and source not in KNOWN_DATA:
            source += "  [UNCHECKED hub dataset]"
        lines.append(f"  data: {source}; members {d.n_members}, non-members {d.n_nonmembers}, "
                     f"public {d.n_public}, validation {d.n_validation}; max_length "
                     f"{d.max_length}")
        lines.append(f"  kd recipe {cfg.kd.recipe!r}, max_new_tokens {cfg.kd.max_new_tokens}")
        shapes = {r: _model_shape(getattr(cfg.models, r), cfg.models.vocab_size)
                  for r in ("teacher", "student")}
        canaries = d.canaries_repeated * d.canary_repeats + d.canaries_once // 2
        stages = [("teacher (sft)", "teacher", d.n_members + canaries, cfg.teacher)]
        stages += [(m, "student", d.n_public, cfg.student_train(m))
                   for m in cfg.methods if not METHODS[m].privacy]
        teacher_gib = 0.0 if shapes["teacher"] is None else 2 * shapes["teacher"][0] / GIB
        lines.append("  stage                 examples  batch  epochs     lr   steps  "
                     "est. memory (a KD student's includes the 16-bit teacher)")
        too_large = []
        for label, role, n, train in stages:
            steps = math.ceil(math.ceil(n / train.batch_size) * train.epochs)
            shape = shapes[role]
            extra = teacher_gib if role == "student" and METHODS[label].needs_teacher else 0.0
            gib = None if shape is None else extra + _train_gib(shape, train.batch_size,
                                                                d.max_length)
            if gib is not None and gib > GPU_GIB:
                too_large.append(label)
            mem = "unknown model" if gib is None else f"{gib:.1f} GiB"
            lines.append(f"  {label:<20} {n:>9} {train.batch_size:>6} {train.epochs:>7g} "
                         f"{train.lr:>6g} {steps:>7}  {mem}")
        if too_large:
            lines.append(f"  beyond one 80 GB GPU ({GPU_GIB:.1f} GiB): {', '.join(too_large)}; "
                         f"launch with benchmarks/accelerate/fsdp_gpus.yaml (FSDP shards the "
                         f"student)")
        private = [m for m in cfg.methods if METHODS[m].privacy]
        if private:
            lines.append(f"  DP students {private} at ε {cfg.dp.epsilons}, dp_train "
                         f"batch {cfg.dp_train.batch_size}, {cfg.dp_train.epochs:g} epochs")
        lines.append(f"  audit: {d.n_members} members vs {d.n_nonmembers} non-members; "
                     f"signals {cfg.audit.signals}; memorization "
                     f"{cfg.audit.memorization_records} records")
        for seed in seeds:
            c = config(suite, variant, seed, out)
            manifest = c.run_dir / "manifest.json"
            state = "finished" if is_done(c) else (
                f"started ({len(json.loads(manifest.read_text()).get('stages', {}))} stages "
                f"done)" if manifest.exists() else "not started")
            lines.append(f"  seed {seed}: {c.run_dir}  {state}")
    return "\n".join(lines)
