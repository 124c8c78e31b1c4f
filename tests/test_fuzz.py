"""Fuzzing the inputs a user hands kdaudit: record files (JSONL, CSV, Parquet), the record
schema, and TOML config files. Whatever the bytes, only the documented error escapes
(`RecordError` for data, `ConfigError` for configs), each naming the file. Runs are
derandomized, so CI sees the same examples every time."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdaudit.config import ConfigError, RunConfig, load_config
from kdaudit.data.records import Record, RecordError, load_records

EXAMPLES = 1000
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
FIELDS = ["id", "instruction", "context", "response", "category", "secrets", "group",
          "prompt", "output", "input", "text"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=6), scalars, max_size=2))
rows = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), values,
                       max_size=8)


SCRATCH = Path(tempfile.mkdtemp(prefix="kdaudit-fuzz-"))


def _load(suffix: str, data: bytes) -> None:
    path = SCRATCH / f"records{suffix}"
    path.write_bytes(data)
    try:
        records = load_records(path)
    except RecordError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        return
    assert all(isinstance(r, Record) and isinstance(r.instruction, str) and
               isinstance(r.response, str) and all(isinstance(s, str) for s in r.secrets)
               for r in records)


@FUZZ
@given(st.lists(st.one_of(rows.map(lambda r: json.dumps(r).encode()),
                          st.binary(max_size=40)), max_size=5))
def test_jsonl_loader_raises_only_record_errors(lines):
    _load(".jsonl", b"\n".join(lines))


@FUZZ
@given(st.lists(rows, min_size=1, max_size=4), st.binary(max_size=20), st.booleans())
def test_csv_loader_raises_only_record_errors(table, noise, corrupt):
    columns = list(dict.fromkeys(k for r in table for k in r))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows([[json.dumps(r[c]) if isinstance(r.get(c), (list, dict)) else r.get(c)
                       for c in columns] for r in table])
    data = buffer.getvalue().encode("utf-8", "surrogatepass")
    _load(".csv", data + noise if corrupt else data)


parquet_cell = st.one_of(st.none(), st.integers(-2**40, 2**40), st.text(max_size=20),
                         st.floats(allow_nan=True), st.lists(st.text(max_size=8), max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), st.lists(parquet_cell, min_size=2, max_size=2),
                       max_size=6), st.booleans())
def test_parquet_loader_raises_only_record_errors(columns, truncate):
    buffer = io.BytesIO()
    try:
        pd.DataFrame(columns).to_parquet(buffer, index=False)
    except Exception:               # a column pyarrow cannot store: nothing to load
        return
    data = buffer.getvalue()
    _load(".parquet", data[: len(data) // 2] if truncate else data)


@FUZZ
@given(rows)
def test_record_schema_raises_only_record_errors(row):
    try:
        r = Record.from_dict(row, where="row 7")
    except RecordError as e:
        assert "row 7" in str(e)
        return
    assert isinstance(r.id, str) and isinstance(r.secrets, list)


# -- TOML configs -------------------------------------------------------------------------------
def _schema() -> dict[str, list[str]]:
    cfg = RunConfig()
    return {f.name: ([g.name for g in dataclasses.fields(getattr(cfg, f.name))]
                     if dataclasses.is_dataclass(getattr(cfg, f.name)) else [])
            for f in dataclasses.fields(cfg)}


SCHEMA = _schema()
toml_scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                         st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=12), st.sampled_from(
                             ["kd", "nokd", "gpt2-tiny-student", "builtin", "person", "paper"]))
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3),
                        st.dictionaries(st.sampled_from(["a", "lr", "epochs", "kd"]),
                                        toml_scalars, max_size=2))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else
                                            "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) \
            + " }"
    return str(v)


@st.composite
def toml_documents(draw) -> str:
    lines = []
    top = draw(st.lists(st.sampled_from([k for k, sub in SCHEMA.items() if not sub] +
                                        ["nosuch"]), max_size=3, unique=True))
    lines += [f"{k} = {_toml_value(draw(toml_values))}" for k in top]
    for section in draw(st.lists(st.sampled_from([k for k, sub in SCHEMA.items() if sub]),
                                 max_size=3, unique=True)):
        lines.append(f"[{section}]")
        keys = draw(st.lists(st.sampled_from(SCHEMA[section] + ["typo"]), max_size=3,
                             unique=True))
        lines += [f"{k} = {_toml_value(draw(toml_values))}" for k in keys]
    return "\n".join(lines) + "\n"


@FUZZ
@given(st.one_of(toml_documents(), st.text(max_size=60)), st.sampled_from(["smoke", "tiny"]))
def test_config_files_raise_only_config_errors(text, preset):
    path = SCRATCH / "run.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(preset, path)
    except ConfigError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"


@pytest.mark.parametrize("data, expected", [
    (b'{"instruction": "caf\xe9", "response": "r"}\n', r"line 1: not UTF-8"),
    (b"", r"no records"),
    (b'{"instruction": "a"}\n', r"missing field\(s\) \['response'\]"),
])
def test_bad_record_files_say_which_file_and_line(tmp_path, data, expected):
    path = tmp_path / "members.jsonl"
    path.write_bytes(data)
    with pytest.raises(RecordError, match=rf"{path}.*{expected}"):
        load_records(path)
