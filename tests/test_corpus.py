"""Tests for the builtin synthetic corpus (kdaudit.data.corpus)."""
from __future__ import annotations

import json
import random
import re

import pytest

from kdaudit.data.corpus import CATEGORIES, generate_records, person_name
from kdaudit.data.records import Record


def _dump(records: list[Record]) -> str:
    return json.dumps([r.to_dict() for r in records])


@pytest.fixture(scope="module")
def pool() -> list[Record]:
    return generate_records(3000, seed=11)


def test_same_arguments_give_byte_identical_records():
    assert _dump(generate_records(300, 5)) == _dump(generate_records(300, 5))
    excl = {"John Smith", "Mary Johnson"}
    a = generate_records(100, 5, id_prefix="pre", exclude_names=excl)
    b = generate_records(100, 5, id_prefix="pre", exclude_names=frozenset(excl))
    assert _dump(a) == _dump(b)


def test_different_seed_gives_different_records():
    assert _dump(generate_records(50, 1)) != _dump(generate_records(50, 2))


def test_prefix_property():
    full = generate_records(120, 9)
    for k in (0, 1, 37, 120):
        assert _dump(full[:k]) == _dump(generate_records(k, 9))


def test_global_random_state_untouched():
    random.seed(123)
    state = random.getstate()
    generate_records(20, 3)
    assert random.getstate() == state


def test_all_categories_present():
    assert len(CATEGORIES) >= 7
    assert len(set(CATEGORIES)) == len(CATEGORIES)
    records = generate_records(200, 4)
    assert {r.category for r in records} == set(CATEGORIES)


def test_open_and_general_qa_have_no_context(pool):
    for r in pool:
        if r.category in ("open_qa", "general_qa"):
            assert r.context == ""


def test_secrets_verbatim_name_first(pool):
    for r in pool:
        assert len(r.secrets) >= 3, r
        assert all(s in r.response or s in r.context for s in r.secrets), r
        assert any(s in r.response for s in r.secrets), r
        assert len(set(r.secrets)) == len(r.secrets), r
        name = person_name(r)
        assert name == r.secrets[0]
        assert name in r.response
        assert re.fullmatch(r"[A-Za-z'\-]+ [A-Za-z'\-]+", name), name


def test_records_are_short_and_ascii(pool):
    for r in pool:
        assert len(r.instruction) <= 120, r.instruction
        assert len(r.context) <= 300, r.context
        assert len(r.response) <= 350, r.response
        assert 10 <= len(r.response.split()) <= 60, r.response
        assert (r.instruction + r.context + r.response).isascii(), r


def test_responses_vary_within_category(pool):
    for category in CATEGORIES:
        instructions = {re.sub(r"[A-Z][a-z]+ [A-Z][a-z'\-]+", "NAME", r.instruction)
                        for r in pool if r.category == category}
        assert len(instructions) >= 3, (category, instructions)


def test_names_unique_in_pool(pool):
    names = [person_name(r) for r in pool]
    assert len(set(names)) == len(names)


def test_exclude_names_respected(pool):
    taken = frozenset(person_name(r) for r in pool)
    other = generate_records(3000, seed=12, id_prefix="pt", exclude_names=taken)
    other_names = {person_name(r) for r in other}
    assert len(other_names) == len(other)
    assert other_names.isdisjoint(taken)
    # Same seed as the pool: without the exclusion every name would repeat, with it none does.
    same_seed = generate_records(200, seed=11, exclude_names=taken)
    assert {person_name(r) for r in same_seed}.isdisjoint(taken)


def test_ids_unique_and_formatted(pool):
    ids = [r.id for r in pool]
    assert len(set(ids)) == len(ids)
    assert ids == [f"rec-{i:06d}" for i in range(len(pool))]
    custom = generate_records(3, 0, id_prefix="pretrain")
    assert [r.id for r in custom] == ["pretrain-000000", "pretrain-000001", "pretrain-000002"]


def test_person_name_without_secrets_raises():
    with pytest.raises(ValueError):
        person_name(Record(id="x", instruction="i", context="", response="r", category="c"))
