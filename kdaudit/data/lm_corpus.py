"""The public pretraining corpus of the KD recipes' LM term (`kd.lm_corpus`).

The paper's scripts add `lm_coef` × the LM loss on OpenWebText to several methods. Offline,
"builtin" is the builtin corpus's pretraining texts (people disjoint from every split, the
same texts the tiny bases were pretrained on); a user who has the real corpus names a local
.txt (one text per line) or .jsonl (a "text" field per line) file, or a Hugging Face dataset
with a "text" column (`openwebtext`), of which the first `n` texts are taken.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from kdaudit.errors import ConfigError


def lm_examples(method, params, tokenizer, max_length: int,
                builtin: Callable[[], list[str]]) -> list:
    """The LM term's corpus encoded for training, when `method` has the term (`lm_coef` > 0);
    [] otherwise. `builtin` gives the texts of "builtin"."""
    from kdaudit.data.template import encode_text

    if not (method.lm_term and params.lm_coef):
        return []
    texts = lm_texts(params.lm_corpus, params.lm_corpus_records, builtin)
    return [encode_text(t, tokenizer, max_length) for t in texts]


def lm_texts(name: str, n: int, builtin: Callable[[], list[str]]) -> list[str]:
    """Up to `n` texts of corpus `name` ("builtin": `builtin()`, all of it)."""
    if name == "builtin":
        return builtin()
    path = Path(name)
    if path.is_file():
        return _file_texts(path, n)
    if path.suffix.lower() in (".txt", ".jsonl") or path.is_dir():
        raise ConfigError(f"kd.lm_corpus: {name}: no such file")
    return _hub_texts(name, n)


def _file_texts(path: Path, n: int) -> list[str]:
    texts: list[str] = []
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if len(texts) >= n:
                    break
                if not line.strip():
                    continue
                if not jsonl:
                    texts.append(line.rstrip("\n"))
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{line_no}: not JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ConfigError(f"{path}:{line_no}: expected an object with a 'text' "
                                      f"string")
                texts.append(row["text"])
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not texts:
        raise ConfigError(f"{path}: no texts for the LM term")
    return texts


def _hub_texts(name: str, n: int) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; say what and where
        raise ConfigError(f"kd.lm_corpus: cannot load dataset {name!r} ({type(e).__name__}: "
                          f"{e}); use 'builtin' offline, or a local .txt / .jsonl file") from None
    texts = []
    for row in ds:
        if "text" not in row:
            raise ConfigError(f"kd.lm_corpus: dataset {name!r} has no 'text' column "
                              f"(columns: {sorted(row)})")
        texts.append(row["text"])
        if len(texts) >= n:
            break
    return texts
