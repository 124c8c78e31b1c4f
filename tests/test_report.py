"""The risk report: files, self-containment, table cells, verdicts, redaction, escaping."""
from __future__ import annotations

import functools
import math
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from kdaudit.audit import AuditResult
from kdaudit.report import ReportTables, verdicts, write_report, write_suite_report
from kdaudit.report.plots import leakage_heatmap, training_curves
from kdaudit.report.redact import REDACTED, redact
from kdaudit.report.render import config_text, fence, heatmap_table
from kdaudit.report.tables import heatmap_order, signal_order

MODELS = ["teacher", "nokd", "kd"]
SIGNALS = ["loss", "zlib", "mink"]
SHIFT = {"teacher": 2.5, "nokd": 0.0, "kd": 0.8}  # member score shift: separability
N = 200
SECRET = "Quentin Ashworth-Vale"
SHORT_SECRET = "Ashworth"
UNREACHABLE = "FPR 0.1% not reachable with 200 non-members; smallest reachable FPR 0.5%"
# A fixed cell: the teacher's loss AUC is overwritten with these numbers.
KNOWN = {"value": 0.9312, "ci_low": 0.9051, "ci_high": 0.9544}
KNOWN_CELL = "0.93 [0.91, 0.95]"


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    return float(tpr[fpr <= target].max())


def _auc(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """AUC of each row (Mann-Whitney), vectorised over leading axes."""
    diff = members[..., :, None] - nonmembers[..., None, :]
    return (diff > 0).mean(axis=(-2, -1)) + 0.5 * (diff == 0).mean(axis=(-2, -1))


def _synthetic() -> tuple[pd.DataFrame, dict]:
    """A fresh copy of the cached synthetic mia table, and the ROC curves."""
    mia, roc = _synthetic_cached()
    return mia.copy(), roc


@functools.lru_cache(maxsize=1)
def _synthetic_cached(seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """mia rows and ROC curves from Gaussian scores (members shifted by SHIFT[model])."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(N), np.zeros(N)]
    rows, roc = [], {}
    for model in MODELS:
        roc[model] = {}
        for k, signal in enumerate(SIGNALS):
            nonmembers = rng.normal(0, 1, N)
            if SHIFT[model]:
                members = rng.normal(SHIFT[model] * (1 - 0.1 * k), 1, N)
            else:  # no leakage: members are the non-members' scores, shuffled and jittered
                members = rng.permutation(nonmembers) + rng.normal(0, 1e-3, N)
            scores = np.r_[members, nonmembers]
            fpr, tpr, _ = roc_curve(labels, scores)
            roc[model][signal] = (fpr, tpr)
            boots = _auc(scores[:N][rng.integers(0, N, (200, N))],
                         scores[N:][rng.integers(0, N, (200, N))])
            lo, hi = np.quantile(boots, [0.025, 0.975])
            base = dict(model=model, signal=signal, n_members=N, n_nonmembers=N, note=None)
            rows += [
                dict(base, metric="auc", value=roc_auc_score(labels, scores), ci_low=lo,
                     ci_high=hi),
                dict(base, metric="tpr_at_1pct", value=_tpr_at(fpr, tpr, 0.01),
                     ci_low=math.nan, ci_high=math.nan),
                dict(base, metric="tpr_at_0_1pct", value=math.nan, ci_low=math.nan,
                     ci_high=math.nan, note=UNREACHABLE),
            ]
    mia = pd.DataFrame(rows)
    known = (mia.model == "teacher") & (mia.signal == "loss") & (mia.metric == "auc")
    for col, v in KNOWN.items():
        mia.loc[known, col] = v
    return mia, roc


def _inputs() -> dict:
    mia, roc = _synthetic()
    rates = {"teacher": (0.61, 0.12), "nokd": (0.05, 0.05), "kd": (0.09, 0.06)}
    memorization = pd.DataFrame(
        [dict(model=m, metric="match_rate", split=s, value=v, n=N)
         for m, (a, b) in rates.items()
         for s, v in (("members", a), ("nonmembers", b), ("gap", a - b))]
        + [dict(model=m, metric=k, split="members", value=v, n=N)
           for m in MODELS for k, v in (("longest_prefix", 7.5), ("fully_extracted", 0.1),
                                        ("secret_extraction", 0.2))])
    utility = pd.DataFrame([dict(model=m, metric="perplexity", split="nonmembers", value=v)
                            for m, v in zip(MODELS, (8.1, 12.4, 10.2))])
    examples = pd.DataFrame([
        dict(model="teacher", record_id="r1", split="members",
             instruction="Write the account holder's <script>alert(1)</script> details",
             reference=f"The account belongs to {SECRET}.",
             generation=f"The account belongs to {SECRET}, also called {SHORT_SECRET}.",
             match_rate=0.97, secrets=[SHORT_SECRET, SECRET]),
        dict(model="kd", record_id="r2", split="members", instruction="Summarise the note.",
             reference="A short note.", generation="A short note.", match_rate=0.5, secrets=[]),
    ])
    models = pd.DataFrame({"model": MODELS, "role": ["teacher", "baseline", "student"],
                           "description": ["SFT on members", "student without KD", "forward KL"],
                           "family": "gpt2"})
    config = {"seed": 1, "data": {"n_members": N, "source": "builtin"},
              "train": {"kd": {"method": "kd", "temperature": 1.0}}}
    run_info = {"run": "test", "seed": 1, "wall_time_s": {"train": 12.5, "audit": 3.25}}
    utility = pd.concat([utility, pd.DataFrame([dict(model="kd", metric="rouge_l",
                                                     split="nonmembers", value=0.4321)])])
    steps = np.arange(1, 21)
    training = pd.concat([pd.DataFrame({"model": m, "step": steps, "loss": 3.0 / steps,
                                        "objective": 2.0 / steps}) for m in MODELS[1:]])
    return dict(mia=mia, roc=roc, memorization=memorization, utility=utility,
                examples=examples, models=models, config=config, run_info=run_info,
                training=training)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[bool, dict[str, str]]:
    """report.html / report.md text, with redaction on (True) and off (False)."""
    inputs = _inputs()
    out = {}
    for on in (True, False):
        if not on:  # only the examples matter here: skip the ROC plots to save time
            inputs["roc"] = {}
        tables = ReportTables(**{k: v for k, v in inputs.items() if k != "run_info"})
        paths = write_report(tmp_path_factory.mktemp(f"redact_{on}"), tables, redact=on,
                             run_info=inputs["run_info"])
        out[on] = {k: paths[k].read_text(encoding="utf-8") for k in ("html", "md")}
        out[on]["paths"] = paths
    return out


def test_files_written(reports) -> None:
    paths = reports[True]["paths"]
    assert {"html", "md", "auc_bars", "roc_teacher", "roc_nokd", "roc_kd"} <= set(paths)
    for p in paths.values():
        assert p.stat().st_size > 0
    assert paths["auc_bars"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_self_contained(reports) -> None:
    html = reports[True]["html"]
    # three ROC plots, the bar chart, two heatmaps, memorization against membership and the
    # training curves
    assert html.count("data:image/png;base64,") == 8
    assert 'src="http' not in html and "<link" not in html and "url(" not in html
    md = reports[True]["md"]
    assert "](roc_teacher.png)" in md and "](auc_bars.png)" in md
    assert "](memorization_vs_auc.png)" in md


def test_sections_in_order(reports) -> None:
    for text in (reports[True]["html"], reports[True]["md"]):
        heads = ["Verdict per model", "Membership inference results", "ROC curves",
                 "AUC by model and signal", "Leakage heatmaps", "Memorization", "Utility",
                 "Training curves", "Example generations", "Configuration and run information"]
        positions = [text.index(h) for h in heads]
        assert positions == sorted(positions)


def test_known_auc_cell_in_both(reports) -> None:
    for kind in ("html", "md"):
        assert KNOWN_CELL in reports[True][kind]
    assert f"<td>{KNOWN_CELL}</td>" in reports[True]["html"]
    assert re.search(r"\| teacher \| loss \| [^|]+ \| " + re.escape(KNOWN_CELL) + r" \|",
                     reports[True]["md"])


def test_unreachable_tpr_cell(reports) -> None:
    md = reports[True]["md"]
    row = next(line for line in md.splitlines() if line.startswith("| kd | zlib |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "n/a (min FPR 0.5%)"  # TPR @ 0.1% FPR
    assert cells[4].endswith("%") and not cells[4].startswith("n/a")  # TPR @ 1% FPR


def test_memorization_utility_config_rendered(reports) -> None:
    md = reports[True]["md"]
    assert "| teacher | 0.610 | 0.120 | +0.490 | 7.5 | 0.100 | 0.200 |" in md
    assert "| kd | 10.20 | 0.432 |" in md and "| teacher | 8.10 | — |" in md
    assert "Perplexity (non-members)" in md and "ROUGE-L (non-members)" in md
    assert "[train.kd]" in md and 'method = "kd"' in md
    assert "| wall_time_s.train | 12.5 |" in md


def test_verdicts_against_baseline() -> None:
    mia, _ = _synthetic()
    v = verdicts(mia).set_index("model")
    assert list(v.index) == MODELS
    assert v.loc["teacher", "verdict"] == "elevated"
    assert set(v.loc["teacher", "signals"]) == set(SIGNALS)
    # The strongest signal (highest AUC) is named with both intervals, and its TPR at 1% FPR.
    best = mia[(mia.model == "teacher") & (mia.metric == "auc")].sort_values("value").iloc[-1]
    base = mia[(mia.model == "nokd") & (mia.metric == "auc") & (mia.signal == best.signal)]
    text = v.loc["teacher", "text"]
    assert text.startswith(f"Elevated risk. Membership is detectable above the nokd "
                           f"baseline by {best.signal} (AUC {best.value:.2f} [")
    assert f" vs {base.value.iloc[0]:.2f} [" in text and "and 2 other signals." in text
    assert "1% false alarms" in text
    assert v.loc["nokd", "verdict"] == "not elevated"
    assert v.loc["nokd", "signals"] == []
    assert v.loc["nokd", "text"].startswith("No leakage detected above chance")


def test_verdicts_rule_is_strict_interval_comparison() -> None:
    def row(model: str, lo: float, hi: float) -> dict:
        return dict(model=model, signal="loss", metric="auc", value=(lo + hi) / 2, ci_low=lo,
                     ci_high=hi, n_members=N, n_nonmembers=N, note=None)

    mia = pd.DataFrame([row("nokd", 0.48, 0.55), row("kd", 0.55, 0.60), row("gkd", 0.56, 0.6)])
    v = verdicts(mia).set_index("model")["verdict"]
    assert v["kd"] == "not elevated"  # 0.55 is not above 0.55
    assert v["gkd"] == "elevated"
    assert v["nokd"] == "not elevated"


def test_verdicts_without_baseline() -> None:
    mia, _ = _synthetic()
    v = verdicts(mia[mia.model != "nokd"]).set_index("model")
    assert v.loc["teacher", "verdict"] == "elevated"
    assert "above chance" in v.loc["teacher", "text"]
    assert v.loc["kd", "verdict"] == "elevated"  # kd's AUC CI lies above 0.5
    # With a baseline name that is absent, every model is compared with 0.5.
    v2 = verdicts(mia, baseline="absent").set_index("model")
    assert v2.loc["nokd", "verdict"] == "not elevated"
    assert v2.loc["kd", "verdict"] == "elevated"


def test_redaction(reports) -> None:
    for kind in ("html", "md"):
        assert SECRET not in reports[True][kind]
        assert SHORT_SECRET not in reports[True][kind]
        assert REDACTED in reports[True][kind]
        assert "Redaction is on" in reports[True][kind]
        assert SECRET in reports[False][kind]
        assert "Redaction is off" in reports[False][kind]


def test_redact_longest_first_and_marker_safe() -> None:
    text = "Ann Lee lives at 4 RED Lane; ann lee again"
    expected = f"{REDACTED} lives at 4 {REDACTED} Lane; {REDACTED} again"
    assert redact(text, ["Ann", "Ann Lee", "RED"]) == expected
    assert redact("nothing here", []) == "nothing here"


def test_html_escaping(reports) -> None:
    html = reports[True]["html"]
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_missing_optional_inputs(tmp_path) -> None:
    mia, _ = _synthetic()
    paths = write_report(tmp_path, ReportTables(mia=mia, roc={}, memorization=None,
                                                utility=pd.DataFrame(), examples=pd.DataFrame(),
                                                models=None, config={}))
    md = paths["md"].read_text()
    for message in ("No ROC curves were provided", "No memorization results were provided",
                    "No utility results were provided", "No example generations were provided",
                    "No configuration was provided", "No run information was provided"):
        assert message in md
    assert "roc_teacher" not in paths


def test_fence_and_config_helpers() -> None:
    assert fence("a ``` b").startswith("````text\n")
    expected = "a = 1\n\n[b]\nc = true\n# d = (unset)"
    assert config_text({"a": 1, "b": {"c": True, "d": None}}) == expected


def test_heatmaps_show_the_table_numbers(reports) -> None:
    paths, md = reports[True]["paths"], reports[True]["md"]
    assert {"heatmap_auc", "heatmap_tpr_at_1pct", "training_curves"} <= set(paths)
    mia = _synthetic()[0]
    section = md[md.index("## Leakage heatmaps"):md.index("## Memorization")]
    assert "](heatmap_auc.png)" in section and "](heatmap_tpr_at_1pct.png)" in section
    rows = [line for line in section.splitlines() if line.startswith("| kd |")]
    assert len(rows) == 2  # one table per heatmap: AUC, then TPR at 1% FPR
    for row, metric in zip(rows, ("auc", "tpr_at_1pct")):
        value = mia[mia.metric == metric].set_index(["model", "signal"]).value
        assert row == "| kd | " + " | ".join(f"{value[('kd', s)]:.3f}" for s in SIGNALS) + " |"
    html = reports[True]["html"]
    block = html[html.index('id="heatmaps"'):html.index('id="memorization"')]
    assert block.count("<img ") == 2 and 'class="figures pair"' in block
    assert 'alt="TPR at 1% FPR by model and signal"' in block
    assert 'id="training"' in html and 'alt="Training curves"' in html


def test_suite_report_links_every_family(tmp_path) -> None:
    inputs = _inputs()
    families = {f: {"mia": inputs["mia"], "models": inputs["models"],
                    "utility": inputs["utility"] if f == "gpt2" else pd.DataFrame(),
                    "report": f"../{f}/report/report.html"} for f in ("gpt2", "opt", "llama")}
    paths = write_suite_report(tmp_path, families, title="suite")
    html, md = paths["html"].read_text(), paths["md"].read_text()
    for f in families:
        assert f'href="../{f}/report/report.html"' in html and f"## {f}" in md
        assert f"[The {f} report](../{f}/report/report.html)" in md
        assert paths[f"{f}_heatmap_auc"] == tmp_path / f"{f}_heatmap_auc.png"
        assert (tmp_path / f"{f}_heatmap_tpr_at_1pct.png").exists()
    assert html.count("data:image/png;base64,") == 2 * len(families)
    auc = inputs["mia"].query("metric == 'auc'")
    best = auc[auc.model == "teacher"].sort_values("value").iloc[-1]
    # the strongest signal's AUC beside the family's utility ("—" where it has none)
    assert f"| gpt2 | teacher | {best.signal} | {best.value:.2f} [" in md
    assert "Perplexity (non-members) | ROUGE-L (non-members) |" in md
    kd = auc[auc.model == "kd"].sort_values("value").iloc[-1]
    assert re.search(rf"\| gpt2 \| kd \| {kd.signal} \| [^|]+ \| 10.20 \| 0.432 \|", md)
    assert re.search(r"\| opt \| kd \| \w+ \| [^|]+ \| — \| — \|", md)


def test_heatmap_rows_columns_and_missing_cells(tmp_path) -> None:
    mia = _synthetic()[0]
    blind = dict(mia.iloc[0], model="data", signal="blind", metric="auc", value=0.52)
    # a signal known to the registry listed out of registry order, with one missing cell
    ref = [dict(r, signal="ref_base", value=0.7) for r in mia[mia.signal == "loss"]
           .to_dict("records") if r["model"] != "teacher"]
    mia = pd.concat([pd.DataFrame(ref), mia, pd.DataFrame([blind])], ignore_index=True)
    models = pd.DataFrame({"model": ["kd", "base_student", "nokd", "teacher"],
                           "role": ["student", "base", "baseline", "teacher"]})
    order = heatmap_order(models, list(models.model))
    assert order == ["teacher", "nokd", "kd", "base_student"]
    signals = signal_order(mia.signal)
    assert signals == ["loss", "zlib", "mink", "ref_base", "blind"]  # registry order
    table = heatmap_table(mia, "auc", order, signals)
    assert table.columns == ["Model", "loss", "zlib", "mink", "ref_base"]  # no blind column
    assert [r[0] for r in table.rows] == ["teacher", "nokd", "kd"]  # no data row
    assert table.rows[0][1] == "0.931" and table.rows[0][-1] == "—"
    png = leakage_heatmap(mia, "auc", order, signals, tmp_path / "auc.png", title="AUC")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_none_when_nothing_to_draw(tmp_path) -> None:
    mia = _synthetic()[0]
    empty = mia.iloc[:0]
    assert leakage_heatmap(empty, "auc", MODELS, SIGNALS, tmp_path / "a.png", title="") is None
    # every TPR unreachable (too few non-members): no figure rather than a grid of dashes
    assert leakage_heatmap(mia, "tpr_at_0_1pct", MODELS, SIGNALS, tmp_path / "b.png",
                           title="") is None
    assert leakage_heatmap(mia, "auc", ["absent"], SIGNALS, tmp_path / "c.png", title="") is None
    assert not list(tmp_path.iterdir())


def test_training_curves(tmp_path) -> None:
    assert training_curves(pd.DataFrame(), MODELS, tmp_path / "a.png") is None
    assert training_curves(None, MODELS, tmp_path / "a.png") is None
    steps = np.arange(1, 11)
    distillm = pd.DataFrame({"model": "distillm", "step": steps, "loss": 2.0 / steps,
                             "objective": 1.5 / steps,
                             "val_loss": np.where(steps % 5 == 0, 1.0, np.nan),
                             "student_data_prob": np.where(steps % 5 == 0, 0.2, np.nan)})
    png = training_curves(pd.concat([_inputs()["training"], distillm]), [*MODELS, "distillm"],
                          tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_csv_and_family_pass_through(tmp_path) -> None:
    inputs = _inputs()
    result = AuditResult(mia=inputs["mia"], memorization=inputs["memorization"],
                         utility=inputs["utility"], signals=pd.DataFrame(), scores={},
                         roc={}, examples=inputs["examples"], models=inputs["models"],
                         training=inputs["training"])
    result.write_tables(tmp_path / "tables")
    training = pd.read_csv(tmp_path / "tables" / "training.csv")
    assert list(training.columns) == ["model", "step", "loss", "objective"]
    assert len(training) == len(inputs["training"])
    assert list(result.models["family"]) == ["gpt2"] * 3
    paths = result.write_report(tmp_path / "report")
    assert "training_curves" in paths and "## Training curves" in paths["md"].read_text()
    # without training logs the table is still written, with its header
    bare = AuditResult(mia=inputs["mia"], memorization=inputs["memorization"],
                       utility=inputs["utility"], signals=pd.DataFrame(), scores={}, roc={},
                       examples=inputs["examples"], models=inputs["models"])
    bare.write_tables(tmp_path / "bare")
    assert list(pd.read_csv(tmp_path / "bare" / "training.csv").columns) == [
        "model", "step", "loss"]


def test_unreachable_tpr_heatmap_is_a_note(tmp_path) -> None:
    mia = _synthetic()[0]
    mia.loc[mia.metric == "tpr_at_1pct", "value"] = math.nan  # too few non-members for 1%
    paths = write_report(tmp_path / "one", ReportTables(mia=mia))
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "heatmap_auc" in paths and "heatmap_tpr_at_1pct" not in paths
    note = "No TPR at 1% FPR heatmap: no model has a value for it"
    assert note in md and note in html
    suite = write_suite_report(tmp_path / "suite", {"gpt2": {"mia": mia, "models": None,
                                                             "report": "gpt2.html"}})
    assert note in suite["md"].read_text() and "gpt2_heatmap_auc" in suite


# The privacy–utility frontier of DP distillation: DP model ids are `<method>@eps<ε>`.
DP_AUC = {  # model → AUC per signal (loss, zlib, mink); blind is model-free
    "distildp@eps1": (0.51, 0.52, 0.50), "distildp@eps8": (0.55, 0.53, 0.56),
    "distildp@epsinf": (0.70, 0.74, 0.69), "dpsgd_student@eps1": (0.50, 0.51, 0.50),
    "dpsgd_student@eps8": (0.54, 0.52, 0.53), "teacher_dp@eps8": (0.60, 0.58, 0.57),
}
DP_PPL = {"distildp@eps1": 31.0, "distildp@eps8": 22.5, "distildp@epsinf": 14.0,
          "dpsgd_student@eps1": 45.0, "dpsgd_student@eps8": 28.0, "teacher_dp@eps8": 9.5}


def _dp_inputs(lower_bound: float = 0.4) -> dict:
    """Synthetic frames with DP students, a DP teacher and the non-private models; the
    one-run lower bound of distildp@eps1 is `lower_bound` (its accounted ε is 1)."""
    base, _ = _synthetic()
    rows = []
    for model, aucs in DP_AUC.items():
        for signal, auc in zip(SIGNALS, aucs):
            common = dict(model=model, signal=signal, n_members=N, n_nonmembers=N, note=None)
            rows += [dict(common, metric="auc", value=auc, ci_low=auc - 0.04, ci_high=auc + 0.04),
                     dict(common, metric="tpr_at_1pct", value=0.01 + (auc - 0.5) / 4,
                          ci_low=math.nan, ci_high=math.nan)]
    rows.append(dict(model="data", signal="blind", metric="auc", value=0.99, ci_low=0.98,
                     ci_high=1.0, n_members=N, n_nonmembers=N, note=None))
    mia = pd.concat([base, pd.DataFrame(rows)], ignore_index=True)
    utility = pd.DataFrame([dict(model=m, metric="perplexity", split="nonmembers", value=v)
                            for m, v in {**dict(zip(MODELS, (8.1, 12.4, 10.2))),
                                         **DP_PPL}.items()])
    accounted = {"distildp@eps1": 1.0, "distildp@eps8": 7.98, "dpsgd_student@eps1": 0.999,
                 "dpsgd_student@eps8": 8.0, "teacher_dp@eps8": 7.98}
    bound = {"distildp@eps1": lower_bound, "distildp@eps8": 0.9, "distildp@epsinf": 2.5,
             "nokd": 0.0, "kd": 0.3}
    privacy = pd.DataFrame(
        [dict(model=m, metric="epsilon_lower_bound_one_run", value=v,
              note="rigorous 95% lower bound") for m, v in bound.items()]
        + [dict(model=m, metric="epsilon_accounted", value=v, note="PRV accountant, δ=1e-5")
           for m, v in accounted.items()])
    roles = {"teacher": "teacher", "nokd": "baseline", "kd": "student",
             "teacher_dp@eps8": "teacher", **{m: "student" for m in DP_PPL
                                              if not m.startswith("teacher")}}
    # each model's method and ε as the pipeline records them (never parsed from the id)
    facts = {"distildp@eps1": ("distildp", 1.0), "distildp@eps8": ("distildp", 8.0),
             "distildp@epsinf": ("distildp", math.inf), "dpsgd_student@eps1": ("dpsgd_student", 1.0),
             "dpsgd_student@eps8": ("dpsgd_student", 8.0), "teacher_dp@eps8": ("teacher_dp", 8.0)}
    models = pd.DataFrame({"model": list(roles), "role": list(roles.values()),
                           "description": "", "base": "gpt2",
                           "method": [facts.get(m, (m,))[0] for m in roles],
                           "epsilon": [facts.get(m, (m, math.inf))[1] for m in roles],
                           "private": [m in facts for m in roles]})
    return dict(mia=mia, utility=utility, privacy=privacy, models=models)


def test_frontier_takes_method_and_epsilon_from_the_model_table() -> None:
    """Method and ε are data: an id that looks like another method's changes nothing, and a
    model table without the columns makes each model its own non-private method."""
    from kdaudit.report.frontier import frontier_points
    inputs = _dp_inputs()
    models = inputs["models"].copy()
    models.loc[models.model == "distildp@eps8", ["method", "epsilon"]] = ["renamed", 3.0]
    p = frontier_points(inputs["mia"], inputs["utility"], inputs["privacy"], models)
    row = p.set_index("model").loc["distildp@eps8"]
    assert (row["method"], row["epsilon"], bool(row["private"])) == ("renamed", 3.0, True)
    bare = inputs["models"][["model", "role", "description", "base"]]
    p = frontier_points(inputs["mia"], inputs["utility"], inputs["privacy"], bare)
    assert not p["private"].any() and (p["method"] == p["model"]).all()


def test_frontier_points() -> None:
    from kdaudit.report.frontier import frontier_points
    inputs = _dp_inputs()
    # a TPR that is not reachable, and a model whose TPR row is missing
    mia = inputs["mia"]
    unreachable = (mia.model == "distildp@eps8") & (mia.metric == "tpr_at_1pct")
    # the smallest reachable FPR comes from the row's data (1 / n_nonmembers), not its note
    mia.loc[unreachable, ["value", "note", "n_nonmembers"]] = [math.nan, "any text", 50]
    mia = mia[~((mia.model == "dpsgd_student@eps8") & (mia.metric == "tpr_at_1pct"))]
    p = frontier_points(mia, inputs["utility"], inputs["privacy"], inputs["models"])
    # students and the baseline only (no teacher, DP or not), DP methods first in ε order
    assert list(p.model) == ["distildp@eps1", "distildp@eps8", "distildp@epsinf",
                             "dpsgd_student@eps1", "dpsgd_student@eps8", "nokd", "kd"]
    p = p.set_index("model")
    assert p.loc["distildp@eps8", "method"] == "distildp"
    assert p.loc["distildp@eps8", "epsilon"] == 8.0
    assert math.isinf(p.loc["distildp@epsinf", "epsilon"]) and math.isinf(p.loc["kd", "epsilon"])
    assert p.loc["dpsgd_student@eps1", "perplexity"] == 45.0
    # the strongest model signal (the blind baseline's 0.99 is not a model signal)
    assert p.loc["distildp@epsinf", "signal"] == "zlib"
    assert p.loc["distildp@epsinf", "auc"] == pytest.approx(0.74)
    assert p.loc["distildp@epsinf", "ci_low"] == pytest.approx(0.70)
    assert p.loc["distildp@epsinf", "tpr_at_1pct"] == pytest.approx(0.01 + 0.24 / 4)
    assert p.loc["distildp@eps8", "signal"] == "mink"
    assert math.isnan(p.loc["distildp@eps8", "tpr_at_1pct"])
    assert p.loc["distildp@eps8", "tpr_note"] == "n/a (min FPR 2%)"
    assert math.isnan(p.loc["dpsgd_student@eps8", "tpr_at_1pct"])
    best = mia[(mia.model == "kd") & (mia.metric == "auc")].sort_values("value").iloc[-1]
    assert p.loc["kd", "signal"] == best.signal
    # accounted ε only for DP-trained models; the one-run bound wherever it was computed
    assert p.loc["distildp@eps8", "epsilon_accounted"] == 7.98
    assert math.isnan(p.loc["distildp@epsinf", "epsilon_accounted"])
    assert math.isnan(p.loc["kd", "epsilon_accounted"])
    assert p.loc["distildp@epsinf", "epsilon_lower_bound"] == 2.5
    assert math.isnan(p.loc["dpsgd_student@eps1", "epsilon_lower_bound"])
    # no perplexity, no point; no AUC, a point without a signal; empty inputs, empty frame
    utility = pd.concat([inputs["utility"][inputs["utility"].model != "kd"],
                         pd.DataFrame([dict(model="dpkd@eps2", metric="perplexity",
                                            split="nonmembers", value=30.0)])])
    models = pd.concat([inputs["models"], pd.DataFrame([dict(model="dpkd@eps2",
                                                             role="student")])])
    q = frontier_points(mia, utility, None, models).set_index("model")
    assert "kd" not in q.index and pd.isna(q.loc["dpkd@eps2", "signal"])
    assert math.isnan(q.loc["dpkd@eps2", "auc"]) and q["epsilon_accounted"].isna().all()
    assert frontier_points(mia, None, None, None).empty


@pytest.fixture(scope="module")
def dp_reports(tmp_path_factory) -> dict[str, dict]:
    """Reports with DP models: accounting consistent ("ok") and violated ("bad")."""
    out = {}
    for name, bound in (("ok", 0.4), ("bad", 3.2)):
        paths = write_report(tmp_path_factory.mktemp(f"dp_{name}"),
                             ReportTables(**_dp_inputs(bound)))
        out[name] = {k: paths[k].read_text(encoding="utf-8") for k in ("html", "md")}
        out[name]["paths"] = paths
    return out


def test_frontier_section_with_dp_models(dp_reports) -> None:
    paths, md, html = (dp_reports["ok"][k] for k in ("paths", "md", "html"))
    assert paths["privacy_utility"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.index("## Empirical privacy") < md.index("## Privacy–utility frontier")
    section = md[md.index("## Privacy–utility frontier"):md.index("## Signals")]
    assert "](privacy_utility.png)" in section
    assert ("| Model | Method | ε accounted | ε lower bound (one run, canaries) | "
            "ε lower bound (white box) | Perplexity | Strongest signal | AUC [95% CI] | "
            "TPR @ 1% FPR |") in section
    row = "| distildp@eps8 | distildp | 7.98 | 0.90 | — | 22.50 | mink | 0.56 [0.52, 0.60] |"
    assert row in section
    assert re.search(r"\| kd \| kd \| ∞ \(non-private\) \| 0.30 \| — \| 10.20 \|", section)
    assert "teacher_dp@eps8" not in section
    assert "upper bound" in section and "empirical lower bound" in section
    assert "No model's empirical lower bound exceeds its accounted ε." in section
    assert "accounting (or the DP-SGD implementation) is wrong" not in md + html
    block = html[html.index('id="frontier"'):html.index('id="signals"')]
    assert block.count("data:image/png;base64,") == 1
    assert 'alt="Privacy–utility frontier"' in block
    # the privacy table shows the accounted ε first for each model
    label = "ε accounted (DP-SGD accountant, upper bound)"
    privacy = md[md.index("## Empirical privacy"):md.index("## Privacy–utility frontier")]
    rows = [line for line in privacy.splitlines() if line.startswith("| distildp@eps1 | ")]
    assert rows[0].startswith(f"| distildp@eps1 | {label} | 1.00 |")
    assert "ε lower bound, one run" in rows[1]


def test_no_frontier_without_dp_models(reports, tmp_path) -> None:
    from kdaudit.report.frontier import frontier_points
    from kdaudit.report.plots import privacy_utility_plot
    for kind in ("html", "md"):
        assert "Privacy–utility frontier" not in reports[True][kind]
    assert "privacy_utility" not in reports[True]["paths"]
    inputs = _inputs()
    points = frontier_points(inputs["mia"], inputs["utility"], None, inputs["models"])
    assert list(points.model) == ["nokd", "kd"]
    assert privacy_utility_plot(points, tmp_path / "f.png") is None
    assert not list(tmp_path.iterdir())


def test_frontier_warns_when_lower_bound_exceeds_accounted(dp_reports) -> None:
    from kdaudit.report.frontier import accounting_violations
    inputs = _dp_inputs(3.2)
    assert accounting_violations(inputs["privacy"]) == [("distildp@eps1", 3.2, 1.0)]
    assert accounting_violations(_dp_inputs(1.0)["privacy"]) == []  # equal is consistent
    md, html = dp_reports["bad"]["md"], dp_reports["bad"]["html"]
    warning = "the privacy accounting (or the DP-SGD implementation) is wrong for this model"
    section = md[md.index("## Privacy–utility frontier"):md.index("## Signals")]
    assert warning in section
    assert "distildp@eps1: empirical lower bound 3.20 > accounted ε 1.00" in section
    assert md.index(warning) < md.index("## Verdict per model")  # also at the top
    assert html.count(warning) == 2 and '<p class="warning"><strong>Warning: the privacy' in html
    assert "No model's empirical lower bound exceeds" not in md


def test_an_lmo_claim_that_a_lower_bound_beats_is_called_out() -> None:
    from kdaudit.report.frontier import lmo_claim_warning

    privacy = pd.DataFrame([
        {"model": "teacher_lmo", "metric": "epsilon_claimed_lmo", "value": 0.156, "note": ""},
        {"model": "teacher_lmo", "metric": "epsilon_lower_bound_lmo_pld", "value": 0.512,
         "note": ""},
        {"model": "teacher_lmo", "metric": "epsilon_lower_bound_one_run", "value": 0.0,
         "note": ""},
        {"model": "fair", "metric": "epsilon_claimed_lmo", "value": 2.0, "note": ""},
        {"model": "fair", "metric": "epsilon_lower_bound_lmo_pld", "value": 1.0, "note": ""}])
    warning = lmo_claim_warning(privacy)
    assert warning.startswith("The LMO-DP privacy claim does not hold")
    assert "teacher_lmo: claimed ε 0.156 < 0.512 (PLD)" in warning
    assert "one-run" not in warning and "fair" not in warning
    assert lmo_claim_warning(privacy[privacy.model == "fair"]) is None
    assert lmo_claim_warning(None) is None


def test_a_white_box_bound_above_the_accounted_epsilon_is_a_violation() -> None:
    """The gradient canaries' bound is checked against the accountant like the canary
    records' one; a model with two DP-SGD runs (dpkd) is judged by its larger bound."""
    from kdaudit.report.frontier import accounting_violations, frontier_points, frontier_table
    inputs = _dp_inputs()
    white = pd.DataFrame([
        dict(model="dpsgd_student@eps1", metric="epsilon_lower_bound_white_box", value=0.3,
             note="run 1"),
        dict(model="dpsgd_student@eps1", metric="epsilon_lower_bound_white_box", value=1.4,
             note="run 2"),
        dict(model="distildp@eps8", metric="epsilon_lower_bound_white_box", value=0.7, note="")])
    privacy = pd.concat([inputs["privacy"], white], ignore_index=True)
    assert accounting_violations(privacy) == [("dpsgd_student@eps1", 1.4, 0.999)]
    assert accounting_violations(inputs["privacy"]) == []
    points = frontier_points(inputs["mia"], inputs["utility"], privacy, inputs["models"])
    rows = {r[0]: r for r in frontier_table(points).rows}
    assert rows["distildp@eps8"][3:5] == ["0.90", "0.70"]
    assert rows["dpsgd_student@eps1"][4] == "1.40"


def test_markdown_carries_no_raw_html_and_clips_long_records(tmp_path) -> None:
    """A model named like an HTML tag and a 100k-character record: report.md shows the tag
    as text wherever it appears and cuts the record, saying how much was left out."""
    inputs = _inputs()
    evil = "<img src=x onerror=alert(1)>"
    rename = {"kd": evil}
    for key in ("mia", "memorization", "utility", "examples", "models", "training"):
        inputs[key] = inputs[key].assign(model=inputs[key]["model"].replace(rename))
    inputs["roc"] = {}
    long_text = "word " * 20_000
    inputs["examples"].loc[inputs["examples"]["model"] == evil, "generation"] = long_text
    tables = ReportTables(**{k: v for k, v in inputs.items() if k != "run_info"})
    paths = write_report(tmp_path, tables, redact=False)
    md = paths["md"].read_text()
    assert evil not in md and "<img" not in md
    assert "&lt;img src=x onerror=alert(1)" in md
    assert len(md) < 60_000 and "more characters]" in md
    assert "<img" not in paths["html"].read_text().replace('<img src="data:', "")


def test_a_shareable_report_names_no_absolute_local_path(tmp_path) -> None:
    mia, _ = _synthetic()
    config = {"out_dir": str(tmp_path / "runs"), "models": {"teacher": "/home/alice/m/teacher",
                                                           "student": "gpt2"}}
    paths = write_report(tmp_path, ReportTables(mia=mia, roc={}, config=config),
                         run_info={"source": "/srv/data/members.jsonl"})
    for key in ("md", "html"):
        text = paths[key].read_text()
        assert str(tmp_path) not in text and "/home/alice" not in text and "/srv/" not in text
    md = paths["md"].read_text()
    assert 'teacher = "…/teacher"' in md and 'student = "gpt2"' in md
