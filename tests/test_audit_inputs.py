"""`kdaudit audit` on a user's own records: wrong inputs are refused in one line before any
model runs, and personal details the records never declared stay out of the report."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest

import kdaudit.api
from kdaudit.cli import main
from kdaudit.data.records import Record


def _write_jsonl(path, records: list[Record], *, secrets: bool = False):
    with path.open("w") as f:
        for r in records:
            d = r.to_dict()
            if not secrets:
                d.pop("secrets")
            f.write(json.dumps(d) + "\n")
    return path


def _write_csv(path, records: list[Record]):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "instruction", "context", "response", "category"])
        w.writeheader()
        for r in records:
            w.writerow({k: getattr(r, k) for k in w.fieldnames})
    return path


def _pii(records: list[Record]) -> set[str]:
    """The private details a pattern can recognise: phones, e-mails, accounts, dates,
    addresses (every builtin secret with a digit or an @)."""
    return {s for r in records for s in r.secrets if any(c.isdigit() for c in s) or "@" in s
            if not s.startswith("$")}


@pytest.fixture()
def no_scoring(monkeypatch):
    """Refusals must come before the first model runs."""
    def refuse(*a, **k):
        raise AssertionError("a model was scored before the inputs were checked")
    for scoring in ("audit_model", "reference_pass", "external_pass"):   # every model's way in
        monkeypatch.setattr(kdaudit.api, scoring, refuse)


def _first_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_records_without_secrets_are_redacted_by_detectors(tiny_lm, tmp_path):
    """Members as CSV, non-members as JSONL, neither declaring secrets: no phone, e-mail,
    account number, date or address of theirs appears in what the audit writes; with
    --show-secrets they do."""
    _, _, records, model_dir = tiny_lm
    members = _write_csv(tmp_path / "members.csv", records[:30])
    nonmembers = _write_jsonl(tmp_path / "nonmembers.jsonl", records[30:60])
    pii = _pii(records[:60])
    assert len(pii) > 60
    args = ["audit", "--teacher", str(model_dir), "--members", str(members), "--nonmembers",
            str(nonmembers), "--signals", "loss,zlib,mink"]
    assert main([*args, "--out", str(tmp_path / "redacted")]) == 0
    shared = [*(tmp_path / "redacted").glob("tables/*.csv"),
              *(tmp_path / "redacted").glob("report/report.*")]
    assert len(shared) >= 8
    for path in shared:
        text = path.read_text()
        leaked = [s for s in pii if s in text]
        assert not leaked, f"{path.name} shows {leaked[:3]}"
    md = (tmp_path / "redacted" / "report" / "report.md").read_text()
    assert "phone numbers" in md and "e-mail addresses" in md and "long numbers" in md
    assert "kdaudit audit <the same arguments> --show-secrets" in md

    assert main([*args, "--out", str(tmp_path / "clear"), "--show-secrets"]) == 0
    clear = (tmp_path / "clear" / "report" / "report.md").read_text()
    assert sum(s in clear for s in pii) >= 10
    assert "Redaction is off" in clear


def test_pattern_detectors_catch_common_formats():
    from kdaudit.report.redact import REDACTED, Redactor

    redactor = Redactor(["Ann Lee"])
    text = ("ann lee (born 23 Nov 1963, or 11/23/1963) lives at 17066 Heather Grove Apt. 915, "
            "South Bradfurt, NE 80119; call (408)389-9579, +44 20 7946 0958 or 7758983867; "
            "mail ann.lee@example.org; card 4111 1111 1111 1111; SSN 123-45-6789. "
            "In 2019, 12 of 1,234 cases cost $117,000 at version 3.14159.")
    out = redactor(text)
    assert not any(c.isdigit() for c in out.split("In 2019")[0].replace(REDACTED, ""))
    assert "@" not in out and "ann lee" not in out.lower()
    assert out.endswith("In 2019, 12 of 1,234 cases cost $117,000 at version 3.14159.")
    assert redactor.counts == {"declared secret": 1, "date": 2, "street address": 2,
                               "phone number": 2, "long number": 3, "e-mail address": 1}


def test_same_file_as_members_and_nonmembers_is_refused(tiny_lm, tmp_path, capsys, no_scoring):
    _, _, records, model_dir = tiny_lm
    data = _write_jsonl(tmp_path / "records.jsonl", records[:30])
    code = main(["audit", "--teacher", str(model_dir), "--members", str(data),
                 "--nonmembers", str(data), "--out", str(tmp_path / "out")])
    assert code == 2
    line = _first_error(capsys)
    assert line == (f"kdaudit: error: {data} and {data} share 30 record id(s), e.g. "
                    f"'{sorted(r.id for r in records[:30])[0]}'; a record cannot be both a "
                    f"member and a non-member")
    assert not (tmp_path / "out").exists()


def test_overlapping_sets_and_repeated_ids_are_refused(tiny_lm, tmp_path, capsys, no_scoring):
    _, _, records, model_dir = tiny_lm
    members = _write_jsonl(tmp_path / "m.jsonl", records[:30])
    run = lambda m, n: main(["audit", "--teacher", str(model_dir), "--members", str(m),  # noqa
                             "--nonmembers", str(n), "--out", str(tmp_path / "out")])
    half = _write_jsonl(tmp_path / "half.jsonl", records[15:45])       # 15 members too
    assert run(members, half) == 2
    assert "share 15 record id(s)" in _first_error(capsys)

    renamed = [dataclasses.replace(r, id=f"copy-{r.id}") for r in records[20:30]]
    copies = _write_jsonl(tmp_path / "copies.jsonl", records[30:50] + renamed)
    assert run(members, copies) == 2
    assert "share 10 identical record(s) (same instruction, input and response)" in \
        _first_error(capsys)

    same_id = _write_jsonl(tmp_path / "same_id.jsonl",
                           [dataclasses.replace(r, id="x") for r in records[:30]])
    assert run(same_id, _write_jsonl(tmp_path / "n.jsonl", records[30:60])) == 2
    assert _first_error(capsys) == (f"kdaudit: error: {same_id}: record id 'x' occurs 30 times "
                                    f"(1 ids repeated); every record needs its own id")


def test_student_with_another_tokenizer_is_refused(tiny_lm, tmp_path, capsys, no_scoring):
    from kdaudit.data.corpus import generate_records
    from kdaudit.data.template import format_text
    from kdaudit.models import build_zoo_model, train_tokenizer

    _, tok, records, model_dir = tiny_lm
    other = train_tokenizer([format_text(r) for r in generate_records(300, seed=55)], len(tok))
    assert len(other) == len(tok) and other.get_vocab() != tok.get_vocab()
    student = build_zoo_model("gpt2-smoke-student", other, seed=1)
    student.save_pretrained(tmp_path / "student")
    other.save_pretrained(tmp_path / "student")
    m = _write_jsonl(tmp_path / "m.jsonl", records[:30])
    n = _write_jsonl(tmp_path / "n.jsonl", records[30:60])
    code = main(["audit", "--teacher", str(model_dir), "--student", f"kd={tmp_path / 'student'}",
                 "--members", str(m), "--nonmembers", str(n), "--out", str(tmp_path / "out")])
    assert code == 2
    assert _first_error(capsys).startswith(
        f"kdaudit: error: model 'kd' ({tmp_path / 'student'}) has its own tokenizer, which "
        f"differs from the audit's")


def test_max_length_beyond_a_models_context_is_refused(tiny_lm, tmp_path, capsys, no_scoring):
    _, _, records, model_dir = tiny_lm
    m = _write_jsonl(tmp_path / "m.jsonl", records[:30])
    n = _write_jsonl(tmp_path / "n.jsonl", records[30:60])
    args = ["audit", "--teacher", str(model_dir), "--members", str(m), "--nonmembers", str(n),
            "--out", str(tmp_path / "out")]
    assert main([*args, "--max-length", "512"]) == 2
    assert _first_error(capsys) == (
        "kdaudit: error: max_length = 512 exceeds the context of model 'teacher' (256 "
        "positions); pass 256 or less, or leave it out to use the models' smallest context")
    assert main([*args, "--student", f"kd={tmp_path / 'nosuch'}"]) == 2
    assert _first_error(capsys) == (
        f"kdaudit: error: {tmp_path / 'nosuch'}: model folder does not exist; expected a "
        f"Hugging Face model folder (config.json, *.safetensors) or a hub name")


def test_truncated_records_are_counted(tiny_lm):
    from kdaudit.audit.inputs import truncation_note
    from kdaudit.data.template import encode_record

    _, tok, records, _ = tiny_lm
    lengths = [len(encode_record(r, tok, 10_000).input_ids) for r in records]
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(n > limit for n in lengths)
    note = truncation_note(records, tok, limit)
    assert note.startswith(f"{over} of {len(records)} audited records are longer than {limit}")
    assert truncation_note(records, tok, max(lengths)) is None


@pytest.mark.parametrize("case, expected", [
    ("missing_file", "{m_dir}/nosuch.jsonl: no such file; expected a .jsonl, .csv or .parquet "
                     "file, a saved dataset folder or a Hugging Face dataset name"),
    ("not_utf8", "{m_dir}/latin1.jsonl, line 1: not UTF-8 (byte 0xe9 at column 21); save the "
                 "file as UTF-8"),
    ("empty", "{m_dir}/empty.jsonl: no records (the file is empty)"),
    ("no_signals", "audit.signals: expected at least one signal; available: "),
    ("ref_base_without_base", "signal 'ref_base' needs a base model (the model before "
                              "fine-tuning) for at least one audited model"),
    ("rmia_without_references", "signal 'rmia' needs reference models"),
    ("missing_student", "{m_dir}/nosuch-student: model folder does not exist"),
    ("not_a_model", "{m_dir}: model folder has no config.json; expected a Hugging Face model "
                    "folder"),
    ("unknown_hub_dataset", "org-that-is-not/there: not a local file or folder, and no "
                            "Hugging Face dataset of that name could be loaded"),
])
def test_bad_inputs_fail_in_one_line_before_any_model_runs(tiny_lm, tmp_path, capsys,
                                                            no_scoring, case, expected):
    _, _, records, model_dir = tiny_lm
    members = _write_jsonl(tmp_path / "m.jsonl", records[:30])
    nonmembers = _write_jsonl(tmp_path / "n.jsonl", records[30:60])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "response": "r"}\n')
    (tmp_path / "empty.jsonl").write_bytes(b"")
    args = {"missing_file": ["--members", str(tmp_path / "nosuch.jsonl")],
            "not_utf8": ["--members", str(tmp_path / "latin1.jsonl")],
            "empty": ["--members", str(tmp_path / "empty.jsonl")],
            "no_signals": ["--signals", ","],
            "ref_base_without_base": ["--signals", "loss,ref_base"],
            "rmia_without_references": ["--signals", "rmia"],
            "missing_student": ["--student", f"kd={tmp_path / 'nosuch-student'}"],
            "not_a_model": ["--student", f"kd={tmp_path}"],
            "unknown_hub_dataset": ["--members", "org-that-is-not/there"]}[case]
    flags = {"--members": str(members), "--nonmembers": str(nonmembers)}
    for flag in ("--members",):
        if flag in args:
            flags[flag] = args[args.index(flag) + 1]
            args = args[:args.index(flag)] + args[args.index(flag) + 2:]
    code = main(["audit", "--teacher", str(model_dir), *(x for kv in flags.items() for x in kv),
                 *args, "--out", str(tmp_path / "out")])
    assert code == 2
    assert _first_error(capsys).startswith("kdaudit: error: " + expected.format(m_dir=tmp_path))
    assert not (tmp_path / "out").exists()


def test_records_given_as_dicts_are_refused_by_name(tiny_lm, no_scoring):
    _, _, records, model_dir = tiny_lm
    with pytest.raises(ValueError, match=r"^members: expected Record objects "
                                         r"\(kdaudit.load_records\) or a file path, got dict$"):
        kdaudit.api.audit_models({"teacher": str(model_dir)}, [r.to_dict() for r in records[:30]],
                                 records[30:60])


def test_only_model_free_signals_say_so_instead_of_an_empty_table(tiny_lm, tmp_path, capsys):
    _, _, records, model_dir = tiny_lm
    members = _write_jsonl(tmp_path / "m.jsonl", records[:30])
    nonmembers = _write_jsonl(tmp_path / "n.jsonl", records[30:60])
    assert main(["audit", "--teacher", str(model_dir), "--members", str(members),
                 "--nonmembers", str(nonmembers), "--signals", "blind",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "No model-based membership signal was run (only the model-free checks below)." in out
    assert "Empty DataFrame" not in out and "Split check (blind baseline, no model)" in out
