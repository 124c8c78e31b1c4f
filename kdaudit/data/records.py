"""The Record schema and loaders that map other schemas onto it."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

REQUIRED = ("instruction", "response")

# Column mappings for published instruction-tuning schemas: theirs -> ours.
MAPPINGS: dict[str, dict[str, str]] = {
    "dolly": {"instruction": "instruction", "context": "context", "response": "response",
              "category": "category"},
    "alpaca": {"instruction": "instruction", "input": "context", "output": "response"},
    "kdaudit": {},
}


class RecordError(ValueError):
    """Bad input data; the message names the file, line or field and what was expected."""


@dataclass
class Record:
    """One instruction-tuning example. `secrets` are the private spans it carries."""

    id: str
    instruction: str
    context: str
    response: str
    category: str
    secrets: list[str] = field(default_factory=list)
    group: str | None = None

    @property
    def person(self) -> str:
        """The privacy unit the record belongs to: its `group`, else its own id (copies of one
        record, like a repeated canary, are then one person)."""
        return self.group if self.group is not None else f"record:{self.id}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["group"] is None:
            del d["group"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> "Record":
        missing = [k for k in ("id", *REQUIRED) if k not in d or d[k] is None]
        if missing:
            raise RecordError(f"{where}: missing field(s) {missing}; a record needs "
                              f"'instruction' and 'response' (optional: 'id', 'context', "
                              f"'category', 'secrets', 'group')")
        for k in ("instruction", "context", "response", "category"):
            if k in d and d[k] is not None and not isinstance(d[k], str):
                raise RecordError(f"{where}: field '{k}' must be a string, got "
                                  f"{type(d[k]).__name__}")
        secrets = d.get("secrets") or []
        if not isinstance(secrets, (list, tuple)) or not all(isinstance(s, str)
                                                             for s in secrets):
            raise RecordError(f"{where}: field 'secrets' must be a list of strings")
        group = d.get("group")
        return cls(id=str(d["id"]), instruction=d["instruction"], context=d.get("context") or "",
                   response=d["response"], category=d.get("category") or "unknown",
                   secrets=list(secrets), group=None if group is None else str(group))


def _rename(row: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    out = dict(row)
    for theirs, ours in mapping.items():
        if theirs in row and theirs != ours:
            out[ours] = out.pop(theirs)
    return out


def _resolve_mapping(mapping: str | Mapping[str, str] | None, columns: Iterable[str]) -> dict[str, str]:
    if mapping is None:  # guess: Alpaca if it has 'output', otherwise our own (= Dolly) names
        return MAPPINGS["alpaca"] if "output" in set(columns) else {}
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise RecordError(f"unknown mapping '{mapping}'; expected one of {sorted(MAPPINGS)} "
                              f"or a dict of column -> field")
        return MAPPINGS[mapping]
    return dict(mapping)


def records_from_rows(rows: Iterable[Mapping[str, Any]], *, source: str,
                      mapping: str | Mapping[str, str] | None = None,
                      line_offset: int = 1) -> list[Record]:
    """Map raw rows onto Records; ids default to `<source stem>-<row>`."""
    out, resolved = [], None
    stem = Path(source).stem or "rec"
    for i, row in enumerate(rows):
        if resolved is None:
            resolved = _resolve_mapping(mapping, row.keys())
        d = _rename(row, resolved)
        d.setdefault("id", f"{stem}-{i}")
        if isinstance(d.get("secrets"), str):  # CSV: JSON-encoded list
            try:
                d["secrets"] = json.loads(d["secrets"]) if d["secrets"] else []
            except json.JSONDecodeError as e:
                raise RecordError(f"{source}, row {i + line_offset}: 'secrets' is not a JSON "
                                  f"list: {e}") from None
        out.append(Record.from_dict(d, where=f"{source}, row {i + line_offset}"))
    return out


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}, line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at "
                          f"column {e.start + 1}); save the file as UTF-8") from None


def read_jsonl(path: str | Path, mapping: str | Mapping[str, str] | None = None) -> list[Record]:
    path = Path(path)
    rows, lines = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column "
                                  f"{e.colno}); expected one JSON object per line") from None
            except RecursionError:
                raise RecordError(f"{path}, line {lineno}: JSON nested too deeply; expected "
                                  f"one flat JSON object per line") from None
            if not isinstance(row, dict):
                raise RecordError(f"{path}, line {lineno}: expected a JSON object, got "
                                  f"{type(row).__name__}")
            rows.append(row)
            lines.append(lineno)
    records = []
    resolved = _resolve_mapping(mapping, rows[0].keys()) if rows else {}
    for row, lineno in zip(rows, lines):
        records += records_from_rows([row], source=str(path), mapping=resolved, line_offset=lineno)
        if "id" not in row:
            records[-1].id = f"{path.stem}-{len(records) - 1}"
    return records


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write records as JSON lines (atomically: temp file, then rename)."""
    from kdaudit.store import atomic_write_text

    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)


def load_records(source: str | Path, mapping: str | Mapping[str, str] | None = None,
                 split: str = "train") -> list[Record]:
    """Load records from a .jsonl/.csv/.parquet file, a local HF dataset folder or a hub name.

    `mapping` is 'dolly', 'alpaca', 'kdaudit' or a dict {their column: our field}; when None it
    is guessed from the columns.
    """
    path = Path(source)
    if path.is_file():
        records = _load_file(path, mapping)
        if not records:
            raise RecordError(f"{path}: no records (the file is empty)")
        return records
    if not path.exists() and (path.suffix.lower() in LOCAL_SUFFIXES or path.parent.is_dir()
                              and str(path.parent) not in ("", ".")):
        # a mistyped local name must not become a hub lookup
        raise RecordError(f"{path}: no such file; expected a .jsonl, .csv or .parquet file, "
                          f"a saved dataset folder or a Hugging Face dataset name")
    return _load_dataset(source, mapping, split)


LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecordError(f"{path}, line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at "
                          f"column {column}); save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise RecordError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    for row in rows:
        if None in row:     # more cells than the header has columns
            raise RecordError(f"{path}, line {reader.line_num}: a row has more cells than the "
                              f"header has columns ({list(reader.fieldnames or [])})")
    return rows


def _load_file(path: Path, mapping: str | Mapping[str, str] | None) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, mapping)
    if suffix == ".csv":
        return records_from_rows(_read_csv(path), source=str(path), mapping=mapping,
                                 line_offset=2)
    if suffix == ".parquet":
        import pandas as pd

        try:
            rows = pd.read_parquet(path).to_dict(orient="records")
        except Exception as e:     # pyarrow's errors vary by version: name the file instead
            raise RecordError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        for r in rows:  # parquet lists come back as numpy arrays, missing cells as None / NaN
            secrets = r.get("secrets")
            if hasattr(secrets, "tolist") and not isinstance(secrets, str):
                secrets = secrets.tolist()
            if isinstance(secrets, float) and math.isnan(secrets):
                secrets = None
            if isinstance(secrets, list):
                secrets = [str(s) for s in secrets]
            if "secrets" in r:
                r["secrets"] = secrets
        return records_from_rows(rows, source=str(path), mapping=mapping)
    raise RecordError(f"{path}: unsupported file type '{suffix}'; expected .jsonl, .csv, "
                      f".parquet or a Hugging Face dataset")


def _load_dataset(source: str | Path, mapping: str | Mapping[str, str] | None,
                  split: str) -> list[Record]:
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError:
                ds = datasets.load_dataset(str(path))
        else:
            ds = datasets.load_dataset(str(source))
    except Exception as e:   # datasets' errors vary by version and by what the name is
        what = "a folder datasets cannot read" if path.is_dir() else \
            "not a local file or folder, and no Hugging Face dataset of that name could be loaded"
        raise RecordError(f"{source}: {what} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise RecordError(f"{source}: no split '{split}'; available: {list(ds)}")
        ds = ds[split]
    return records_from_rows(ds, source=str(source), mapping=mapping)
