"""DP students end to end (docs/methods.md §7): the pieces that `kdaudit student --method distildp`
and a pipeline run share.

- DistilDP and synthetic_only: a DP teacher learns the private records behind control codes
  (`teacher_examples`), writes synthetic records (`synthesize`, uniform allocation over
  public category names), and the student trains on them with hard labels (+ the teacher's
  soft labels for distildp). The student's ε is the teacher's: it only sees post-processed
  output of a DP model.
- dpsgd_student: DP-SGD of the student base on the private records.
- dpkd: a DP teacher on the private records (template text, no control codes) and DP-SGD of
  the student with the KD loss on the same records; the budget is split in half, ε and δ, and
  the two spends add up (basic composition).
An ε of `inf` trains the same recipe without noise or clipping: the non-private point of the
privacy–utility frontier.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from kdaudit.config import DPConfig, DPSGDOptions
from kdaudit.data.records import Record
from kdaudit.data.template import Encoded, encode_record
from kdaudit.dp.synthetic import SyntheticData, allocate, encode_with_control_code, \
    generate_synthetic
from kdaudit.train.methods import METHODS

PRIVATE_METHODS = tuple(k for k, m in METHODS.items() if m.privacy)


def epsilon_tag(epsilon: float) -> str:
    """`eps2`, `eps0.5`, `epsinf`: the suffix of a DP model id (`distildp@eps2`)."""
    return f"eps{epsilon:g}"


def model_id(name: str, epsilon: float) -> str:
    return f"{name}@{epsilon_tag(epsilon)}"


def teacher_kind(method: str) -> str | None:
    """The DP teacher a method needs: "control" (DistilDP's, writes synthetic records),
    "kd" (dpkd's, gives soft labels on the private records) or None."""
    spec = METHODS[method]
    if spec.privacy == "synthetic":
        return "control"
    return "kd" if spec.needs_teacher else None


def teacher_id(method: str, epsilon: float) -> str | None:
    """The run's model id of the DP teacher `method` needs at total budget `epsilon`."""
    kind = teacher_kind(method)
    if kind is None:
        return None
    if kind == "control":
        return model_id("teacher_dp", epsilon)
    return model_id("teacher_dpkd", epsilon / 2)


def split_budget(method: str, epsilon: float) -> dict[str, float]:
    """ε per DP-SGD run of a method at total budget `epsilon` ("teacher", "student")."""
    kind = teacher_kind(method)
    if kind == "kd":
        return {"teacher": epsilon / 2, "student": epsilon / 2}
    if kind == "control":
        return {"teacher": epsilon}
    return {"student": epsilon}


def dp_config(epsilon: float, delta: float | None, options: DPSGDOptions) -> DPConfig | None:
    """DP-SGD at `epsilon` with `options` (None for ε = ∞: plain training)."""
    if math.isinf(epsilon):
        return None
    return DPConfig(epsilon=epsilon, delta=delta, **options.dp_sgd_options())


def count_units(records: Sequence[Record], unit: str) -> int:
    """N of the DP accounting: distinct persons, or records at the record level."""
    from kdaudit.train.dp import units_of

    return len(units_of([r.person for r in records], unit))


def halve_delta(delta: float | None, n: int) -> float:
    """dpkd's δ per run: half the total δ (default 1/(10 N), N privacy units)."""
    from kdaudit.dp.accounting import default_delta

    return (delta if delta is not None else default_delta(n)) / 2


def teacher_examples(records: Sequence[Record], tokenizer, max_length: int,
                     control_codes: bool) -> list[Encoded]:
    """DistilDP's teacher learns whole records behind their control code; dpkd's teacher
    learns responses in the prompt template like any teacher."""
    if control_codes:
        return [encode_with_control_code(r, tokenizer, max_length) for r in records]
    return [encode_record(r, tokenizer, max_length) for r in records]


def synthesize(teacher, tokenizer, categories: Sequence[str], n: int, *, seed: int,
               max_new_tokens: int, batch_size: int = 32,
               no_repeat_ngram: int = 0) -> SyntheticData:
    """`n` synthetic records from the DP teacher, split uniformly over `categories` (public
    category names, so the allocation reads no private count); unparsable samples are
    dropped and counted. An empty result is an error that says why."""
    categories = sorted(set(categories))
    data = generate_synthetic(teacher, tokenizer, allocate(n, categories), seed=seed,
                              max_new_tokens=max_new_tokens, batch_size=batch_size,
                              no_repeat_ngram_size=no_repeat_ngram)
    if not data.records:
        raise ValueError(f"the DP teacher wrote no parsable record in {n} samples "
                         f"({data.summary()['dropped']} dropped): train it longer or at a "
                         f"larger ε")
    return data


def student_privacy(method: str, epsilon: float, teacher: dict[str, Any] | None,
                    student: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a DP student's training spent in all (None when non-private): the teacher's spend
    for synthetic-data students (post-processing), the student's own for dpsgd_student, the
    sum of both for dpkd (basic composition)."""
    if math.isinf(epsilon):
        return None
    spends = {k: v for k, v in (("teacher", teacher), ("student", student)) if v}
    if teacher_kind(method) == "kd":
        total = sum(v["epsilon"] for v in spends.values())
        delta = sum(v["delta"] for v in spends.values())
        how = "basic composition (sum of ε and δ) of the DP teacher and the DP-SGD student"
    else:
        (only,) = spends.values()
        total, delta = only["epsilon"], only["delta"]
        how = ("post-processing: the student sees only the DP teacher's synthetic records"
               if "teacher" in spends else "DP-SGD of the student")
    return {"epsilon": total, "delta": delta, "accountant": "prv", "composition": how,
            "target_epsilon": epsilon, "components": spends}
