"""DistilDP's data side: control codes, uniform allocation, parsing generated records."""
from __future__ import annotations

import pytest

from kdaudit.data.corpus import generate_records
from kdaudit.data.template import format_text
from kdaudit.dp.synthetic import (allocate, control_prefix, encode_with_control_code,
                                  generate_synthetic, parse_record)


def test_allocation_is_uniform_and_reads_no_counts():
    assert allocate(10, ["a", "b", "c"]) == {"a": 4, "b": 3, "c": 3}
    assert sum(allocate(1001, [str(i) for i in range(8)]).values()) == 1001
    with pytest.raises(ValueError, match="no categories"):
        allocate(5, [])


def test_generated_text_parses_back_through_the_template():
    for r in generate_records(16, seed=3):
        back = parse_record(format_text(r), r.category, "x")
        assert (back.instruction, back.context, back.response) == (
            r.instruction.strip(), r.context.strip(), r.response.strip())
    assert parse_record("### Instruction:\nSay hi.\n\n", "c", "x") is None        # no response
    assert parse_record("### Instruction:\n\n### Response:\nhi", "c", "x") is None  # empty
    twice = "### Instruction:\na\n\n### Response:\nb\n\n### Response:\nc"
    assert parse_record(twice, "c", "x") is None
    assert parse_record("random words", "c", "x") is None


def test_control_code_opens_the_text_and_is_not_a_target(tiny_lm):
    _, tok, records, _ = tiny_lm
    r = records[0]
    enc = encode_with_control_code(r, tok, 160)
    code = tok(control_prefix(r.category), add_special_tokens=False)["input_ids"]
    assert enc.input_ids[:len(code)] == code and enc.response_start == len(code)
    assert enc.input_ids[-1] == tok.eos_token_id


def test_synthetic_samples_are_kept_or_counted(tiny_lm):
    model, tok, records, _ = tiny_lm
    data = generate_synthetic(model, tok, {"closed_qa": 3, "open_qa": 2}, seed=0,
                              max_new_tokens=24, batch_size=2)
    assert len(data.records) + sum(data.dropped.values()) == 5
    assert all(r.category in ("closed_qa", "open_qa") for r in data.records)
    again = generate_synthetic(model, tok, {"closed_qa": 3, "open_qa": 2}, seed=0,
                               max_new_tokens=24, batch_size=2)
    assert [r.response for r in again.records] == [r.response for r in data.records]
