"""Loaders, the split and its checks, the prompt template and response-only labels."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from kdaudit.data import (Record, RecordError, SplitError, encode_record, format_prompt,
                          load_records, read_jsonl, split_records, write_jsonl)
from kdaudit.data.corpus import generate_records
from kdaudit.data.splits import check_splits


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "instruction": "x", "response": "y"}\n\n{"id": "b", oops}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl, line 3: not valid JSON"):
        read_jsonl(path)


def test_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text('{"id": "a", "instruction": "x", "response": "y"}\n'
                    '{"id": "b", "instruction": "x"}\n')
    with pytest.raises(RecordError, match=r"missing\.jsonl, row 2: missing field"):
        read_jsonl(path)


def test_jsonl_roundtrip(tmp_path):
    recs = generate_records(5, seed=1)
    write_jsonl(recs, tmp_path / "r.jsonl")
    assert load_records(tmp_path / "r.jsonl") == recs


def test_alpaca_and_dolly_mappings_csv_parquet(tmp_path):
    alpaca = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
              {"instruction": "Add.", "input": "2 and 2", "output": "4", "group": "u1"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    recs = load_records(tmp_path / "a.jsonl")          # mapping guessed from 'output'
    assert [r.response for r in recs] == ["Blue.", "4"]
    assert recs[1].context == "2 and 2" and recs[1].group == "u1"
    assert recs[0].id == "a-0" and recs[1].id == "a-1"

    dolly = pd.DataFrame({"instruction": ["Q?"], "context": ["C"], "response": ["A"],
                          "category": ["closed_qa"]})
    dolly.to_csv(tmp_path / "d.csv", index=False)
    dolly.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        (r,) = load_records(tmp_path / name, mapping="dolly")
        assert (r.instruction, r.context, r.response, r.category) == ("Q?", "C", "A", "closed_qa")

    with pytest.raises(RecordError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_records(tmp_path / "x.txt")


def test_hf_dataset_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"instruction": "I", "input": "", "output": "O"}])
    ds.save_to_disk(str(tmp_path / "ds"))
    (r,) = load_records(tmp_path / "ds", mapping="alpaca")
    assert (r.instruction, r.response) == ("I", "O")


def _split(records, seed=0):
    return split_records(records, n_members=100, n_nonmembers=100, n_public=150,
                         n_validation=20, seed=seed)


def test_split_is_disjoint_seeded_and_sized():
    pool = generate_records(450, seed=3)
    s = _split(pool)
    ids = [{r.id for r in recs} for _, recs in s.items()]
    assert [len(x) for x in ids] == [100, 100, 150, 20]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not ids[i] & ids[j]
    assert [r.id for r in _split(pool).members] == [r.id for r in s.members]
    assert [r.id for r in _split(pool, seed=1).members] != [r.id for r in s.members]


def test_split_keeps_groups_together():
    pool = generate_records(400, seed=4)
    pool = [dataclasses.replace(r, group=f"user{i // 4}") for i, r in enumerate(pool)]
    s = split_records(pool, n_members=100, n_nonmembers=100, n_public=0, n_validation=10,
                      seed=0)
    where = {}
    for name, recs in s.items():
        for r in recs:
            assert where.setdefault(r.group, name) == name


def test_split_rejects_near_duplicate_and_small_pool():
    pool = generate_records(450, seed=5)
    s = _split(pool)
    member = s.members[0]
    s.public.append(dataclasses.replace(member, id="copy", response=member.response + " Thanks."))
    with pytest.raises(SplitError, match="public record.*near-duplicate a member"):
        check_splits(s)
    with pytest.raises(SplitError, match="pool too small"):
        split_records(pool[:150], n_members=100, n_nonmembers=100, n_public=0, n_validation=0,
                      seed=0)


def test_public_near_duplicates_of_members_are_left_out():
    """The public split (the students' data) loses the records that near-duplicate a member,
    and says which; a non-member near duplicate is still refused."""
    pool = generate_records(300, seed=5)
    copies = [dataclasses.replace(r, id=f"copy-{r.id}", response=r.response + " Thanks.")
              for r in pool]
    s = split_records(pool + copies, n_members=100, n_nonmembers=0, n_public=0,
                      n_validation=0, seed=0)
    members = {r.id for r in s.members}
    twin = (lambda i: i.removeprefix("copy-") if i.startswith("copy-") else f"copy-{i}")
    assert s.dropped_public and all(twin(i) in members for i in s.dropped_public)
    assert not set(s.dropped_public) & {r.id for r in s.public}
    check_splits(s)                               # what is left passes the check
    with pytest.raises(SplitError, match="nonmembers record.*near-duplicate a member"):
        split_records(pool + copies, n_members=100, n_nonmembers=100, n_public=0,
                      n_validation=0, seed=0)


def test_exact_duplicates_are_dropped_before_the_split():
    pool = generate_records(400, seed=6)
    dup = dataclasses.replace(pool[0], id="dup")
    s = split_records(pool + [dup], n_members=100, n_nonmembers=100, n_public=0,
                      n_validation=0, seed=0)
    ids = {r.id for _, recs in s.items() for r in recs}
    assert "dup" not in ids and len(ids) == 400


def test_template_and_response_only_labels(tiny_lm):
    _, tok, _, _ = tiny_lm
    with_ctx = Record("a", "Summarise.", "Some text.", "A summary.", "summarization")
    no_ctx = Record("b", "Who?", "", "Someone.", "open_qa")
    assert "### Input:\nSome text.\n\n### Response:\n" in format_prompt(with_ctx)
    assert "### Input" not in format_prompt(no_ctx)
    assert format_prompt(no_ctx).startswith("Below is an instruction that describes a task.")
    e = encode_record(with_ctx, tok, 512)
    response = e.input_ids[e.response_start:]
    assert response[-1] == tok.eos_token_id
    assert tok.decode(response[:-1]) == "A summary."
    assert tok.decode(e.input_ids[:e.response_start]) == format_prompt(with_ctx)
    assert e.response_mask == [i >= e.response_start for i in range(len(e.input_ids))]
    short = encode_record(with_ctx, tok, 8)      # too long: cut, keeping ≥ 1 prompt token
    assert len(short.input_ids) == 8 and short.response_start >= 1
    assert short.input_ids[short.response_start:] == response[:8 - short.response_start]
