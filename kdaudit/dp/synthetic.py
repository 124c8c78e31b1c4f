"""DistilDP's data side (Flemings & Annavaram 2024; docs/methods.md §7).

The DP teacher learns each private record as `<category>\\n\\n<prompt + response>`: the
category is a control code. Prompted with a control code alone it writes a synthetic record,
which is parsed back through the prompt template. How many records to ask for per category
must not read the private label counts (the original code does): `allocate` splits the
budget uniformly over category names the caller supplies from public knowledge.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from kdaudit.data.records import Record
from kdaudit.data.template import Encoded, format_text

SECTION = re.compile(r"### (Instruction|Input|Response):\n")


def control_prefix(category: str) -> str:
    """The control code that opens a DistilDP training text."""
    return f"{category}\n\n"


def encode_with_control_code(record: Record, tokenizer, max_length: int) -> Encoded:
    """`category + blank line + full text + EOS`; every token after the code is a target, so
    the teacher learns to write whole records (instruction, input and response)."""
    code = tokenizer(control_prefix(record.category), add_special_tokens=False)["input_ids"]
    body = tokenizer(format_text(record), add_special_tokens=False)["input_ids"]
    ids = (code + body)[:max_length - 1] + [tokenizer.eos_token_id]
    return Encoded(ids, response_start=len(code), person=record.person)


def allocate(n: int, categories: Sequence[str]) -> dict[str, int]:
    """`n` synthetic records split as evenly as possible over `categories` (no private
    counts are read, so the allocation costs no privacy)."""
    if not categories:
        raise ValueError("allocate: no categories")
    if n < 0:
        raise ValueError(f"allocate: n must be ≥ 0, got {n}")
    base, extra = divmod(n, len(categories))
    return {c: base + (i < extra) for i, c in enumerate(categories)}


def parse_record(text: str, category: str, record_id: str) -> Record | None:
    """A generated text back into a record by the template; None when it does not parse
    (no instruction or no response, a section twice, or an empty part)."""
    parts = SECTION.split(text)
    # parts: [preamble, name1, body1, name2, body2, ...]
    names = parts[1::2]
    if len(set(names)) != len(names) or "Instruction" not in names or "Response" not in names:
        return None
    fields = {name: body.strip() for name, body in zip(names, parts[2::2])}
    if not fields["Instruction"] or not fields["Response"]:
        return None
    if "Input" in names and not fields["Input"]:
        return None
    return Record(id=record_id, instruction=fields["Instruction"],
                  context=fields.get("Input", ""), response=fields["Response"],
                  category=category)


@dataclass
class SyntheticData:
    records: list[Record]
    dropped: Counter     # per category: samples that were empty or did not parse

    def summary(self) -> dict[str, object]:
        return {"kept": len(self.records), "dropped": int(sum(self.dropped.values())),
                "dropped_per_category": dict(self.dropped)}


@torch.no_grad()
def generate_synthetic(teacher, tokenizer, per_category: dict[str, int], *, seed: int,
                       max_new_tokens: int = 160, batch_size: int = 32, top_k: int = 50,
                       top_p: float = 0.9, no_repeat_ngram_size: int = 2) -> SyntheticData:
    """Sample records from the DP teacher, prompted with each control code (docs/methods.md §7:
    top-k 50, top-p 0.9, temperature 1, no-repeat-ngram 2); unparsable samples are dropped
    and counted. Post-processing a DP model's output costs no extra privacy."""
    device = next(teacher.parameters()).device
    was = teacher.training
    teacher.eval()
    torch.manual_seed(seed)
    records, dropped = [], Counter()
    bar = tqdm(total=sum(per_category.values()), desc="synthetic records", unit="record",
               mininterval=1.0)
    for category, n in per_category.items():
        code = tokenizer(control_prefix(category), add_special_tokens=False)["input_ids"]
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            bar.update(rows)
            ids = torch.tensor([code] * rows, device=device)
            out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   do_sample=True, top_k=top_k, top_p=top_p, temperature=1.0,
                                   no_repeat_ngram_size=no_repeat_ngram_size,
                                   max_new_tokens=max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
            for k, row in enumerate(out[:, len(code):].tolist()):
                text = tokenizer.decode(row, skip_special_tokens=True)
                rec = parse_record(text, category, f"syn-{category}-{start + k:05d}")
                if rec is None:
                    dropped[category] += 1
                else:
                    records.append(rec)
    bar.close()
    teacher.train(was)
    return SyntheticData(records, dropped)
