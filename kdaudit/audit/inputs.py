"""Checks of what an audit is given, made before any model runs.

An audit whose inputs are wrong still prints numbers that look right (the same file as
members and non-members gives AUC 0.5, "no leakage"), so every check here refuses with one
line naming the input and what was expected. The context length every model can take is
read from its config, never assumed.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from kdaudit.data.records import Record, RecordError
from kdaudit.data.template import format_prompt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_record_sets(members: Sequence[Record], nonmembers: Sequence[Record], *,
                      names: tuple[str, str] = ("members", "non-members")) -> None:
    """Refuse duplicate ids within a set, and ids or identical records in both sets: a
    record cannot be both a member and a non-member."""
    for records, name in zip((members, nonmembers), names):
        if not records:
            raise RecordError(f"{name}: no records")
        repeated = [(i, n) for i, n in Counter(r.id for r in records).items() if n > 1]
        if repeated:
            rid, n = repeated[0]
            raise RecordError(f"{name}: record id {rid!r} occurs {n} times ({len(repeated)} "
                              f"ids repeated); every record needs its own id")
    shared = sorted({r.id for r in members} & {r.id for r in nonmembers})
    if shared:
        raise RecordError(f"{names[0]} and {names[1]} share {len(shared)} record id(s), e.g. "
                          f"{shared[0]!r}; a record cannot be both a member and a non-member")
    text = {_content(r): r.id for r in members}
    same = [(text[_content(r)], r.id) for r in nonmembers if _content(r) in text]
    if same:
        m, n = same[0]
        raise RecordError(f"{names[0]} and {names[1]} share {len(same)} identical record(s) "
                          f"(same instruction, input and response), e.g. {m!r} and {n!r}; a "
                          f"record cannot be both a member and a non-member")


def _content(r: Record) -> tuple[str, str, str]:
    return (r.instruction.strip(), r.context.strip(), r.response.strip())


def model_context(config) -> int | None:
    """The number of positions a model takes, from its config (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def source_config(source):
    """The config of a model given as a folder, hub name or loaded model, without loading
    weights; a missing folder is an error naming it."""
    if not isinstance(source, (str, Path)):
        return source.config
    from transformers import AutoConfig

    path = Path(source)
    looks_local = path.is_absolute() or str(source).startswith((".", "~")) or \
        len(path.parts) > 2 or path.exists()
    if looks_local and not (path / "config.json").exists():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(f"{source}: model folder {what}; expected a Hugging Face "
                                f"model folder (config.json, *.safetensors) or a hub name")
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{source}: not a local model folder, and no hub model of that "
                                f"name could be loaded ({first})") from None


def audit_length(contexts: Mapping[str, int | None], requested: int | None) -> tuple[int, str]:
    """The token length of an audited record: `requested`, or the smallest context among the
    models; refused when it exceeds a model's context. Returns it with where it came from."""
    known = {k: v for k, v in contexts.items() if v is not None}
    if requested is not None:
        if requested < 2:
            raise ValueError(f"max_length = {requested}: expected at least 2 tokens")
        over = [(k, v) for k, v in known.items() if requested > v]
        if over:
            model, limit = min(over, key=lambda kv: kv[1])
            raise ValueError(f"max_length = {requested} exceeds the context of model {model!r} "
                             f"({limit} positions); pass {min(known.values())} or less, or leave "
                             f"it out to use the models' smallest context")
        return requested, "the max_length asked for"
    if not known:
        raise ValueError(f"cannot tell the context length of {sorted(contexts)} from their "
                         f"configs; pass max_length")
    model = min(known, key=known.get)
    return known[model], f"the smallest context among the audited models ({model}'s)"


def check_tokenizer(model_id: str, source, tokenizer) -> str | None:
    """Refuse a model folder whose own tokenizer differs from the audit's (same-sized
    vocabularies with other token ids would score every text as noise). Returns a note when
    there is no tokenizer beside the model to compare."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        return (f"Model {model_id!r} has no tokenizer of its own; it was audited with the "
                f"shared tokenizer.")
    from kdaudit.models import load_tokenizer

    try:
        own = load_tokenizer(source)
    except (OSError, ValueError):
        return (f"Model {model_id!r}: its tokenizer could not be loaded to compare; it was "
                f"audited with the shared tokenizer.")
    if own.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"model {model_id!r} ({source}) has its own tokenizer, which differs "
                         f"from the audit's; audit models with different tokenizers "
                         f"separately (or give an independent model as the external "
                         f"reference, compared per byte)")
    return None


def truncation_note(records: Sequence[Record], tokenizer, max_length: int,
                    why: str = "") -> str | None:
    """How many records do not fit `max_length` tokens (prompt + response + end token) and
    what was cut: prompts from the left first, responses from the right only when they alone
    are too long (`data.template.encode_record`)."""
    over = cut = 0
    for r in records:
        n_prompt = len(tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"])
        n_response = len(tokenizer(r.response, add_special_tokens=False)["input_ids"]) + 1
        if n_prompt + n_response > max_length:
            over += 1
            cut += n_response > max_length - 1
    if not over:
        return None
    tail = f"; {cut} of them also lost the end of their response" if cut else ""
    source = f", {why}" if why else ""
    return (f"{over} of {len(records)} audited records are longer than {max_length} tokens"
            f"{source}: their prompts were cut from the left to fit{tail}.")
