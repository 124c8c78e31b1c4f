"""The Alpaca-style prompt template (docs/methods.md §2) and tokenization that labels response tokens."""
from __future__ import annotations

from dataclasses import dataclass

from kdaudit.data.records import Record

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n")
PREAMBLE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input "
                       "that provides further context. "
                       "Write a response that appropriately completes the request.\n\n")


def format_prompt(record: Record) -> str:
    """Everything before the response: preamble, instruction, input (if any), response header."""
    if record.context.strip():
        return (f"{PREAMBLE_WITH_INPUT}### Instruction:\n{record.instruction}\n\n"
                f"### Input:\n{record.context}\n\n### Response:\n")
    return f"{PREAMBLE}### Instruction:\n{record.instruction}\n\n### Response:\n"


def format_text(record: Record) -> str:
    """The full training text without the end-of-text token."""
    return format_prompt(record) + record.response


@dataclass
class Encoded:
    """Token ids of prompt + response + EOS; `response_start` indexes the first response token;
    `person` is the privacy unit of the record it encodes (`Record.person`; None when it
    encodes no record, e.g. a sampled response)."""

    input_ids: list[int]
    response_start: int
    person: str | None = None

    @property
    def response_mask(self) -> list[bool]:
        return [i >= self.response_start for i in range(len(self.input_ids))]


def encode_record(record: Record, tokenizer, max_length: int) -> Encoded:
    """Tokenize prompt and response separately so the boundary is exact; EOS closes the response.

    When too long, the prompt is cut from the left (keeping the response and the header next to
    it) and then the response from the right; at least one response token always remains.
    """
    prompt = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    response = response[: max(1, max_length - 1)]
    prompt = prompt[max(0, len(prompt) + len(response) - max_length):]
    return Encoded(input_ids=prompt + response, response_start=len(prompt), person=record.person)


def encode_prompt(record: Record, tokenizer, max_length: int) -> list[int]:
    """Prompt ids only (for generation), cut from the left to `max_length`."""
    ids = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def encode_text(text: str, tokenizer, max_length: int) -> Encoded:
    """Plain text for language modelling: every token but the first is a target, EOS closes
    it, cut to `max_length`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(ids[:max_length], response_start=1)
