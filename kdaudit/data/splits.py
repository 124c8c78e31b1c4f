"""One seeded split of one pool into members / non-members / public (+ validation), checked.

Members and non-members are drawn by one random split, never by source or date, so no
distribution shift can fake a membership signal. The privacy unit is a person (or a `group`):
all records of a group land in the same split.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable

from kdaudit.data.records import Record


class SplitError(ValueError):
    """The pool cannot be split as asked, or the split would fake leakage."""


@dataclass
class Splits:
    members: list[Record]
    nonmembers: list[Record]
    public: list[Record]
    validation: list[Record]
    # ids of public records left out for near-duplicating a member (`split_records`)
    dropped_public: list[str] = field(default_factory=list)

    def items(self):
        return [("members", self.members), ("nonmembers", self.nonmembers),
                ("public", self.public), ("validation", self.validation)]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _full_text(r: Record) -> str:
    return f"{r.instruction}\n{r.context}\n{r.response}"


def drop_exact_duplicates(records: Iterable[Record]) -> tuple[list[Record], int]:
    """Keep the first record of each normalised (instruction, context, response)."""
    seen, kept, dropped = set(), [], 0
    for r in records:
        key = _normalise(_full_text(r))
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(r)
    return kept, dropped


def boilerplate_ngrams(records: Iterable[Record], n: int, max_share: float = 0.001,
                       min_count: int = 3) -> set[tuple[str, ...]]:
    """Response n-grams found in more than `max_share` of records (and at least `min_count`):
    template wording, which says nothing about any one record."""
    counts: dict[tuple[str, ...], int] = {}
    records = list(records)
    for r in records:
        for g in ngrams(r.response, n):
            counts[g] = counts.get(g, 0) + 1
    limit = max(min_count, max_share * len(records))
    return {g for g, c in counts.items() if c > limit}


def near_duplicates(candidates: list[Record], reference: list[Record], n: int,
                    threshold: float,
                    ignore: set[tuple[str, ...]] = frozenset()) -> list[tuple[str, float]]:
    """(id, overlap) of candidates whose response shares ≥ threshold of its word n-grams
    (those not in `ignore`) with the responses of `reference`. Responses with no such n-gram
    are compared as whole normalised texts."""
    ref_grams: set[tuple[str, ...]] = set()
    ref_texts = {_normalise(r.response) for r in reference}
    for r in reference:
        ref_grams |= ngrams(r.response, n) - ignore
    hits = []
    for r in candidates:
        g = ngrams(r.response, n) - ignore
        if not g:
            if _normalise(r.response) in ref_texts:
                hits.append((r.id, 1.0))
            continue
        share = len(g & ref_grams) / len(g)
        if share >= threshold:
            hits.append((r.id, share))
    return hits


def split_records(records: list[Record], *, n_members: int, n_nonmembers: int, n_public: int,
                  n_validation: int, seed: int, dedup_ngram: int = 8,
                  dedup_threshold: float = 0.7) -> Splits:
    """Shuffle groups with `seed`; fill non-members, members, validation (the students' held-out
    part of public) and public (0 = the rest), whole groups at a time.

    Public is the students' data, not a measured split: a public record that near-duplicates
    a member is left out (it would teach that member to every student; `Splits.dropped_public`
    lists them). Raises SplitError when the pool is too small, or when a non-member or
    validation record is an exact or near duplicate of a member (it would hide leakage).
    """
    records, _ = drop_exact_duplicates(records)
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.person, []).append(r)
    keys = list(groups)
    random.Random(seed).shuffle(keys)

    out: dict[str, list[Record]] = {}
    it = iter(keys)
    wanted = [("nonmembers", n_nonmembers), ("members", n_members),
              ("validation", n_validation), ("public", n_public or None)]
    for name, n in wanted:   # whole groups only; public (n = None) takes all that is left
        out[name] = []
        if n == 0:
            continue
        for k in it:
            out[name] += groups[k]
            if n is not None and len(out[name]) >= n:
                break
        if n is not None and len(out[name]) < n:
            raise SplitError(f"pool too small: {len(records)} distinct records cannot give "
                             f"{n_nonmembers} non-members, {n_members} members, "
                             f"{n_validation} validation and {n_public} public records "
                             f"(short of '{name}')")
    splits = Splits(**out)
    common = split_boilerplate(splits, dedup_ngram)
    while dups := split_near_duplicates(splits, "public", dedup_ngram, dedup_threshold, common):
        ids = {rid for rid, _ in dups}
        splits.public = [r for r in splits.public if r.id not in ids]
        splits.dropped_public += sorted(ids)
        common = split_boilerplate(splits, dedup_ngram)     # the records changed
    if not splits.public:
        raise SplitError("the public split is empty: students need public data")
    check_splits(splits, dedup_ngram, dedup_threshold, common)
    return splits


def split_boilerplate(s: Splits, n: int = 8) -> set[tuple[str, ...]]:
    """The n-grams too common across all splits' records to mark a near duplicate."""
    return boilerplate_ngrams([r for _, recs in s.items() for r in recs], n)


def split_near_duplicates(s: Splits, name: str, n: int = 8, threshold: float = 0.7,
                          common: set[tuple[str, ...]] | None = None
                          ) -> list[tuple[str, float]]:
    """(id, overlap) of the records of split `name` that near-duplicate a member, judged on
    distinctive n-grams: wording shared by more than max(3, 0.1%) of all records (templates,
    stock phrases; `common`, computed here when not given) is left out, so a template alone
    never counts."""
    if common is None:
        common = split_boilerplate(s, n)
    return near_duplicates(getattr(s, name), s.members, n, threshold, common)


def check_splits(s: Splits, n: int = 8, threshold: float = 0.7,
                 common: set[tuple[str, ...]] | None = None) -> None:
    """No shared id or group across splits; no near duplicate of a member outside members
    (`split_near_duplicates`; `common`: `split_boilerplate(s, n)` when already computed)."""
    seen: dict[str, str] = {}
    for name, recs in s.items():
        for r in recs:
            for key in (f"id:{r.id}", f"group:{r.group}" if r.group is not None else None):
                if key is None:
                    continue
                if key in seen and seen[key] != name:
                    raise SplitError(f"{key} is in both '{seen[key]}' and '{name}'")
                seen[key] = name
    if common is None:
        common = split_boilerplate(s, n)
    for name in ("nonmembers", "public", "validation"):
        dups = split_near_duplicates(s, name, n, threshold, common)
        if dups:
            rid, share = dups[0]
            raise SplitError(f"{len(dups)} {name} record(s) near-duplicate a member (e.g. {rid}: "
                             f"{share:.0%} of its {n}-grams occur in members' responses); "
                             f"deduplicate the data or raise data.dedup_threshold")
