"""`kdaudit benchmark`: a suite of runs (one per seed and variant) from `benchmarks/suites/`,
resumed where it stopped, and summarised across seeds with paired tests against `nokd`.

A suite file is a run config (the format of `kdaudit run --config`) with a `[benchmark]`
table: the `preset` it starts from, the `seeds`, a `description`, and optionally `variants`,
each a table of overrides run beside the others (the paper's three student sizes). Runs go to
`<out>/<suite>/<variant>/seed<k>/`; a run whose `benchmark_done.json` matches its config is
finished and never redone, an unfinished one resumes stage by stage.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from kdaudit.config import ConfigError, RunConfig, load_config, read_toml
from kdaudit.store import atomic_write_json, atomic_write_text, stable_hash

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
    return stable_hash(cfg.to_dict())


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
            runner(cfg, log=log)
            atomic_write_json(cfg.run_dir / DONE, {"config": _fingerprint(cfg), "seed": seed,
                                                  "variant": variant})
    return write_summary(suite, out, seeds)


# -- across seeds -------------------------------------------------------------------------------
def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged): the Mann–Whitney statistic."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    return float((ranks[labels == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def paired_auc_test(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                    n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """ΔAUC = AUC(model) − AUC(baseline), averaged over seeds, with a paired hierarchical
    bootstrap: seeds drawn with replacement, then members and non-members within each seed,
    the same records for both models. `pairs` holds (labels, model scores, baseline scores)
    per seed. Returns the observed Δ, its 95% interval and the two-sided bootstrap p-value."""
    rng = np.random.default_rng(seed)
    observed = float(np.mean([_auc(y, a) - _auc(y, b) for y, a, b in pairs]))
    draws = np.empty(n_bootstrap)
    for i in range(n_bootstrap):
        picked = rng.integers(len(pairs), size=len(pairs)) if len(pairs) > 1 else [0]
        deltas = []
        for k in picked:
            y, a, b = pairs[k]
            idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=int((y == c).sum()))
                                  for c in (1, 0)])
            deltas.append(_auc(y[idx], a[idx]) - _auc(y[idx], b[idx]))
        draws[i] = np.mean(deltas)
    low, high = np.percentile(draws, [2.5, 97.5])
    p = min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean()))
    return {"delta": observed, "ci_low": float(low), "ci_high": float(high), "p": float(p)}


def verdict(test: dict[str, float]) -> str:
    if test["ci_low"] > 0:
        return "leaks more than nokd"
    if test["ci_high"] < 0:
        return "leaks less than nokd"
    return "no significant difference"


def _scores(run_dir: Path, model: str) -> pd.DataFrame | None:
    path = run_dir / "scores" / f"{model}.parquet"
    return pd.read_parquet(path).set_index("record_id") if path.exists() else None


def metric_spread(run_dirs: Sequence[Path], metric: str) -> pd.DataFrame:
    """Per model and signal, `metric` of each run's mia table: mean, sd, min, max, runs."""
    mia = pd.concat([pd.read_csv(d / "tables" / "mia.csv") for d in run_dirs])
    rows = mia[mia["metric"] == metric].copy()
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce")
    return (rows.groupby(["model", "signal"], sort=False)["value"]
            .agg(mean="mean", sd="std", low="min", high="max", seeds="count").reset_index())


def spread_heatmaps(run_dirs: Sequence[Path], out: Path) -> list[tuple[str, Path]]:
    """AUC and TPR-at-1%-FPR heatmaps (model × signal) of the mean over the runs, each cell
    "mean±sd"; (title, path) of those drawn."""
    from kdaudit.report import plots
    from kdaudit.report.tables import signal_order

    drawn = []
    for metric, title in (("auc", "AUC"), ("tpr_at_1pct", "TPR at 1% FPR")):
        s = metric_spread(run_dirs, metric)
        if s.empty:
            continue
        mean = s.assign(metric=metric, value=s["mean"])
        sd = s.assign(metric=metric, value=s["sd"])
        order = list(dict.fromkeys(s["model"]))
        png = plots.leakage_heatmap(mean, metric, order, signal_order(s["signal"]),
                                    out / f"heatmap_{metric}.png", spread=sd,
                                    title=f"{title}, mean ± sd over {len(run_dirs)} seed(s)")
        if png is not None:
            drawn.append((title, png))
    return drawn


def summarize(run_dirs: Sequence[Path], *, n_bootstrap: int = 1000
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(AUC per model and signal: mean, sd, min, max over the runs; the paired test of every
    model with scores against `nokd`, per signal)."""
    spread = metric_spread(run_dirs, "auc")
    tests = []
    baselines = {d: _scores(d, "nokd") for d in run_dirs}
    if all(b is not None for b in baselines.values()):
        models = sorted({p.stem for d in run_dirs for p in (d / "scores").glob("*.parquet")}
                        - {"nokd", "data", "teacher", "base_teacher", "base_student"})
        for model in models:
            frames = [(_scores(d, model), baselines[d]) for d in run_dirs]
            if any(f is None for f, _ in frames):
                continue
            signals = [c for c in frames[0][0].columns
                       if c in frames[0][1].columns and c not in ("label", "category")]
            for signal in signals:
                pairs = []
                for a, b in frames:
                    joined = a[["label", signal]].join(b[[signal]], rsuffix="_base").dropna()
                    pairs.append((joined["label"].to_numpy(int),
                                  joined[signal].to_numpy(float),
                                  joined[f"{signal}_base"].to_numpy(float)))
                t = paired_auc_test(pairs, n_bootstrap=n_bootstrap)
                tests.append({"model": model, "signal": signal, **t, "seeds": len(pairs),
                              "n_bootstrap": n_bootstrap, "verdict": verdict(t)})
    return spread, pd.DataFrame(tests)


STUDENT_EXCLUDED = {"nokd", "data", "teacher", "base_teacher", "base_student"}
RATIO_FLOOR = 0.55


def by_category(run_dirs: Sequence[Path], signal: str = "loss") -> pd.DataFrame:
    """AUC of `signal` per model and task category, the mean over the runs (categories with
    both members and non-members only)."""
    rows = []
    for d in run_dirs:
        for path in sorted((d / "scores").glob("*.parquet")):
            scores = pd.read_parquet(path)
            if signal not in scores or "category" not in scores or path.stem == "data":
                continue
            for category, g in scores.dropna(subset=[signal]).groupby("category"):
                if g["label"].nunique() == 2:
                    rows.append({"model": path.stem, "category": category,
                                 "auc": _auc(g["label"].to_numpy(int),
                                             g[signal].to_numpy(float))})
    if not rows:
        return pd.DataFrame(columns=["model", "category", "auc"])
    return pd.DataFrame(rows).groupby(["model", "category"], sort=False)["auc"].mean() \
        .reset_index()


def leakage_ratios(spread: pd.DataFrame) -> pd.DataFrame:
    """Per student and signal: (AUC − ½) / (teacher's AUC − ½), mean AUCs over the seeds:
    the share of the teacher's advantage over chance that the student kept; only where the
    teacher reaches `RATIO_FLOOR` (nearer ½ the ratio divides by noise)."""
    teacher = spread[spread["model"] == "teacher"].set_index("signal")["mean"]
    rows = []
    for r in spread[~spread["model"].isin(STUDENT_EXCLUDED)].itertuples():
        if r.signal in teacher and teacher[r.signal] >= RATIO_FLOOR:
            rows.append({"model": r.model, "signal": r.signal,
                         "ratio": (r.mean - 0.5) / (teacher[r.signal] - 0.5)})
    return pd.DataFrame(rows, columns=["model", "signal", "ratio"])


def write_summary(suite: Suite, out: Path, seeds: Sequence[int]) -> dict[str, Path]:
    """`<out>/<suite>/<variant>/summary.md`, `auc_across_seeds.csv`, `paired_tests.csv`: the
    AUC spread across seeds and the paired tests against nokd (`audit.n_bootstrap` draws)."""
    paths: dict[str, Path] = {}
    for variant in suite.variants:
        cfgs = [config(suite, variant, s, out) for s in seeds]
        spread, tests = summarize([c.run_dir for c in cfgs],
                                  n_bootstrap=cfgs[0].audit.n_bootstrap)
        categories = by_category([c.run_dir for c in cfgs])
        ratios = leakage_ratios(spread)
        root = out / suite.name / variant
        spread.to_csv(root / "auc_across_seeds.csv", index=False)
        tests.to_csv(root / "paired_tests.csv", index=False)
        categories.to_csv(root / "auc_by_category.csv", index=False)
        ratios.to_csv(root / "teacher_to_student.csv", index=False)
        figures = spread_heatmaps([c.run_dir for c in cfgs], root)
        paths[variant] = root / "summary.md"
        atomic_write_text(paths[variant], _summary_md(suite, variant, seeds, spread, tests,
                                                      categories, ratios, figures))
    return paths


def executive_summary(spread: pd.DataFrame, tests: pd.DataFrame) -> list[str]:
    """Which student leaks most, by how much above the nokd floor, and what to do."""
    students = spread[~spread["model"].isin(STUDENT_EXCLUDED) & (spread["signal"] != "blind")]
    if students.empty:
        return ["No student models in this suite."]
    top = students.loc[students["mean"].idxmax()]
    lines = [f"- The student that leaks most is **{top.model}**: AUC {top['mean']:.3f} on "
             f"`{top.signal}` (mean over the seeds)."]
    teacher = spread[(spread["model"] == "teacher") & (spread["signal"] == top.signal)]
    if not teacher.empty:
        lines.append(f"- The teacher, trained on the members, reaches "
                     f"{teacher['mean'].iloc[0]:.3f} on the same signal.")
    if not tests.empty:
        t = tests[(tests["model"] == top.model) & (tests["signal"] == top.signal)]
        if not t.empty:
            t = t.iloc[0]
            lines.append(f"- Against the no-leakage floor (`nokd`): ΔAUC {t.delta:+.3f} "
                         f"[{t.ci_low:+.3f}, {t.ci_high:+.3f}], {t.verdict}.")
        leaking = sorted(set(tests[tests["verdict"] == "leaks more than nokd"]["model"]))
        if leaking:
            lines.append(f"- Students that leak more than `nokd` on at least one signal: "
                         f"{', '.join(f'`{m}`' for m in leaking)}. Treat them as carrying "
                         f"the teacher's private data: do not release them as trained on public "
                         f"data alone; distil from a DP teacher or train a DP student instead "
                         f"(see the privacy–utility frontier of a run with `[dp]`).")
        else:
            lines.append("- No student leaks significantly more than `nokd` on any signal.")
    return lines


def _summary_md(suite: Suite, variant: str, seeds: Sequence[int], spread: pd.DataFrame,
                tests: pd.DataFrame, categories: pd.DataFrame | None = None,
                ratios: pd.DataFrame | None = None,
                figures: Sequence[tuple[str, Path]] = ()) -> str:
    lines = [f"# {suite.name} ({variant}): {len(seeds)} seed(s) {list(seeds)}", "",
             suite.description, "", "## Summary", "", *executive_summary(spread, tests), ""]
    for title, png in figures:
        lines += [f"![{title} heatmap]({png.name})", ""]
    lines += [
             "## AUC across seeds (mean ± sd [min, max])", "",
             "| model | signal | AUC |", "|---|---|---|"]
    for r in spread.itertuples():
        sd = "" if math.isnan(r.sd) else f" ± {r.sd:.3f}"
        lines.append(f"| {r.model} | {r.signal} | {r.mean:.3f}{sd} [{r.low:.3f}, {r.high:.3f}] |")
    if not tests.empty:
        lines += ["", "## Against nokd: ΔAUC, paired bootstrap over seeds and records", "",
                  "| model | signal | ΔAUC (95% CI) | p | verdict |", "|---|---|---|---|---|"]
        for r in tests.itertuples():
            p = f"< {1 / r.n_bootstrap:.3f}" if r.p == 0 else f"{r.p:.3f}"
            lines.append(f"| {r.model} | {r.signal} | {r.delta:+.3f} [{r.ci_low:+.3f}, "
                         f"{r.ci_high:+.3f}] | {p} | {r.verdict} |")
    if ratios is not None and not ratios.empty:
        lines += ["", "## Teacher → student: share of the teacher's AUC above ½ kept", "",
                  "| model | signal | ratio |", "|---|---|---|"]
        lines += [f"| {r.model} | {r.signal} | {r.ratio:.2f} |" for r in ratios.itertuples()]
    if categories is not None and not categories.empty:
        table = categories.pivot(index="category", columns="model", values="auc")
        lines += ["", "## Loss-signal AUC per task category (mean over seeds)", "",
                  "| category | " + " | ".join(table.columns) + " |",
                  "|---|" + "---|" * len(table.columns)]
        lines += [f"| {c} | " + " | ".join("—" if pd.isna(v) else f"{v:.3f}" for v in row)
                  + " |" for c, row in table.iterrows()]
    return "\n".join(lines) + "\n"


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


def _train_gib(shape, batch: int, length: int, lora: bool) -> float:
    """Full fine-tuning in fp32 AdamW (weights, grads, two moments: 16 bytes a parameter;
    LoRA: the frozen weights in 16 bits) plus activations (≈ 34·B·T·width bytes per layer at
    16 bits, Korthikanti et al. 2022, without recomputation) and the logits in fp32."""
    params, layers, width, vocab = shape
    weights = 2 * params if lora else 16 * params
    acts = 34 * batch * length * width * layers + 4 * batch * length * vocab * 2
    return (weights + acts) / GIB


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
        d, lora = cfg.data, "llama" in cfg.models.student.lower() and \
            "tiny" not in cfg.models.student
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
        for label, role, n, train in stages:
            steps = math.ceil(math.ceil(n / train.batch_size) * train.epochs)
            shape = shapes[role]
            extra = teacher_gib if role == "student" and METHODS[label].needs_teacher else 0.0
            mem = "unknown model" if shape is None else "{:.1f} GiB".format(
                extra + _train_gib(shape, train.batch_size, d.max_length,
                                   lora and role == "student"))
            lines.append(f"  {label:<20} {n:>9} {train.batch_size:>6} {train.epochs:>7g} "
                         f"{train.lr:>6g} {steps:>7}  {mem}")
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
